"""Refuse keys the schema does not have. Hydra's `+key=value` adds a key even under a typed node, and OmegaConf then
keeps it as a stray attribute that nothing reads: `+train.lerning_rate=1e-3` would run silently with the default."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from sft_exp.errors import ConfigError


def check_known_keys(node: Any, schema: type, where: str = "") -> None:
    """Raise ConfigError for the first key of `node` (a DictConfig or dict) that `schema` (a dataclass) has no field
    for, naming the closest valid names. Fields typed as dicts (`extra`, `sources`, `deepspeed`, ...) are open maps;
    a dict of dataclasses (mixture.sources) is checked entry by entry."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in list(node.keys()):
        key = str(key)
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f"Did you mean {' or '.join(close)}?" if close else f"Valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{path}: not a key of the {where or 'run'} config. {hint}")
        value = node[key]
        sub = _dataclass_of(hints.get(key))
        if sub is not None and hasattr(value, "keys"):
            check_known_keys(value, sub, path)
        item = _dict_value_dataclass(hints.get(key))
        if item is not None and hasattr(value, "keys"):
            for name in value.keys():
                if hasattr(value[name], "keys"):
                    check_known_keys(value[name], item, f"{path}.{name}")


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (itself, or inside Optional), None for anything else (dicts included)."""
    if typing.get_origin(hint) in (dict, list):
        return None
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _dict_value_dataclass(hint: Any) -> type | None:
    if typing.get_origin(hint) in (dict, typing.Dict):  # noqa: UP006
        args = typing.get_args(hint)
        if len(args) == 2:
            return _dataclass_of(args[1])
    return None
