"""onnxpress: convert trained models to ONNX, shrink them with graph passes, validate them.

The Python API mirrors the CLI::

    import onnxpress
    model = onnxpress.load_model("model.onnx")
    records = onnxpress.Pipeline.from_recipe(onnxpress.load_preset("lossless")).run(model)
    onnxpress.save_model(model, "small.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxpress.model_io import load_model, save_model
from onnxpress.pipeline import Pipeline, StepRecord
from onnxpress.recipes import apply_overrides, load_preset, load_recipe
from onnxpress.sessions import load_session

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
