"""Why Hydra refused an override, in one line that names the fix.

Hydra's own messages are correct but read like a stack trace ("Error merging override ...",
"ReadonlyConfigError raised while composing ..."). After a failed composition the overrides are
checked one by one against ``conf/`` (group options) and the schema dataclasses
(:mod:`server.config.schema`: keys and their types), and the first one at fault is explained.
Imports no torch, Flower or MLflow.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from .schema import ExperimentConfig


def explain_override(overrides: list[str], conf_dir: Path, schema: DictConfig) -> str | None:
    """The first override at fault, explained; ``None`` when none of them is (then the fault
    is elsewhere, e.g. a YAML file under ``conf/``).

    Parameters
    ----------
    overrides
        Hydra overrides as typed on the command line (``strategy=fedavg``, ``train.lr=0.1``).
    conf_dir
        The config directory; its sub-directories are the config groups.
    schema
        A writable copy of the experiment schema node (values are tried on it).
    """
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OmegaConfBaseException:
        return None
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors: its message is the best
        return str(err).strip().splitlines()[0]
    # Nested groups too (data/layout): a sub-directory of a group is a group of its own.
    groups = sorted(p.relative_to(conf_dir).as_posix() for p in conf_dir.rglob("*")
                    if p.is_dir())
    for override, text in zip(parsed, overrides):
        if override.is_delete() or override.is_sweep_override() or override.package:
            continue
        key = override.key_or_group
        if key in groups:
            reason = _group_option(key, override.value(), conf_dir, text)
        else:
            reason = _schema_key(key, override.value(), schema, groups, text)
        if reason:
            return reason
    return None


def _group_option(group: str, option: Any, conf_dir: Path, text: str) -> str | None:
    """``group=option`` where ``conf/<group>/<option>.yaml`` does not exist."""
    if not isinstance(option, str) or (conf_dir / group / f"{option}.yaml").is_file():
        return None
    valid = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    if "/" in option or option.endswith((".yaml", ".yml")):     # a file, not an option name
        path = Path(option)
        return (f"{text}: config group '{group}' takes an option name, not a file; copy "
                f"{option} to conf/{group}/{path.stem}.yaml (or add hydra.searchpath="
                f"[file://{path.parent.resolve()}] with it in {path.parent / group}/) and use "
                f"{group}={path.stem}")
    return (f"{text}: config group '{group}' has no option {option!r}; valid options: "
            f"{', '.join(valid)}. Fix: {group}=<one of these>, or add "
            f"conf/{group}/{option}.yaml")


def _schema_key(key: str, value: Any, schema: DictConfig, groups: list[str],
                text: str) -> str | None:
    """``a.b=value``: an unknown key (listing the valid ones) or a value of the wrong type."""
    cls: Any = ExperimentConfig
    path: list[str] = []
    for part in key.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(path) or "the experiment"
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            extra = f"; config groups: {', '.join(groups)}" if not path else ""
            return (f"{text}: {where} has no key {part!r}; valid keys: {valid}{extra}. "
                    f"Fix: check the spelling (schema: {cls.__name__} in "
                    f"{_schema_file(cls)})")
        path.append(part)
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            break
    if len(path) < len(key.split(".")) or dataclasses.is_dataclass(cls):
        return None          # inside a free-form mapping (``*.options``), or a whole group
    try:
        OmegaConf.update(schema, key, value, merge=True)
    except ValidationError:
        expected = _type_name(cls)
        return (f"{text}: {key} expects {expected}, got {value!r}. "
                f"Fix: {key}=<{expected}>")
    except OmegaConfBaseException:
        return None
    return None


def _schema_file(cls: type) -> str:
    return cls.__module__.replace(".", "/") + ".py"


def _type_name(tp: Any) -> str:
    """``int``, ``float or null``, ``list of str``, ``mapping`` - as an operator types it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return " or ".join(names + (["null"] if nullable else []))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))
