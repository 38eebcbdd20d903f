r"""codebook: k-means weight sharing, decoded inside the graph so any ONNX runtime runs it.

Each float weight (or each group of ``rows_per_codebook`` rows of its first axis) is replaced
by ``k = 2**bits`` shared values (the codebook ``c``) and, per element, the index of its value:

.. math::

    \min_{c,\, a} \sum_i (w_i - c_{a_i})^2, \qquad \hat w_i = c_{a_i}

solved by Lloyd's algorithm in one dimension: assign each value to its nearest centroid (a
binary search over the midpoints of the sorted codebook), move each centroid to the mean of
its values, repeat. The codebook starts as the uniform grid ``linspace(min w, max w, k)``, and
a Lloyd step never increases the squared error, so the result is never worse than uniform
``bits``-bit quantization of the same tensor; every element is within half the widest gap
between neighbouring centroids of its value (or of the outermost centroid when beyond it).

Storage: indices are packed ``8 / bits`` to a byte when ``bits`` divides 8 (2 and 4 bits),
otherwise one per byte (``uint8``); codebooks are float32. Decoding is plain ONNX (opset 13):
``Cast`` the packed bytes to int32, ``Div``/``Mod`` by powers of two to unpack, ``Reshape``,
then ``GatherElements`` from the codebook rows and ``Reshape`` to the weight's shape. The
decoded weight is a constant expression, so runtimes that fold constants pay for it once, at
load time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress.graphs import graph_likes
from onnxpress.passes.base import Needs, OnnxpressPass, option
from onnxpress.passes.quant_common import NodeFilter, check_exclusions
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodebookConfig:
    """Options of codebook."""

    bits: int = option(4, "bits per index: 2 to 8 (a codebook of 2**bits values)")
    rows_per_codebook: int = option(0, "rows of the first axis that share a codebook (0: one per tensor)")
    iterations: int = option(25, "Lloyd iterations at most (stops earlier when assignments settle)")
    min_elements: int = option(4096, "leave weights smaller than this in float")
    op_types: tuple[str, ...] = option(("MatMul", "Gemm", "Conv", "Gather"), "weights read by these op types")
    exclude_nodes: tuple[str, ...] = option((), "node names or globs whose weights stay float")
    exclude_op_types: tuple[str, ...] = option((), "op types whose weights stay float")

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be within 2..8, got {self.bits}")
        if self.rows_per_codebook < 0 or self.iterations < 1 or self.min_elements < 0:
            raise ValueError("rows_per_codebook and min_elements must be >= 0, iterations >= 1")


def kmeans_1d(values: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on a flat array, started from the uniform grid.

    Returns:
        ``(codebook, indices)``: ``codebook`` float32 ``[k]`` sorted ascending, ``indices``
        uint8 with ``codebook[indices]`` the reconstruction of ``values``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    centroids = np.linspace(lo, hi, k) if hi > lo else np.full(k, lo)
    indices = np.zeros(x.size, dtype=np.int64)
    for _ in range(iterations):
        mids = (centroids[1:] + centroids[:-1]) / 2
        new = np.searchsorted(mids, x)
        settled = np.array_equal(new, indices)
        indices = new
        sums = np.bincount(indices, weights=x, minlength=k)
        counts = np.bincount(indices, minlength=k)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)  # empty: keep
        centroids = np.sort(centroids)
        if settled:
            break
    mids = (centroids[1:] + centroids[:-1]) / 2
    indices = np.searchsorted(mids, x)
    return centroids.astype(np.float32), indices.astype(np.uint8)


def pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """Packs ``8 // bits`` indices per byte (little end first) when ``bits`` divides 8."""
    if 8 % bits:
        return indices.astype(np.uint8)
    per = 8 // bits
    flat = indices.astype(np.uint16).ravel()
    flat = np.concatenate([flat, np.zeros((-flat.size) % per, np.uint16)]).reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint16) * bits)
    return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8)


