"""onnxruntime sessions for any model artifact onnxpress reads.

Every part of onnxpress that runs a model goes through :func:`load_session`, so a new
artifact format (a packed ``.onnxz``, say) is supported everywhere by teaching this one place.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from onnxpress.errors import InputError


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options with ``threads`` intra-op threads (onnxruntime's default when None)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def load_session(
    path: str | os.PathLike[str], *, threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model file.

    Args:
        path: A ``.onnx`` file (external data beside it is found by onnxruntime).
        threads: Intra-op threads; onnxruntime's default when None.

    Raises:
        InputError: The file is missing or onnxruntime cannot load it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        return ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
