"""What the quantization passes share: exclusions, weight quantizers, and the onnxruntime edge.

Exclusions. Every quantization pass takes ``exclude_nodes`` (node names or shell-style globs,
``encoder.layer.*.output.*``) and ``exclude_op_types`` (``Conv``, ``com.microsoft::Attention``);
:class:`NodeFilter` answers "may this node be quantized?" for all of them the same way.

Weight quantizers (symmetric, round to nearest). For a weight ``W`` quantized along an axis
with ``b`` bits, each slice ``W_c`` gets the scale ``s_c = max|W_c| / q_max`` with
``q_max = 2**(b-1) - 1`` and is stored as ``q = clip(round(W_c / s_c), -q_max, q_max)``; it reads
back as ``q * s_c``, so the error of every element is at most ``s_c / 2``.

The onnxruntime edge. onnxruntime's quantizers read and write ``onnx.ModelProto`` files, so the
passes that use them (static QDQ, MatMulNBits) cross over here: :func:`to_proto_file` writes the
onnx_ir model (with external data when it is large, so no protobuf above 2 GB is ever built)
and :func:`adopt` moves the quantized model's graph back into the caller's model object, which
keeps the passes in place as the pipeline expects.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxpress.graphs import all_nodes, constant_value
from onnxpress.model_io import constant_bytes

logger = logging.getLogger(__name__)

#: Above this many constant bytes the model crosses the onnxruntime edge with external data.
EXTERNAL_EDGE_BYTES = 1 << 30


@dataclass(frozen=True)
class NodeFilter:
    """Which nodes a quantization pass must leave alone.

    Attributes:
        nodes: Node names or shell-style globs (``*``, ``?``, ``[..]``).
        op_types: Op types, either plain (``MatMul``) or with a domain
            (``com.microsoft::MatMulNBits``).
    """

    nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    def excludes(self, node: ir.Node) -> bool:
        """Whether ``node`` is excluded by name, glob or op type."""
        qualified = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        if node.op_type in self.op_types or qualified in self.op_types:
            return True
        name = node.name or ""
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in self.nodes)

    def excluded_names(self, model: ir.Model) -> list[str]:
        """Names of the model's nodes that the filter excludes (for reports and ORT's lists)."""
        return [n.name for n in all_nodes(model) if n.name and self.excludes(n)]

    def unmatched(self, model: ir.Model) -> list[str]:
        """Patterns that match no node name: most likely typos, which the passes warn about."""
        names = [n.name or "" for n in all_nodes(model)]
        return [p for p in self.nodes if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]


def check_exclusions(model: ir.Model, node_filter: NodeFilter, pass_name: str) -> None:
    """Logs a warning for each exclusion pattern that matches no node."""
    for pattern in node_filter.unmatched(model):
        logger.warning("%s: exclusion %r matches no node name", pass_name, pattern)


def quantize_symmetric(
    weights: np.ndarray, bits: int, axis: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest quantization of ``weights`` to signed ``bits``-bit integers.

    Args:
        weights: A float array.
        bits: 2 to 8.
        axis: The axis whose slices get their own scale (per channel / per row); None gives
            one scale for the whole tensor.

    Returns:
        ``(q, scale)``: ``q`` int8 of the same shape; ``scale`` float32, of the shape of
        ``weights`` with every axis but ``axis`` reduced to 1 (a 0-d array when ``axis`` is
        None). ``q * scale`` approximates ``weights`` within ``scale / 2`` per element.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be within 2..8, got {bits}")
    q_max = float(2 ** (bits - 1) - 1)
    w = np.asarray(weights, dtype=np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
    else:
        axis = axis % w.ndim
        reduce = tuple(a for a in range(w.ndim) if a != axis)
        amax = np.abs(w).max(axis=reduce, keepdims=True) if w.size else np.zeros([1] * w.ndim, np.float32)
    scale = (amax / q_max).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -q_max, q_max).astype(np.int8)
    return q, scale


def float_weight(value: ir.Value | None, min_elements: int = 0) -> np.ndarray | None:
    """The float32 array a constant input holds, or None when it is not a float32 constant."""
    tensor = constant_value(value)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT:
        return None
    if tensor.size < max(min_elements, 1):
        return None
    return tensor.numpy()


def opset_of(model: ir.Model) -> int:
    """The model's default-domain opset."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def to_proto_file(model: ir.Model, folder: str | os.PathLike[str], name: str = "model.onnx") -> Path:
    """Writes ``model`` into ``folder`` for a file-based tool; large models get external data."""
    path = Path(folder) / name
    if constant_bytes(model) > EXTERNAL_EDGE_BYTES:
        ir.save(model, path, external_data=name + ".data", size_threshold_bytes=1024)
    else:
        from onnxpress.model_io import _save_inlined

        _save_inlined(model, path)
    return path


def adopt(model: ir.Model, quantized: ir.Model) -> None:
    """Moves ``quantized``'s graph, opsets and functions into ``model`` (the object stays)."""
    model.graph = quantized.graph
    model.ir_version = max(model.ir_version, quantized.ir_version)
    model.functions.clear()
    model.functions.update(quantized.functions)


def load_for_adopt(path: Path) -> ir.Model:
    """Loads a tool's output fully into memory, so its folder can be deleted afterwards."""
    loaded = ir.load(path)
    for value in loaded.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    return loaded


def names_in(model: ir.Model, names: Iterable[str]) -> list[str]:
    """The given names that are node names of ``model``, in the model's order."""
    wanted = set(names)
    return [n.name for n in all_nodes(model) if n.name in wanted]


def wants_auto_exclude(setting: bool | None, calibration: object | None) -> bool:
    """``auto_exclude: true`` always searches; ``null`` searches only when calibration data is given."""
    return bool(setting) or (setting is None and calibration is not None)
