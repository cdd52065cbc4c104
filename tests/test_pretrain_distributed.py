"""Pretraining on several processes (gloo on CPU, 2 processes): the cross-rank primitives, the methods'
cross-rank pieces, a 2-process run against a 1-process run on the same global batch, the data
sharding, and whole runs (torchrun included) to a card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain.train as trainer
from pretrain import distributed as dist
from pretrain.config import load_config
from pretrain.data.loaders import epoch_loader
from pretrain.methods import build_method
from pretrain.methods.base import MemoryBank
from pretrain.seeds import METHOD, stream_seed
from ringbench.card import load_card
from tests.helpers import REPO, free_port, run_processes
from tests.test_pretrain_methods import one_thread  # noqa: F401  (autouse fixture)
from tests.test_pretrain_train import tiny_cfg

CPU = torch.device("cpu")
DATASET = 40  # images (memory-bank size)
TINY = [
    "data.synthetic_image_size=16",
    "train.batch_size=8",
    "moco.queue_size=16",
    "ir.num_negatives=16",
    "cmc.num_negatives=16",
    "loss.w_outer=0.5",
    "loss.w_inner=0.25",
    "simclr.hidden_dim=64",
]


def _cfg(*overrides: str) -> dict:
    return load_config(None, [*TINY, *overrides])


def _method(cfg: dict):
    torch.manual_seed(0)
    method = build_method(cfg, DATASET, "imagenet")
    method.set_epoch(0)
    return method


def _batches(steps: int, batch: int = 8, views: int = 2) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(views)],
            torch.randperm(DATASET, generator=g)[:batch],
        )
        for _ in range(steps)
    ]


# -- the primitives and the methods' cross-rank pieces ------------------------------------------------


def _contrastive_part(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """What one process computes: its rows' log-sum-exp over every row's similarity (a SimCLR shape)."""
    return torch.logsumexp(y[rows] @ y.t(), dim=1).mean()


def _local_data(rank: int) -> torch.Tensor:
    return torch.randn(3, 5, generator=torch.Generator().manual_seed(10 + rank))


def _primitives_worker(rank: int, world: int, folder: str) -> None:
    dist.init_from_env(CPU)
    out: dict = {}
    # gather with gradients
    x = _local_data(rank).requires_grad_()
    y = dist.all_gather_with_grad(x)
    _contrastive_part(y, dist.local_rows(3)).backward()
    out["gathered"], out["grad"] = y.detach(), x.grad
    out["gathered_plain"] = dist.all_gather_cat(torch.full((2,), float(rank)))
    out["mean"] = dist.mean_over_processes({"a": float(rank), "b": 2.0 * rank + 1})
    # batch-norm statistics shared from process 0, other buffers left alone
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
    model[0].running_mean.fill_(rank + 1.0)
    model.register_buffer("queue", torch.full((1,), float(rank)))
    dist.broadcast_batchnorm_stats_(model)
    out["bn_mean"], out["bn_other"] = model[0].running_mean.clone(), model.queue.clone()
    # IR's memory bank moves the entries of every process's images
    bank = MemoryBank(DATASET, 8, momentum=0.5, seed=3)
    index = torch.tensor([[3, 7], [11, 20]])[rank]
    bank.update(index, torch.randn(2, 8, generator=torch.Generator().manual_seed(rank)))
    out["bank"] = bank.memory.clone()
    # MoCo: shuffle-BN across processes and the queue holding every process's keys
    moco = _method(_cfg("method=moco"))
    ((views, _),) = _batches(1)
    b = len(views[1]) // world
    out["keys"] = moco.keys(views[1][rank * b : (rank + 1) * b])
    moco.set_epoch(0)
    moco.training_step([v[rank * b : (rank + 1) * b] for v in views], torch.arange(b) + rank * b)
    out["queue"], out["queue_ptr"] = moco.queue.clone(), int(moco.queue_ptr)
    # a loss that is not finite on process 1 only: no process steps, both see it
    torch.manual_seed(0)
    tiny = _NanOnRank1()
    model = trainer.wrap_for_processes(tiny, CPU)
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    before = tiny.linear.weight.detach().clone()
    value, _ = trainer.optimisation_step(model, optimizer, scaler, [torch.ones(2, 3)], torch.arange(2), {}, CPU, False)
    out["nan_value"], out["nan_stepped"] = value, not torch.equal(before, tiny.linear.weight)
    torch.save(out, Path(folder) / f"rank{rank}.pt")
    dist.leave()


class _NanOnRank1(torch.nn.Module):
    sync_batchnorm = False

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, views, index):
        loss = self.linear(views[0]).mean() * (float("nan") if dist.rank() == 1 else 1.0)
        return loss, {"loss": float(loss.detach())}


def _check_primitives(tmp_path: Path) -> None:
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # gather: rank order, and the gradient of the sum of both processes' losses w.r.t. the local rows
    whole = torch.cat([_local_data(0), _local_data(1)]).requires_grad_()
    loss = sum(_contrastive_part(whole, torch.arange(3) + 3 * r) for r in range(2))
    loss.backward()
    for r in range(2):
        assert torch.equal(got[r]["gathered"], whole.detach())
        assert torch.allclose(got[r]["grad"], whole.grad[3 * r : 3 * r + 3], atol=1e-6), r
        assert torch.equal(got[r]["gathered_plain"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert got[r]["mean"] == {"a": 0.5, "b": 2.0}
        assert torch.equal(got[r]["bn_mean"], torch.ones(4)) and got[r]["bn_other"].item() == r
        assert got[r]["nan_value"] != got[r]["nan_value"] and not got[r]["nan_stepped"]  # NaN, no step
    # the bank: the one-process update on the whole batch, identical everywhere
    bank = MemoryBank(DATASET, 8, momentum=0.5, seed=3)
    z = torch.cat([torch.randn(2, 8, generator=torch.Generator().manual_seed(r)) for r in range(2)])
    bank.update(torch.tensor([3, 7, 11, 20]), z)
    for r in range(2):
        assert torch.allclose(got[r]["bank"], bank.memory, atol=1e-6)
    # MoCo's keys: the key encoder on each process's shard of the permuted global batch (its own BN
    # statistics), unpermuted; not the whole-batch BN keys
    moco = _method(_cfg("method=moco"))
    ((views, _),) = _batches(1)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(stream_seed(moco.seed, METHOD, 0)))
    with torch.no_grad():
        shuffled = views[1][perm]
        want = torch.cat([moco.key_encoder(shuffled[:4]), moco.key_encoder(shuffled[4:])])[torch.argsort(perm)]
        whole_bn = moco.key_encoder(views[1])
    keys = torch.cat([got[0]["keys"], got[1]["keys"]])
    assert torch.allclose(keys, want, atol=1e-5)
    assert not torch.allclose(keys, whole_bn, atol=1e-3)
    # the queue: the 8 keys of the global batch on both processes (queue of 16: slots 0-7 replaced)
    assert got[0]["queue_ptr"] == got[1]["queue_ptr"] == 8
    assert torch.equal(got[0]["queue"], got[1]["queue"])
    assert not torch.allclose(got[0]["queue"][:8], moco.queue[:8]) and torch.equal(got[0]["queue"][8:], moco.queue[8:])


# -- a 2-process run against a 1-process run --------------------------------------------------------

EQUAL_CASES = {
    "simclr_ntxent": ["method=simclr", "loss.name=ntxent", "loss.t=0.5"],
    "simclr_ring_drawn": ["method=simclr", "loss.name=ring", "loss.t=0.5", "loss.num_samples=5"],
    "simclr_hcl": ["method=simclr", "loss.name=hcl", "loss.t=0.5"],
    "ir_nce": ["method=ir", "loss.name=nce"],
    "ir_ring_drawn": ["method=ir", "loss.name=ring", "loss.num_samples=5"],
}


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            sub.eval()


def _run_steps(cfg: dict, steps: int, rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` optimisation steps of the trainer (its DDP wrapper and step) on this process's share
    of fixed global batches of 8; the losses (means over processes) and the final state."""
    method = _method(cfg)
    optimizer = trainer.build_optimizer(cfg, method)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    model = trainer.wrap_for_processes(method, CPU)
    model.train()
    _freeze_batchnorm(method)
    losses = []
    for views, index in _batches(steps, views=method.views):
        b = len(index) // world
        mine = slice(rank * b, (rank + 1) * b)
        value, _ = trainer.optimisation_step(
            model, optimizer, scaler, [v[mine] for v in views], index[mine], cfg, CPU, False
        )
        losses.append(value)
    return losses, {k: v.detach().clone() for k, v in method.state_dict().items()}


