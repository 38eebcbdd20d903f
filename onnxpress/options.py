"""Turning recipe options into a pass's typed, frozen config, with errors that name the key.

Option values come from YAML, JSON or ``--set KEY=VALUE``; each is checked against the type
the ``Config`` dataclass declares (``bool``, ``int``, ``float``, ``str``, ``Literal``,
``tuple[...]`` and ``X | None``) before any pass runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from onnxpress.errors import RecipeError


def config_fields(config_cls: type) -> list[tuple[str, Any, Any, str]]:
    """``(name, type, default, help)`` for each field of a config dataclass."""
    hints = typing.get_type_hints(config_cls)
    return [
        (f.name, hints[f.name], f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(config_cls)
    ]


def type_name(tp: Any) -> str:
    """A readable name for a field type: ``int``, ``'a' | 'b'``, ``tuple[str, ...]``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against ``tp``; returns it in the config's form (lists become tuples).

    Raises:
        RecipeError: The value does not fit the type; the message names ``key``.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, key)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise RecipeError(f"{key}: expected one of {type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected {type_name(tp)}, got {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise RecipeError(f"{key}: options of type {tp!r} are not supported")
    raise RecipeError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def build_config(config_cls: type, options: Mapping[str, Any], key_prefix: str) -> Any:
    """Builds a frozen config from recipe options.

    Args:
        config_cls: The pass's ``Config`` dataclass.
        options: Option name -> value, as read from the recipe.
        key_prefix: Where the options sit in the recipe, e.g. ``steps[2].with``.

    Raises:
        RecipeError: An unknown option (the known ones are listed) or a mistyped value.
    """
    fields = {name: tp for name, tp, _, _ in config_fields(config_cls)}
    values = {}
    for name, value in options.items():
        if name not in fields:
            known = ", ".join(fields) or "none"
            raise RecipeError(f"{key_prefix}.{name}: unknown option (known options: {known})")
        values[name] = coerce(value, fields[name], f"{key_prefix}.{name}")
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{key_prefix}: {exc}") from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready view of a config (tuples become lists)."""
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
    }
