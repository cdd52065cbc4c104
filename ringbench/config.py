"""Configuration, one system for every stage: OmegaConf structured configs.

A schema is a dataclass (every key, its type and its default). A config is the schema's defaults,
then mappings (YAML files, profiles, command-line flags) merged over them in order, then
``key=value`` overrides (OmegaConf's dotlist grammar: ``train.epochs=5``, ``loss.num_samples=null``,
``optim.milestones=[0.5,0.8]``). A key the schema does not have, or a value of the wrong type, is a
:class:`UserError` of one line that names the key and where it came from. The result is plain
Python (dicts, lists, numbers, strings), ready for JSON and for the hash of a record's identity.

Shipped configs live in ``configs/`` of the checkout and ship as package data
(``ringbench/configs`` in an installed wheel); :func:`find_config` names them without a path.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ringbench.errors import UserError

Layer = tuple[str, Mapping[str, Any]]  # (where it came from, its values)

# The most nodes a YAML document may expand to once its aliases are followed. Configs and plans have hundreds;
# a document of nested aliases (the "billion laughs" shape) expands to billions from a few lines.
MAX_YAML_NODES = 100_000


def _expanded_nodes(root: yaml.Node) -> int:
    """How many nodes ``root`` stands for with every alias expanded (an alias is the node it names, shared
    by PyYAML's composer): computed once per distinct node, stopping at :data:`MAX_YAML_NODES`; a node that
    contains itself counts as unbounded."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            if isinstance(node, yaml.MappingNode):
                kids = [n for pair in node.value for n in pair]
            else:
                kids = list(node.value)
            sizes[key] = min(1 + sum(sizes[id(k)] for k in kids), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            return MAX_YAML_NODES + 1  # a recursive alias
        if not isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            sizes[key] = 1
            continue
        open_nodes.add(key)
        stack.append((node, True))
        kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        stack.extend((kid, False) for kid in kids if id(kid) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing in one line a document whose aliases expand past
    :data:`MAX_YAML_NODES` nodes (every YAML the suite reads from a user comes through here)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node) > MAX_YAML_NODES:
            raise UserError(
                f"{where}: the YAML document expands to more than {MAX_YAML_NODES:,} values through its aliases "
                "(nested '*' references); write the values out"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (configs, plans, settings); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        data = load_yaml(path.read_bytes().decode("utf-8"), str(path)) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:160]})") from exc
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    return dict(data)


def compose(schema: type, layers: Iterable[Layer] = (), overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``schema``'s defaults <- each layer in order <- ``key=value`` overrides, as plain Python."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(schema)
    for source, data in layers:
        _merge(cfg, dict(data), source, schema)
    for item in overrides:
        _merge(cfg, parse_override(item), f"override {item!r}", schema)
    plain = typing.cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    check_values(schema, plain)
    return plain


# --- value ranges --------------------------------------------------------------------------------
# A range is ``(low, high)``: a number is an inclusive bound, a 1-tuple ``(x,)`` an exclusive one,
# None no bound. Schema fields declare theirs as ``metadata={"range": (low, high)}``.


def check_range(name: str, value: Any, low: Any = None, high: Any = None) -> None:
    """``value`` is a number within ``[low, high]`` (see above), else a :class:`UserError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _within(value, low, high):
        raise UserError(f"{name} must be {_interval(low, high)}, got {value!r}")


def check_values(schema: type, cfg: Mapping[str, Any], prefix: str = "") -> None:
    """Every float of a composed config is finite, and every field with a declared ``range`` is in it."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value, name = cfg.get(f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(_scalar_type(hints[f.name])) and isinstance(value, Mapping):
            check_values(_scalar_type(hints[f.name]), value, name + ".")
            continue
        floats = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in floats):
            raise UserError(f"config: {name} must be finite, got {value!r}")
        if "range" in f.metadata and value is not None:
            check_range(_flag_or_key(f.name, prefix), value, *f.metadata["range"])


def _flag_or_key(name: str, prefix: str) -> str:
    """How a value is named in messages: the flag of a flat settings schema, else the dotted key."""
    return f"config: {prefix}{name}" if prefix else f"--{name.replace('_', '-')}"


def _within(value: float, low: Any, high: Any) -> bool:
    for bound, above in ((low, True), (high, False)):
        if bound is None:
            continue
        edge = bound[0] if isinstance(bound, tuple) else bound
        if (value < edge) if above else (value > edge):
            return False
        if isinstance(bound, tuple) and value == edge:
            return False
    return True


def _interval(low: Any, high: Any) -> str:
    """The range in words: ``at least 1``, ``> 0``, ``in [0, 1)``."""
    if high is None and low is not None:
        return f"> {low[0]}" if isinstance(low, tuple) else f"at least {low}"
    left = "(-inf" if low is None else (f"({low[0]}" if isinstance(low, tuple) else f"[{low}")
    right = "inf)" if high is None else (f"{high[0]})" if isinstance(high, tuple) else f"{high}]")
    return f"in {left}, {right}"