def _equal_worker(rank: int, world: int, cases: list[str], steps: int, folder: str) -> None:
    dist.init_from_env(CPU)
    for case in cases:
        torch.save(_run_steps(_cfg(*EQUAL_CASES[case]), steps, rank, world), Path(folder) / f"{case}-{rank}.pt")
    dist.leave()


def _primitives_then_equal_worker(rank: int, world: int, folder: str) -> None:
    """Both parts in one process group, joined here: the parts' own ``init_from_env`` finds it and their ``leave``
    keeps it (a caller's group). Leaving and joining again on the same port between the parts raced: a rank
    could reach the first part's store as rank 0 closed it (seen twice in loaded fresh-clone runs)."""
    import torch.distributed

    torch.distributed.init_process_group(backend="gloo", timeout=dist.TIMEOUT)
    try:
        _primitives_worker(rank, world, folder)
        _equal_worker(rank, world, ["simclr_ring_drawn"], 2, folder)
    finally:
        torch.distributed.destroy_process_group()


def _check_equal(tmp_path: Path, cases: list[str], steps: int) -> None:
    for case in cases:
        want_losses, want_state = _run_steps(_cfg(*EQUAL_CASES[case]), steps, 0, 1)
        for r in range(2):
            losses, state = torch.load(tmp_path / f"{case}-{r}.pt", weights_only=False)
            assert losses == pytest.approx(want_losses, rel=1e-5), (case, r)
            for key, value in want_state.items():
                assert torch.allclose(state[key].float(), value.float(), atol=1e-5), (case, r, key)
        init = _method(_cfg(*EQUAL_CASES[case])).state_dict()
        assert not torch.allclose(init["encoder.backbone.conv1.weight"], want_state["encoder.backbone.conv1.weight"])


