"""onnxruntime sessions for any model artifact onnxpress reads.

Every part of onnxpress that runs a model goes through :func:`load_session`, so a new
artifact format (a packed ``.onnxz``, say) is supported everywhere by teaching this one place.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from onnxpress.errors import InputError
from onnxpress.packing.limits import Limits
from onnxpress.packing.unpack import is_packed, packed_session


def session_options(threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """Session options with ``threads`` intra-op threads (onnxruntime's default when None).

    ``spinning=False`` stops idle intra-op threads from busy-waiting for work; two sessions
    that take turns (a validation) otherwise steal each other's cores.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_session(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    limits: Limits | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model file.

    Args:
        path: A ``.onnx`` file (external data beside it is found by onnxruntime), or a
            packed ``.onnxz``, which is decoded in memory (no temporary file below 2 GB).
        threads: Intra-op threads; onnxruntime's default when None.
        spinning: Let idle intra-op threads spin (fastest for one session at a time).
        limits: What a packed file may declare before it is decoded (decompression-bomb
            guard); :data:`onnxpress.packing.DEFAULT_LIMITS` when None.

    Raises:
        InputError: The file is missing, a packed file is unsafe, corrupt or truncated, or
            onnxruntime cannot load the model.
    """
    path = Path(path)
    if is_packed(path):  # a missing or unreadable .onnxz is reported by the reader
        try:
            return packed_session(
                path, session_options(threads, spinning=spinning), ["CPUExecutionProvider"], limits=limits
            )
        except InputError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(f"{path}: onnxruntime cannot load the packed model: {exc}") from exc
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        return ort.InferenceSession(
            str(path), session_options(threads, spinning=spinning), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
