"""Package attributes imported on first use (PEP 562 module ``__getattr__``).

The packages' ``__init__`` modules name their public API through this, so that importing
one submodule (the CLI, the runner, the packed-model reader) does not import everything
beside it: onnx-ir alone costs 0.6 s, most of it sympy.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any


def exports(package: str, sources: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` serving ``sources`` (public name -> module).

    Usage, in a package's ``__init__``::

        __getattr__, __dir__ = exports(__name__, {"load_model": "onnxpress.model_io"})

    Each name is imported from its module on first access and then set on the package, so
    later accesses are plain attribute lookups.

    A function named like the submodule that defines it (``onnxpress.runtime.validate``)
    stays the package's attribute: importing a submodule binds it on its package, which
    would otherwise put the module where the function was, whichever imported first.
    """
    module = sys.modules[package]
    module.__class__ = _Package
    module._exported = frozenset(sources)  # type: ignore[attr-defined]

    def __getattr__(name: str) -> Any:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(sources))

    return __getattr__, __dir__


class _Package(types.ModuleType):
    """A package whose exported names win over its same-named submodules."""

    def __setattr__(self, name: str, value: Any) -> None:
        exported = self.__dict__.get("_exported", ())
        if name in exported and isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)  # the submodule's own function of that name
        super().__setattr__(name, value)
