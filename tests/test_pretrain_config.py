"""Config loading, overrides and validation; the shipped configs; the CLI's bad-input errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import DEFAULTS, PROFILES, load_config, resolved_stem
from pretrain.train import learning_rate
from ringbench.errors import UserError
from tests.helpers import REPO, run_cli

CONFIGS = REPO / "configs" / "pretrain"


@pytest.mark.parametrize("name", ["ir", "ir_ring", "moco", "moco_ring"])
def test_shipped_configs_hold_official_hyperparameters(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg["method"] == name.split("_")[0]
    assert cfg["loss"]["name"] == ("ring" if name.endswith("ring") else "nce")
    assert cfg["optim"] == {
        "name": "sgd",
        "lr": 0.03,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "step",
        "milestones": [0.68, 0.83],
        "gamma": 0.1,
        "milestone_rounding": "exact",
    }
    assert (cfg["train"]["epochs"], cfg["train"]["batch_size"]) == (200, 256)
    assert cfg["data"]["name"] == "synthetic"
    if name.endswith("ring"):
        assert (cfg["loss"]["t"], cfg["loss"]["w_outer"], cfg["loss"]["w_inner"]) == (0.07, 0.1, 0.1)


def test_overrides_profile_and_types(tmp_path: Path):
    cfg = load_config(
        CONFIGS / "moco_ring.yaml",
        ["train.epochs=3", "loss.w_outer=0.2", "optim.milestones=[0.5]", "loss.num_samples=null"],
        profile="demo",
    )
    assert cfg["train"]["epochs"] == 3 and cfg["loss"]["w_outer"] == 0.2 and cfg["optim"]["milestones"] == [0.5]
    assert cfg["train"]["batch_size"] == PROFILES["demo"]["train.batch_size"]
    assert isinstance(load_config(None, ["optim.lr=1"])["optim"]["lr"], float)
    assert DEFAULTS["train"]["epochs"] == 200  # defaults are never mutated


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.epoch=3"], "unknown config key 'train.epoch'"),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["method=byol"], "unknown method"),
        (["loss.name=focal"], "unknown loss"),
        (["method=moco", "loss.name=hcl"], "does not apply"),
        (["arch=resnet_nonexistent"], "unknown architecture"),
        (["loss.w_inner=1.0"], "w_inner"),
        (["loss.w_outer=0"], "w_outer"),
        (["loss.w_outer=1.5"], "w_outer"),
        (["loss.num_samples=0"], "num_samples"),
        (["train.epochs=abc"], "must be an int"),
        (["train.batch_size=0"], "batch_size"),
        (["data.name=cifar10"], "needs data.root"),
        (["optim.milestones=[1.5]"], "milestones"),
        (["loss.schedule=cosine"], "loss.schedule"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(None, overrides)


def test_unknown_key_in_yaml_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: moco\nloss:\n  name: ring\n  w_outr: 0.2\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'loss.w_outr'"):
        load_config(path)


def test_lr_schedule_and_stem():
    cfg = load_config(CONFIGS / "moco.yaml")
    lrs = [learning_rate(cfg, e) for e in range(200)]
    assert lrs[135] == pytest.approx(0.03) and lrs[136] == pytest.approx(0.003)
    assert lrs[165] == pytest.approx(0.003) and lrs[166] == pytest.approx(0.0003)
    assert resolved_stem(cfg, 32) == "cifar" and resolved_stem(cfg, 96) == "cifar"
    assert resolved_stem(cfg, 224) == "imagenet"


def test_cli_help_by_path():
    help_run = run_cli("pretrain/run.py", "--help")
    assert help_run.returncode == 0 and "--data-root" in help_run.stdout and "key=value" in help_run.stdout


def test_cli_errors_are_one_line(tmp_path: Path, capsys):
    from pretrain.run import main
    from ringbench.cli import run_main

    assert run_main(main, ["--config", str(CONFIGS / "moco_ring.yaml"), "loss.w_iner=0.2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'loss.w_iner'" in err and len(err.strip().splitlines()) == 1
    assert (
        run_main(
            main,
            [
                "--config",
                str(CONFIGS / "moco.yaml"),
                "--data",
                "cifar10",
                "--data-root",
                str(tmp_path),
                "--workdir",
                str(tmp_path / "w"),
            ],
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "data_batch_1" in err
    assert run_main(main, ["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert run_main(main, ["--profile", "demo", "--epochs", "7", "--print-config"]) == 0
    assert "epochs: 7" in capsys.readouterr().out


def test_methods_come_from_one_registry(monkeypatch):
    """A method is one registered class: the schema gains its config section (with its ranges), and
    validation its name, the losses it accepts and its own checks; a name is registered once."""
    import re
    from dataclasses import dataclass

    from pretrain import config
    from pretrain.methods import registry
    from pretrain.methods.base import POSITIVE, Method, in_range

    classes = registry.method_classes()
    assert set(classes) == {"ir", "moco", "cmc", "simclr", "random", "supervised"}
    assert all(cls.name == name for name, cls in classes.items())
    assert set(classes) <= {p.stem for p in CONFIGS.glob("*.yaml")}  # each has its recipe
    assert set(registry.config_sections()) == {"ir", "moco", "cmc", "simclr"} <= set(DEFAULTS)

    @dataclass
    class ToyConfig:
        width: int = in_range(4, *POSITIVE)

    class Toy(Method):
        name = "toy"
        accepted_losses = ("nce",)
        config_section = ToyConfig

        @classmethod
        def check_config(cls, cfg):
            if cfg["train"]["batch_size"] > 1000:
                raise UserError("config: toy takes small batches")

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the real one comes back after
    registry.register_method(Toy)
    config.pretrain_schema.cache_clear()
    try:
        assert load_config(None, ["method=toy", "loss.name=nce", "toy.width=8"])["toy"] == {"width": 8}
        for override, match in [
            ("toy.width=0", "config: toy.width must be > 0"),
            ("loss.name=ring", "config: loss 'ring' does not apply to method 'toy'; use one of ['nce']"),
            ("train.batch_size=2048", "config: toy takes small batches"),
        ]:
            with pytest.raises(UserError, match=re.escape(match)):
                load_config(None, ["method=toy", "loss.name=nce", override])
        with pytest.raises(TypeError, match="registered twice"):
            registry.register_method(type("OtherToy", (Toy,), {}))
    finally:
        config.pretrain_schema.cache_clear()


def test_printing_a_config_needs_no_data_root(capsys):
    """``--print-config`` of a recipe for data on disk prints it; training it without the root is refused."""
    from pretrain.run import main
    from ringbench.cli import run_main

    assert run_main(main, ["--config", "official/moco_cifar10", "--print-config"]) == 0
    assert "name: cifar10" in capsys.readouterr().out
    assert run_main(main, ["--config", "official/moco_cifar10", "--epochs", "1"]) == 2
    assert "needs data.root" in capsys.readouterr().err
