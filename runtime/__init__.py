"""Runtime: batch inference and validation on onnxruntime.

* :class:`BatchRunner` runs a model over a dataset in batches, writing resumable shards.
* :func:`validate` compares a candidate model with its reference and returns a
  :class:`ValidationReport` (``.passed``, ``.outputs[name].mean_cosine``, ``.to_dict()``).
* :func:`localize` ranks nodes by the error the candidate adds at each (:class:`NodeError`).

The names are imported on first use (PEP 562), so running a model does not load what
validation needs (onnx-ir among it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxpress.lazy import exports

if TYPE_CHECKING:
    from onnxpress.runtime.localize import NodeError, localize
    from onnxpress.runtime.runner import BatchRunner, RunResult
    from onnxpress.runtime.validate import Tolerances, ValidationReport, validate

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "BatchRunner": "onnxpress.runtime.runner",
    "NodeError": "onnxpress.runtime.localize",
    "RunResult": "onnxpress.runtime.runner",
    "Tolerances": "onnxpress.runtime.validate",
    "ValidationReport": "onnxpress.runtime.validate",
    "localize": "onnxpress.runtime.localize",
    "validate": "onnxpress.runtime.validate",
}

__all__ = ["BatchRunner", "NodeError", "RunResult", "Tolerances", "ValidationReport", "localize", "validate"]

__getattr__, __dir__ = exports(__name__, _EXPORTS)