@pytest.mark.heavy
def test_two_processes_primitives_and_same_steps_as_one(tmp_path: Path):
    """2 gloo processes: the cross-rank primitives (gather with gradients, means, BN statistics, IR's
    bank, MoCo's shuffle-BN keys and queue), then SimCLR with the ring's drawn negatives stepping as
    one process on the same global batch (see :func:`test_two_processes_step_as_one_on_the_global_batch`)."""
    run_processes(_primitives_then_equal_worker, 2, str(tmp_path))
    _check_primitives(tmp_path)
    _check_equal(tmp_path, ["simclr_ring_drawn"], 2)


@pytest.mark.slow
def test_two_processes_step_as_one_on_the_global_batch(tmp_path: Path):
    """IR and SimCLR (NT-Xent, HCL, the ring with drawn negatives) in 2 processes, each with half of
    the global batch, give the losses and weights of 1 process with the whole batch, step by step.

    Why equality holds: batch norm is in eval mode (fixed statistics), so each image's embedding is a
    function of the weights and that image alone -- with batch statistics, per-process BN would differ
    from whole-batch BN by design. SimCLR gathers the embeddings with their gradients and each process
    takes the mean loss of its own anchors against the whole batch; DDP averages the gradients, which
    is the gradient of the mean over all anchors. IR draws its shared negatives from the same generator
    state in every process and updates its bank with every process's embeddings; the ring's per-anchor
    draws are each process's rows of the draws for the global batch. Only float summation order differs.
    """
    cases = [c for c in EQUAL_CASES if c != "simclr_ring_drawn"]
    run_processes(_equal_worker, 2, cases, 3, str(tmp_path))
    _check_equal(tmp_path, cases, 3)


def test_in_batch_losses_on_one_process_share_of_the_anchors():
    """The loss pieces a process computes for its anchors (``rows``) are those rows of the whole
    batch's: logits, the ring's drawn negatives, and the losses (their mean over the shares)."""
    from pretrain import losses

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    shares = [torch.tensor([0, 1, 2, 6, 7, 8]), torch.tensor([3, 4, 5, 9, 10, 11])]  # 2 processes, B = 6
    pos, neg = losses.in_batch_logits(z1, z2, 0.5)
    drawn = losses.ring_logits(neg, 0.5, 0.25, 3, torch.Generator().manual_seed(1))
    for rows in shares:
        pos_r, neg_r = losses.in_batch_logits(z1, z2, 0.5, rows)
        assert torch.allclose(pos_r, pos[rows]) and torch.allclose(neg_r, neg[rows])
        part = losses.ring_logits(neg_r, 0.5, 0.25, 3, torch.Generator().manual_seed(1), draw_rows=rows, draw_total=12)
        assert torch.equal(part, drawn[rows])
    for loss in (losses.nt_xent_loss, losses.hcl_loss, losses.dcl_loss):
        halves = [loss(z1, z2, t=0.5, rows=rows) for rows in shares]
        assert torch.allclose(sum(halves) / 2, loss(z1, z2, t=0.5), atol=1e-6), loss.__name__


