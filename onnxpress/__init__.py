"""onnxpress: convert trained models to ONNX, shrink them with graph passes, validate them.

The Python API mirrors the CLI::

    import onnxpress
    model = onnxpress.load_model("model.onnx")
    records = onnxpress.Pipeline.from_recipe(onnxpress.load_preset("lossless")).run(model)
    onnxpress.save_model(model, "small.onnx")

The names below are imported on first use (PEP 562): ``import onnxpress`` alone does not
load onnx-ir (0.6 s, most of it sympy), so a command that only runs or packs a model, and
``onnxpress --help``, start without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxpress.lazy import exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from onnxpress.model_io import load_model, save_model
    from onnxpress.pipeline import Pipeline, StepRecord
    from onnxpress.recipes import apply_overrides, load_preset, load_recipe
    from onnxpress.sessions import load_session

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "Pipeline": "onnxpress.pipeline",
    "StepRecord": "onnxpress.pipeline",
    "apply_overrides": "onnxpress.recipes",
    "load_model": "onnxpress.model_io",
    "load_preset": "onnxpress.recipes",
    "load_recipe": "onnxpress.recipes",
    "load_session": "onnxpress.sessions",
    "save_model": "onnxpress.model_io",
}

__all__ = [
    "Pipeline",
    "StepRecord",
    "__version__",
    "apply_overrides",
    "load_model",
    "load_preset",
    "load_recipe",
    "load_session",
    "save_model",
]

__getattr__, __dir__ = exports(__name__, _EXPORTS)