def encode(weight: np.ndarray, config: CodebookConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(codebooks [G, k], indices [G, M])`` for a weight split into G row groups."""
    k = 2**config.bits
    rows = weight.shape[0] if weight.ndim else 1
    per = config.rows_per_codebook or rows
    if rows % per:
        per = rows  # uneven groups: one codebook for the tensor
    groups = weight.reshape(rows // per, -1)
    books = np.empty((groups.shape[0], k), np.float32)
    codes = np.empty(groups.shape, np.uint8)
    for g, values in enumerate(groups):
        books[g], codes[g] = kmeans_1d(values, k, config.iterations)
    return books, codes


class _Rewriter:
    def __init__(self, graph: ir.Graph, config: CodebookConfig) -> None:
        self.graph = graph
        self.config = config
        self.nodes: list[ir.Node] = []

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], attributes: dict | None = None, *, name: str) -> ir.Value:
        node = ir.node(op_type, inputs, attributes or {}, name=name)
        self.nodes.append(node)
        return node.outputs[0]

    def decode(self, base: str, weight: np.ndarray, books: np.ndarray, codes: np.ndarray) -> ir.Value:
        bits = self.config.bits
        groups, count = codes.shape
        book = self.const(books, f"{base}_codebook")
        packed = self.const(pack(codes, bits), f"{base}_codes")
        flat = self.op("Cast", [packed], {"to": ir.DataType.INT32}, name=f"{base}/codes_int32")
        if 8 % bits == 0 and bits < 8:
            per = 8 // bits
            powers = self.const((2 ** (np.arange(per) * bits)).astype(np.int32).reshape(1, per), f"{base}_powers")
            column = self.op("Unsqueeze", [flat, self.const(np.array([1], np.int64), f"{base}_axis1")], name=f"{base}/column")
            shifted = self.op("Div", [column, powers], name=f"{base}/shift")
            digits = self.op("Mod", [shifted, self.const(np.array(2**bits, np.int32), f"{base}_modulus")], name=f"{base}/unpack")
            flat = self.op("Reshape", [digits, self.const(np.array([-1], np.int64), f"{base}_flat")], name=f"{base}/flatten")
            flat = self.op("Slice", [flat, self.const(np.array([0], np.int64), f"{base}_start"),
                                     self.const(np.array([groups * count], np.int64), f"{base}_stop")], name=f"{base}/trim")
        grid = self.op("Reshape", [flat, self.const(np.array([groups, count], np.int64), f"{base}_grid")], name=f"{base}/grid")
        values = self.op("GatherElements", [book, self.op("Cast", [grid], {"to": ir.DataType.INT64}, name=f"{base}/index")],
                         {"axis": 1}, name=f"{base}/lookup")
        return self.op("Reshape", [values, self.const(np.array(weight.shape, np.int64), f"{base}_shape")], name=f"{base}/decoded")


@register
class CodebookPass(OnnxpressPass):
    """k-means weight sharing (2-8 bits): index tensor + float codebook, decoded in the graph."""

    name = "codebook"
    Config = CodebookConfig
    needs = Needs(min_opset=13)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config: CodebookConfig = self.config
        node_filter = NodeFilter(config.exclude_nodes, config.exclude_op_types)
        check_exclusions(model, node_filter, self.name)
        count = 0
        bytes_before = bytes_after = 0
        worst = 0.0
        for graph in graph_likes(model):
            if not isinstance(graph, ir.Graph):
                continue  # functions hold Constant nodes, not initializers: left as they are
            for name, value in list(graph.initializers.items()):
                tensor = value.const_value
                if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < max(config.min_elements, 1):
                    continue
                if value.is_graph_input() or value.is_graph_output():
                    continue
                users = [u.node for u in value.uses()]
                if not users or any(
                    u.graph is not graph
                    or u.op_type not in config.op_types or u.domain not in ("", "ai.onnx") or node_filter.excludes(u)
                    for u in users
                ):
                    continue
                weight = tensor.numpy()
                books, codes = encode(weight, config)
                decoded_check = np.take_along_axis(books, codes.astype(np.int64), axis=1).reshape(weight.shape)
                worst = max(worst, float(np.abs(decoded_check - weight).max()))
                rewriter = _Rewriter(graph, config)
                base = name or "weight"
                decoded = rewriter.decode(base, weight, books, codes)
                first = min(users, key=graph.index)
                graph.insert_before(first, rewriter.nodes)
                ir.convenience.replace_all_uses_with(value, decoded)
                del graph.initializers[name]
                count += 1
                bytes_before += weight.nbytes
                bytes_after += books.nbytes + pack(codes, config.bits).nbytes
        self.details = {"tensors": count, "bytes_before": bytes_before, "bytes_after": bytes_after,
                        "max_abs_error": worst}
        logger.info("codebook: %d tensors at %d bits, %d -> %d bytes", count, config.bits, bytes_before, bytes_after)
        return ir.passes.PassResult(model, modified=bool(count))
