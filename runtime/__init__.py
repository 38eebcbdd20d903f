"""Runtime: batch inference and validation on onnxruntime.

* :class:`BatchRunner` runs a model over a dataset in batches, writing resumable shards.
* :func:`validate` compares a candidate model with its reference and returns a
  :class:`ValidationReport` (``.passed``, ``.outputs[name].mean_cosine``, ``.to_dict()``).
* :func:`localize` ranks nodes by the error the candidate adds at each (:class:`NodeError`).
"""

from __future__ import annotations

from onnxpress.runtime.localize import NodeError, localize
from onnxpress.runtime.runner import BatchRunner, RunResult
from onnxpress.runtime.validate import Tolerances, ValidationReport, validate

__all__ = ["BatchRunner", "NodeError", "RunResult", "Tolerances", "ValidationReport", "localize", "validate"]
