"""Engine command-line flags, generated from EngineConfig's fields.

Every field of EngineConfig is a flag (`max_num_seqs` -> `--max-num-seqs`, booleans as
`--enable-x / --no-enable-x`), with the field's default and help text, so a new engine knob is
reachable from `forkllm generate | chat | serve | bench | solve | eval` the moment it exists and
its default is written once. Commands import this module; nothing imports cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from forkllm.engine.config import EngineConfig

_SIZE_FIELDS = {"kv_cache_memory", "speculative_draft_kv_memory"}  # "4GiB" strings, parsed by EngineConfig


def _scalar_type(annotation: Any) -> type | None:
    """int / float / str for a field annotation like `int | None`; None for bool or mixed types."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = tuple(a for a in args if a is not type(None))
        return args[0] if len(args) == 1 and args[0] in (int, float, str) else None
    return annotation if annotation in (int, float, str) else None


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = False) -> None:
    """Add one flag per EngineConfig field (the model as a positional argument if asked)."""
    hints = typing.get_type_hints(EngineConfig)
    g = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        help_text = f.metadata.get("help", "")
        if f.name == "model":
            if positional_model:
                g.add_argument("model", nargs="?", default=None, help=help_text)
            else:
                g.add_argument("--model", "-m", default=None, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        typ = str if f.name in _SIZE_FIELDS else _scalar_type(kind)
        if typ is None:
            raise TypeError(f"EngineConfig.{f.name}: no command-line type for {kind!r}")
        g.add_argument(flag, type=typ, default=f.default, choices=f.metadata.get("choices"), help=help_text)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields present on a parsed namespace."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    return EngineConfig(**{**engine_kwargs(args), **overrides})
