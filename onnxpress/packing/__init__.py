"""Lossless, entropy-coded ``.onnxz`` model artifacts: pack, unpack, and run them in memory.

    from onnxpress.packing import pack, unpack
    pack("model.onnx", "model.onnxz")              # smaller than zstd -19 of the .onnx
    unpack("model.onnxz", "again.onnx")            # byte-identical to model.onnx
    session = onnxpress.load_session("model.onnxz") # decoded in memory

The format is specified in ``docs/onnxz-format.md``.
"""

from __future__ import annotations

from onnxpress.packing.codecs import DEFAULT_LEVEL
from onnxpress.packing.format import FORMAT_VERSION, SUFFIX, Manifest
from onnxpress.packing.limits import DEFAULT_LIMITS, Limits
from onnxpress.packing.pack import DEFAULT_MIN_TENSOR_BYTES, PackReport, pack
from onnxpress.packing.unpack import (
    PackedModel,
    UnpackReport,
    is_packed,
    load_model_proto,
    load_packed_model,
    packed_session,
    unpack,
)

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_LIMITS",
    "DEFAULT_MIN_TENSOR_BYTES",
    "FORMAT_VERSION",
    "SUFFIX",
    "Limits",
    "Manifest",
    "PackReport",
    "PackedModel",
    "UnpackReport",
    "is_packed",
    "load_model_proto",
    "load_packed_model",
    "pack",
    "packed_session",
    "unpack",
]
