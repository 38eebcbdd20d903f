"""Packages that import their public names on first use (onnxpress.lazy)."""

from __future__ import annotations

import importlib

import pytest

from conftest import python_stdout


@pytest.mark.parametrize("package", ["onnxpress", "onnxpress.runtime", "onnxpress.converters"])
def test_every_public_name_resolves_to_its_definition(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        source = getattr(module, "_EXPORTS", {}).get(name)
        if source is not None:
            assert value is getattr(importlib.import_module(source), name)
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name


def test_importing_the_package_loads_none_of_its_modules() -> None:
    code = (
        "import sys, onnxpress, onnxpress.runtime\n"
        "from onnxpress import load_session\n"  # a from-import goes through __getattr__ too
        "print(sorted(m for m in sys.modules if m.startswith('onnxpress.')))\n"
    )
    stdout = python_stdout(code)
    loaded = set(eval(stdout))  # our own printout of a list of names
    assert "onnxpress.sessions" in loaded
    assert not loaded & {"onnxpress.model_io", "onnxpress.pipeline", "onnxpress.runtime.validate"}


def test_a_function_named_like_its_submodule_stays_the_function() -> None:
    code = (
        "import importlib, onnxpress.runtime as r\n"
        "importlib.import_module('onnxpress.runtime.validate')\n"  # binds the submodule first
        "importlib.import_module('onnxpress.runtime.localize')\n"
        "print(callable(r.validate) and callable(r.localize), type(r.runner).__name__)\n"
    )
    stdout = python_stdout(code)
    assert stdout.split() == ["True", "module"]  # other submodules stay modules