def parse_override(item: str) -> dict[str, Any]:
    """``a.b=value`` as the nested mapping ``{"a": {"b": value}}`` (value in OmegaConf's grammar)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
    try:
        load_yaml(value, f"override {item!r}")  # OmegaConf reads the value as YAML: bounded first
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise UserError(f"override {item!r}: value cannot be parsed ({_reason(exc)})") from exc
    return typing.cast(dict[str, Any], parsed)


def _merge(cfg: Any, data: dict[str, Any], source: str, schema: type) -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    try:
        cfg.merge_with(OmegaConf.create(data))
    except ConfigKeyError as exc:
        key = str(exc.full_key or exc.key)
        known = _siblings(cfg, key, exc.object_type)
        raise UserError(f"{source}: unknown config key {key!r}; known keys here: {known}") from exc
    except ValidationError as exc:
        key = str(exc.full_key or "")
        if not key:
            raise UserError(f"{source}: {_reason(exc)}") from exc
        raise UserError(f"{source}: {key!r} must be {_expected(schema, key)}, got {exc.value!r}") from exc
    except OmegaConfBaseException as exc:
        raise UserError(f"{source}: {_reason(exc)}") from exc


def _siblings(cfg: Any, key: str, section: Any = None) -> list[str]:
    """The keys beside an unknown key: the fields of the schema section it was found in (for an entry of a list
    of sections the error's key has no path to follow), else those of its dotted parent."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, type) and dataclasses.is_dataclass(section):
        return sorted(f.name for f in dataclasses.fields(section))

    parent = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _expected(schema: type, key: str) -> str:
    """What the schema's field at a dotted key holds, in words: ``an int``, ``a list of float``."""
    hint: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint):
            return "of another type"
        hint = typing.get_type_hints(hint).get(part)
    hint = _scalar_type(hint)
    if typing.get_origin(hint) in (list, list):
        inner = typing.get_args(hint)
        return f"a list of {getattr(inner[0], '__name__', inner[0])}" if inner else "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    name = getattr(hint, "__name__", str(hint))
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "problem", None) or getattr(exc, "msg", None) or exc)
    return " ".join(text.splitlines()[0].split())[:200]


# --- command-line flags from a schema ------------------------------------------------------------


def add_schema_flags(
    parser: argparse.ArgumentParser, schema: type, title: str, prefix: str = ""
) -> argparse._ArgumentGroup | None:
    """Add one ``--flag`` per field of ``schema`` (a flat dataclass) as one argument group.

    The flag is the field's name with dashes (``episode_seed`` -> ``--episode-seed``, after
    ``prefix``); its help is ``metadata["help"]``; every flag defaults to ``None`` so that a flag
    the user gave is told apart from the schema's default. Returns the group, or None (adding
    nothing) when the flags are already there (several tasks of a family share one group).
    """
    fields = dataclasses.fields(schema)
    first = "--" + prefix + fields[0].name.replace("_", "-")
    if first in parser._option_string_actions:
        return None
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(schema)
    for f in fields:
        flag = "--" + prefix + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
            continue
        shown = text if default is None else f"{text} (default: {default})"
        group.add_argument(flag, dest=f.name, type=kind, default=None, help=shown, metavar=f.metadata.get("metavar"))
    return group


def given_flags(args: argparse.Namespace, schema: type) -> dict[str, Any]:
    """The schema's settings the user gave on the command line (flags left at ``None`` are not)."""
    return {
        f.name: getattr(args, f.name) for f in dataclasses.fields(schema) if getattr(args, f.name, None) is not None
    }


def settings_from_args(
    args: argparse.Namespace,
    schema: type,
    config_file: str | os.PathLike | None = None,
    flag: str = "--config",
    kind: str | None = None,
) -> dict[str, Any]:
    """A flat schema's settings: command-line flags over a YAML file's values over the defaults.

    ``config_file`` is a path or, with ``kind``, the name of a shipped config (``configs/<kind>/``).
    """
    layers: list[Layer] = []
    if config_file:
        try:
            path = find_config(config_file, kind, "settings file") if kind else Path(config_file)
            layers.append((f"{flag} {path}", read_yaml_mapping(path, "settings file")))
        except UserError as exc:
            raise UserError(f"{flag} {exc}") from exc
    layers.append(("command line", given_flags(args, schema)))
    return compose(schema, layers)


def _scalar_type(hint: Any) -> Any:
    """``Optional[int]`` -> ``int``; anything else as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


# --- shipped configs -----------------------------------------------------------------------------


def config_root() -> Path:
    """The folder of the shipped configs: the installed package data (``ringbench/configs``), else
    the checkout's ``configs/`` beside this package."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def find_config(name: str | os.PathLike, kind: str, what: str = "config file") -> Path:
    """A config by path, or a shipped one by name, subfolders included (``moco_ring`` ->
    ``configs/<kind>/moco_ring.yaml``, ``official/moco_ring_cifar10`` -> ``configs/<kind>/official/...``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    text = str(name).replace(os.sep, "/")
    if not path.is_absolute() and ".." not in text.split("/"):
        shipped = config_root() / kind / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
        if shipped.is_file():
            return shipped
        root = config_root() / kind
        available = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
        raise UserError(f"{name}: {what} not found (as a path, or shipped in configs/{kind}/: {available})")
    raise UserError(f"{path}: {what} not found")