# -- the data ---------------------------------------------------------------------------------------


def test_sampler_shards_without_overlap_and_keeps_the_global_batch():
    """Step ``s`` of 2 processes holds the images of step ``s`` of 1 process, split without overlap;
    the same number of steps (drop_last), and another order next epoch."""
    cfg = tiny_cfg()
    dataset = list(range(21))  # 21 images, global batch 8: 2 steps, 5 images dropped

    def batches(epoch: int, world: int, rank: int) -> list[set[int]]:
        return [set(b.tolist()) for b in epoch_loader(dataset, cfg, 8 // world, epoch, world, rank)]

    one = batches(0, 1, 0)
    halves = [batches(0, 2, r) for r in range(2)]
    assert len(one) == len(halves[0]) == len(halves[1]) == 2
    for step in range(2):
        assert not halves[0][step] & halves[1][step]
        assert halves[0][step] | halves[1][step] == one[step]
    assert batches(1, 1, 0) != one


def test_batch_not_divisible_by_processes_is_refused(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(trainer.UserError, match="not divisible by the 3 processes"):
        trainer._train(tiny_cfg(), None, tmp_path, CPU, False, False)


# -- whole runs to a card ---------------------------------------------------------------------------


def _train_worker(rank: int, world: int, cfg: dict, folder: str) -> None:
    result = trainer.train(cfg, Path(folder) / "card.pth", Path(folder) / "work", progress=False)
    torch.save(result.method.state_dict(), Path(folder) / f"rank{rank}.pt")
    assert (result.card_path is not None) == (rank == 0)  # only process 0 writes the card


@pytest.mark.slow
def test_cmc_two_processes_to_a_card(tmp_path: Path):
    """A 2-process CMC run: the processes end identical (weights, both memory banks), process 0
    writes one card that the transfer stage loads (both streams), and one log."""
    cfg = tiny_cfg("method=cmc", "loss.name=nce", "cmc.num_negatives=8", "train.epochs=1", "knn.max_train=8")
    run_processes(_train_worker, 2, cfg, str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.pth", "rank0.pt", "rank1.pt", "work"]
    card = load_card(tmp_path / "card.pth")
    assert card.meta["method"] == "cmc" and card.meta["streams"] == ["l", "ab"]
    assert torch.equal(card.state_dict["l.conv1.weight"], a["backbone.l.conv1.weight"])
    lines = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [line.get("step") for line in lines] == [1, 2, None]  # 16 images / 8 per step, one writer
    from transfer.checkpoints import load_backbone

    model = load_backbone(tmp_path / "card.pth").build_model()
    assert model(torch.zeros(2, 3, 16, 16)).shape[0] == 2


@pytest.mark.slow
def test_torchrun_moco_two_processes_to_a_card(tmp_path: Path):
    """``torchrun --nproc_per_node 2 pretrain/run.py`` (PyTorch's own launcher, gloo on CPU) runs
    ring-MoCo to a card the transfer stage loads; the log has each step once."""
    args = [f"--master_port={free_port()}", "--nproc_per_node=2", "pretrain/run.py"]
    run = [
        "--config", "moco_ring", "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "card.pth"),
        "--workdir", str(tmp_path / "work"), "--no-progress", "--threads", "1",
        "data.workers=1", "data.synthetic_classes=4", "data.synthetic_images_per_class=4",
        "data.synthetic_image_size=16", "moco.queue_size=16", "loss.w_outer=0.5", "loss.w_inner=0.25",
        "knn.max_train=16", "knn.max_test=8", "knn.k=5", "train.log_every=1",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args, *run],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # process 0 reports the card
    card = load_card(tmp_path / "card.pth")
    assert card.meta["method"] == "moco" and card.meta["epochs"] == 2 and card.meta["knn_top1"] is not None
    lines = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line.get("step")) for line in lines] == [(e, s) for e in (1, 2) for s in (1, 2, None)]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [".lock", "checkpoint.pth", "log.jsonl"]
    from transfer.checkpoints import load_backbone

    assert load_backbone(tmp_path / "card.pth").build_model()(torch.zeros(1, 3, 16, 16)).shape == (1, 512)
