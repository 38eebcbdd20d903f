"""The pass registry: kebab-case name -> pass class.

Pass modules are listed here and imported on first use, so adding a pass touches three
files: the pass, its test, and the ``_PASS_MODULES`` line below.
"""

from __future__ import annotations

import importlib

from onnxpress.passes.base import OnnxpressPass

_PASS_MODULES: tuple[str, ...] = (
    "prune_dead",
    "eliminate_noop",
    "fold_constants",
    "dedup_constants",
    "cse",
    "quantize_int8_dynamic",
    "quantize_int8_static",
    "quantize_int4_weights",
    "cast_fp16",
    "codebook",
    "prune_magnitude",
    "prune_channels",
)

_REGISTRY: dict[str, type[OnnxpressPass]] = {}
_loaded = False


def register(cls: type[OnnxpressPass]) -> type[OnnxpressPass]:
    """Class decorator that registers a pass under its ``name``."""
    if not cls.name or cls.name != cls.name.lower() or "_" in cls.name or " " in cls.name:
        raise ValueError(f"pass name {cls.name!r} of {cls.__name__} must be kebab-case")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes are registered as {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in _PASS_MODULES:
            importlib.import_module(f"onnxpress.passes.{module}")
        _loaded = True


def available_passes() -> dict[str, type[OnnxpressPass]]:
    """Every registered pass, by name, sorted."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[OnnxpressPass]:
    """The pass registered as ``name``.

    Raises:
        KeyError: No pass has that name; the message lists the known ones.
    """
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}"
        ) from None
