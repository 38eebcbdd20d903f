r"""quantize-int8-dynamic: int8 weights, int8 activations quantized at run time.

Each ``MatMul`` / ``Gemm`` whose weight ``W`` (``[K, N]``) is a float constant computes in int8.
Weights are symmetric, one scale per output channel:

.. math::

    s_w[n] = \max_k |W_{kn}| / q_w, \quad \hat W = \mathrm{round}(W / s_w) \in [-q_w, q_w]

with ``q_w = 127`` (``63`` with ``reduce_range``). Activations are scaled at run time:

* ``activations: tensor`` (default): onnxruntime's ``DynamicQuantizeLinear`` (uint8, one scale
  and zero point per tensor), then ``MatMulInteger -> Cast -> Mul(s_x * s_w)``. This is the
  exact chain onnxruntime fuses into its ``DynamicQuantizeMatMul`` kernel, so it runs as fast
  as onnxruntime's own dynamic quantization.
* ``activations: row`` (or the nodes named in ``row_nodes``): one symmetric scale per row
  (token), ``s_x[r] = max_k |x_rk| / 127``; the rounded values are shifted by 128 into uint8
  and ``MatMulInteger`` takes the scalar zero point 128, so it runs onnxruntime's fast u8s8
  kernel; ``y = (x_q W_q) s_x[r] s_w[n]``. More accurate when single tokens carry outliers
  (on MiniLM the mean embedding cosine goes from 0.9926 to 0.9973), but the extra elementwise
  ops cost about as much as the int8 GEMM saves on a 2-core AVX2 machine.

Why not ``onnxruntime.quantization.quantize_dynamic`` as it is: its default (per-tensor
weights) leaves MiniLM-L6's mean embedding cosine at 0.957, and it quantizes embedding tables
with one scale for the whole table. Here weights are always per channel and embeddings per row.
On MiniLM, the remaining error sits in the FFN output projections (their GELU inputs reach 25
while most values are below 1); ``auto_exclude`` finds them (see below).

``reduce_range`` (7-bit weights, the default) matters on x86 CPUs without VNNI (this AVX2
machine): onnxruntime's u8s8 kernels add pairs of u8*s8 products in int16 (``vpmaddubsw``),
which saturates with full 8-bit weights. On a small random MLP the relative output error is
9% with 8-bit weights and 1.5% with 7-bit ones; on MiniLM (whose weights rarely reach the
pairs that saturate) 8-bit weights are slightly better (0.9926 against 0.9918), so the
preset keeps the safe default and lets ``auto_exclude`` recover the difference.

Embedding tables (``Gather`` on a constant ``[V, D]`` table, axis 0) are stored as int8 with
one scale per row, decoded after the lookup (``Gather`` of the int8 rows and of their scales,
``Cast``, ``Mul``), so only the looked-up rows are ever dequantized. ``Conv`` weights are stored
as int8 per output channel, read back by ``Cast`` and ``Mul`` (the convolution stays in float: int8
convolution with per-row scales has no standard op), and so are ``ConvTranspose`` weights (per input
channel, their first axis) and the ``W`` and ``R`` weights of
``LSTM``/``GRU``/``RNN``, one scale per gate row (a recurrent model otherwise did not shrink at all).

Excluded nodes (by name, glob or op type, or chosen by ``auto_exclude``) compute in float; with
``excluded_weights: int8`` their weights are still *stored* in 8 bits (per-channel
``Cast`` + ``Mul``, which onnxruntime folds into a float weight at load time; not
``DequantizeLinear``, which it would turn into a slower 8-bit ``MatMulNBits``), which keeps the
file small while the arithmetic stays float32.

``auto_exclude`` needs calibration batches: it quantizes, measures the mean cosine of every
float output against the original on those batches, and while it is below ``target_cosine``
asks :func:`onnxpress.runtime.localize` which quantized node adds the most error and keeps
that node in float, at most ``max_excluded`` times. The nodes it kept are in the pass details.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnxpress.passes.base import Needs, OnnxpressPass, option
from onnxpress.passes.quant_common import (
    NodeFilter,
    check_exclusions,
    float_weight,
    opset_of,
    quantize_symmetric,
    wants_auto_exclude,
)
from onnxpress.passes.registry import register

from onnxpress.graphs import graph_likes

logger = logging.getLogger(__name__)

GraphLike = ir.Graph | ir.Function


@dataclass(frozen=True)
class QuantizeInt8DynamicConfig:
    """Options of quantize-int8-dynamic."""

    op_types: tuple[str, ...] = option(
        ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN"),
        "op types to quantize (MatMul, Gemm, Gather, Conv, ConvTranspose, and the recurrent LSTM, GRU, RNN)",
    )
    activations: Literal["row", "tensor"] = option(
        "tensor", "activation scales computed at run time: one per tensor (fast) or one per row (token)"
    )
    row_nodes: tuple[str, ...] = option(
        (), "with activations: tensor, nodes (names, globs or op types) whose activations are scaled per row"
    )
    reduce_range: bool = option(True, "7-bit weights, so AVX2 u8s8 kernels cannot saturate")
    min_elements: int = option(256, "leave weights smaller than this many elements in float")
    exclude_nodes: tuple[str, ...] = option((), "node names or globs to keep in float")
    exclude_op_types: tuple[str, ...] = option((), "op types to keep in float")
    excluded_weights: Literal["float", "int8"] = option(
        "int8", "how excluded MatMul/Gemm weights are stored: float, or int8 read back before a float MatMul"
    )
    auto_exclude: bool | None = option(
        False, "keep the most harmful nodes out of quantization until target_cosine is met (needs calibration data); null: only when calibration data is given"
    )
    target_cosine: float = option(0.995, "auto_exclude's goal: mean cosine of every float output")
    max_excluded: int = option(12, "auto_exclude keeps at most this many nodes in float")
    calibration_batches: int = option(4, "auto_exclude measures on this many calibration batches")

    def __post_init__(self) -> None:
        unknown = set(self.op_types) - {"MatMul", "Gemm", "Gather", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN"}
        if unknown:
            raise ValueError(
                f"op_types: cannot quantize {sorted(unknown)}; choose from MatMul, Gemm, Gather, Conv, ConvTranspose, LSTM, GRU, RNN"
            )
        if self.min_elements < 0:
            raise ValueError(f"min_elements must be >= 0, got {self.min_elements}")
        if not 0.0 < self.target_cosine <= 1.0:
            raise ValueError(f"target_cosine must be within (0, 1], got {self.target_cosine}")
        if self.max_excluded < 0 or self.calibration_batches < 1:
            raise ValueError("max_excluded must be >= 0 and calibration_batches >= 1")


class _Builder:
    """Adds constants and nodes to one graph-like, in front of a given node."""

    def __init__(self, graph: GraphLike, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[ir.Node] = []

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        if isinstance(self.graph, ir.Graph):
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            self.graph.register_initializer(value)
            return value
        return self.op("Constant", [], {"value": tensor}, name=name)

    def op(self, op_type: str, inputs: list[ir.Value | None], attributes: dict | None = None, *, name: str) -> ir.Value:
        node = ir.node(op_type, inputs, attributes or {}, name=name)
        # Named now (``name`` is unique in the whole model): left unnamed, the serializer numbers
        # each graph's values from val_0, and a subgraph's val_0 clashes with the main graph's.
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def reduce_max_last(self, x: ir.Value, name: str, per_row: bool) -> ir.Value:
        if not per_row:
            return self.op("ReduceMax", [x], {"keepdims": 0}, name=name)
        if self.opset >= 18:
            axes = self.const(np.array([-1], np.int64), f"{name}_axes")
            return self.op("ReduceMax", [x, axes], {"keepdims": 1}, name=name)
        return self.op("ReduceMax", [x], {"axes": [-1], "keepdims": 1}, name=name)

    def flush_before(self, anchor: ir.Node) -> None:
        self.graph.insert_before(anchor, self.nodes)
        self.nodes = []


def _unique(graph: GraphLike, base: str, used: set[str]) -> str:
    name = base
    i = 1
    while name in used:
        name = f"{base}_{i}"
        i += 1
    used.add(name)
    return name


class _Quantizer:
    """Rewrites one model; remembers what it did for the pass details."""

    def __init__(self, model: ir.Model, config: QuantizeInt8DynamicConfig, node_filter: NodeFilter) -> None:
        self.model = model
        self.config = config
        self.filter = node_filter
        self.opset = opset_of(model)
        self.quantized: list[str] = []
        self.weight_only: list[str] = []
        self.kept_float: list[str] = []
        self.float_bytes_before = 0
        self.used_names: set[str] = set()
        self.zero_points: dict[int, ir.Value] = {}

    def run(self) -> None:
        # One set of names for all graphs: onnxruntime refuses a subgraph value that shares its
        # name with a value of the main graph (SSA across scopes).
        graphs = list(graph_likes(self.model))
        for graph in graphs:
            self.used_names |= {v.name for n in graph for v in n.outputs if v.name}
            if isinstance(graph, ir.Graph):
                self.used_names |= set(graph.initializers)
            self.used_names |= {v.name for v in graph.inputs if v.name}
            self.used_names |= {n.name for n in graph if n.name}
        for graph in graphs:
            activations: dict[int, tuple[ir.Value, ir.Value]] = {}
            weights: dict[tuple[int, bool, bool], tuple[ir.Value, np.ndarray]] = {}
            touched: list[ir.Value] = []
            for node in list(graph):
                if node.domain not in ("", "ai.onnx") or node.op_type not in self.config.op_types:
                    continue
                handler = {"MatMul": self._matmul, "Gemm": self._gemm, "Gather": self._gather, "Conv": self._conv,
                           "ConvTranspose": self._conv, "LSTM": self._recurrent, "GRU": self._recurrent, "RNN": self._recurrent}[node.op_type]
                weight = handler(graph, node, activations, weights)
                if isinstance(weight, list):
                    touched.extend(weight)
                elif weight is not None:
                    touched.append(weight)
            self._drop_unused(graph, touched)

    # -- helpers -------------------------------------------------------------------------

    def _name(self, graph: GraphLike, base: str) -> str:
        return _unique(graph, base, self.used_names)

    def _excluded(self, node: ir.Node) -> bool:
        return self.filter.excludes(node)

    def _drop_unused(self, graph: GraphLike, weights: list[ir.Value]) -> None:
        for value in weights:
            if value.uses() or value.is_graph_output() or value.is_graph_input():
                continue
            producer = value.producer()
            if producer is not None:
                (producer.graph or graph).remove(producer, safe=True)
                continue
            owner = value.graph if isinstance(value.graph, ir.Graph) else graph  # a subgraph may read the main graph's weight
            if isinstance(owner, ir.Graph) and owner.initializers.get(value.name) is value:
                del owner.initializers[value.name]

    def _quantized_weight(
        self, b: _Builder, weight_value: ir.Value, w: np.ndarray, transpose: bool, cache: dict, bits: int
    ) -> tuple[ir.Value, np.ndarray]:
        key = (id(weight_value), transpose, bits == 7)
        if key not in cache:
            matrix = w.T if transpose else w
            q, scale = quantize_symmetric(matrix, bits, axis=1)
            base = weight_value.name or "weight"
            qv = b.const(q, self._name(b.graph, f"{base}_int8"))
            cache[key] = (qv, scale.reshape(-1))
        return cache[key]

    def _row_scaled(self, node: ir.Node) -> bool:
        if self.config.activations == "row":
            return True
        return NodeFilter(self.config.row_nodes, self.config.row_nodes).excludes(node)

    def _quantized_activation(
        self, b: _Builder, x: ir.Value, base: str, cache: dict, per_row: bool
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``(q, scale, zero_point)`` of ``x``; shared by every MatMul that reads ``x``."""
        key = (id(x), per_row)
        if key in cache:
            return cache[key]
        if not per_row:
            node = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=self._name(b.graph, f"{base}/quantize"))
            b.nodes.append(node)
            q, scale, zero = node.outputs
            for out, suffix in zip(node.outputs, ("quantized", "scale", "zero_point"), strict=True):
                out.name = self._name(b.graph, f"{base}_{suffix}")
            cache[key] = (q, scale, zero)
            return cache[key]
        absx = b.op("Abs", [x], name=self._name(b.graph, f"{base}/act_abs"))
        amax = b.reduce_max_last(absx, self._name(b.graph, f"{base}/act_absmax"), True)
        inv = b.const(np.array(1.0 / 127.0, np.float32), self._name(b.graph, f"{base}/inv127"))
        tiny = b.const(np.array(1e-30, np.float32), self._name(b.graph, f"{base}/tiny"))
        scale = b.op("Max", [b.op("Mul", [amax, inv], name=self._name(b.graph, f"{base}/act_scale0")), tiny],
                     name=self._name(b.graph, f"{base}/act_scale"))
        scaled = b.op("Div", [x, scale], name=self._name(b.graph, f"{base}/act_div"))
        rounded = b.op("Round", [scaled], name=self._name(b.graph, f"{base}/act_round"))
        offset = b.const(np.array(128.0, np.float32), self._name(b.graph, f"{base}/offset128"))
        shifted = b.op("Add", [rounded, offset], name=self._name(b.graph, f"{base}/act_shift"))
        q = b.op("Cast", [shifted], {"to": ir.DataType.UINT8}, name=self._name(b.graph, f"{base}/act_uint8"))
        cache[key] = (q, scale, self._zero_point(b))
        return cache[key]

    def _zero_point(self, b: _Builder) -> ir.Value:
        """The scalar uint8 zero point 128 that turns the shifted activations back into signed ones."""
        key = id(b.graph)
        if key not in self.zero_points:
            self.zero_points[key] = b.const(np.array(128, np.uint8), self._name(b.graph, "act_zero_point_128"))
        return self.zero_points[key]

    def _weight_only(self, b: _Builder, node: ir.Node, index: int, w: np.ndarray, axis: int) -> None:
        """Stores input ``index`` of ``node`` as int8 per-``axis`` behind a dequantization."""
        q, scale = quantize_symmetric(w, 8, axis=axis)
        base = node.inputs[index].name or "weight"
        qv = b.const(q, self._name(b.graph, f"{base}_int8"))
        # Cast + Mul rather than DequantizeLinear: onnxruntime folds this constant expression
        # into a float weight when it loads the model (the arithmetic stays float32), whereas
        # it rewrites DequantizeLinear -> MatMul into an 8-bit MatMulNBits, which is slower
        # than float32 on CPUs without VNNI.
        sv = b.const(scale, self._name(b.graph, f"{base}_scale"))
        cast = b.op("Cast", [qv], {"to": ir.DataType.FLOAT}, name=self._name(b.graph, f"{base}_cast"))
        deq = b.op("Mul", [cast, sv], name=self._name(b.graph, f"{base}_dequantize"))
        b.flush_before(node)
        node.replace_input_with(index, deq)
        self.weight_only.append(node.name or node.op_type)

    def _finish(self, graph: GraphLike, node: ir.Node, b: _Builder, result: ir.Value) -> None:
        """Puts the new nodes before ``node`` and makes ``result`` take its output's place and name."""
        b.flush_before(node)
        old = node.outputs[0]
        name = old.name
        result.shape, result.type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        result.name = name
        self.quantized.append(node.name or node.op_type)

    # -- op handlers -----------------------------------------------------------------------

    def _matmul(self, graph: GraphLike, node: ir.Node, acts: dict, weights: dict) -> ir.Value | None:
        if len(node.inputs) != 2 or node.inputs[0] is None:
            return None
        w = float_weight(node.inputs[1], self.config.min_elements)
        if w is None or w.ndim != 2:
            return None
        b = _Builder(graph, self.opset)
        if self._excluded(node):
            self.kept_float.append(node.name or node.op_type)
            if self.config.excluded_weights == "int8":
                weight = node.inputs[1]
                self._weight_only(b, node, 1, w, axis=1)
                return weight
            return None
        weight = node.inputs[1]
        self._rewrite_matmul(graph, node, b, node.inputs[0], weight, w, False, 1.0, None, acts, weights)
        return weight

    def _gemm(self, graph: GraphLike, node: ir.Node, acts: dict, weights: dict) -> ir.Value | None:
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or len(node.inputs) < 2 or node.inputs[0] is None:
            return None
        w = float_weight(node.inputs[1], self.config.min_elements)
        if w is None or w.ndim != 2:
            return None
        trans_b = bool(attrs.get("transB", 0))
        b = _Builder(graph, self.opset)
        weight = node.inputs[1]
        if self._excluded(node):
            self.kept_float.append(node.name or node.op_type)
            if self.config.excluded_weights == "int8":
                self._weight_only(b, node, 1, w, axis=0 if trans_b else 1)
                return weight
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        self._rewrite_matmul(graph, node, b, node.inputs[0], weight, w, trans_b,
                             float(attrs.get("alpha", 1.0)), (bias, float(attrs.get("beta", 1.0))), acts, weights)
        return weight

    def _rewrite_matmul(
        self, graph: GraphLike, node: ir.Node, b: _Builder, x: ir.Value, weight: ir.Value, w: np.ndarray,
        transpose: bool, alpha: float, bias: tuple[ir.Value | None, float] | None, acts: dict, weights: dict,
    ) -> None:
        bits = 7 if self.config.reduce_range else 8
        base = node.name or self._name(graph, node.op_type)
        qw, w_scale = self._quantized_weight(b, weight, w, transpose, weights, bits)
        per_row = self._row_scaled(node)
        qx, x_scale, zero = self._quantized_activation(b, x, (x.name or base), acts, per_row)
        acc = b.op("MatMulInteger", [qx, qw, zero], name=self._name(graph, f"{base}/matmul_int8"))
        acc_f = b.op("Cast", [acc], {"to": ir.DataType.FLOAT}, name=self._name(graph, f"{base}/acc_float"))
        ws = b.const((w_scale * np.float32(alpha)).astype(np.float32), self._name(graph, f"{base}_weight_scale"))
        if per_row:
            scaled = b.op("Mul", [acc_f, x_scale], name=self._name(graph, f"{base}/act_rescale"))
            result = b.op("Mul", [scaled, ws], name=self._name(graph, f"{base}/weight_rescale"))
        else:
            # onnxruntime fuses this exact chain into one DynamicQuantizeMatMul kernel.
            both = b.op("Mul", [x_scale, ws], name=self._name(graph, f"{base}/scales"))
            result = b.op("Mul", [acc_f, both], name=self._name(graph, f"{base}/rescale"))
        if bias is not None and bias[0] is not None:
            c = bias[0]
            if bias[1] != 1.0:
                beta = b.const(np.array(bias[1], np.float32), self._name(graph, f"{base}_beta"))
                c = b.op("Mul", [c, beta], name=self._name(graph, f"{base}/beta"))
            result = b.op("Add", [result, c], name=self._name(graph, f"{base}/bias"))
        self._finish(graph, node, b, result)

    def _gather(self, graph: GraphLike, node: ir.Node, acts: dict, weights: dict) -> ir.Value | None:
        axis = node.attributes.get("axis")
        if (axis.value if axis is not None else 0) != 0 or len(node.inputs) != 2:
            return None
        table = float_weight(node.inputs[0], self.config.min_elements)
        if table is None or table.ndim != 2:
            return None
        if self._excluded(node):
            self.kept_float.append(node.name or node.op_type)
            return None
        b = _Builder(graph, self.opset)
        base = node.name or self._name(graph, "Gather")
        weight = node.inputs[0]
        q, scale = quantize_symmetric(table, 8, axis=0)  # scale: [V, 1]
        tname = weight.name or "table"
        qv = b.const(q, self._name(graph, f"{tname}_int8"))
        sv = b.const(scale, self._name(graph, f"{tname}_row_scale"))
        ids = node.inputs[1]
        rows = b.op("Gather", [qv, ids], {"axis": 0}, name=self._name(graph, f"{base}/rows_int8"))
        scales = b.op("Gather", [sv, ids], {"axis": 0}, name=self._name(graph, f"{base}/row_scales"))
        rows_f = b.op("Cast", [rows], {"to": ir.DataType.FLOAT}, name=self._name(graph, f"{base}/rows_float"))
        result = b.op("Mul", [rows_f, scales], name=self._name(graph, f"{base}/dequantize"))
        self._finish(graph, node, b, result)
        return weight

    def _conv(self, graph: GraphLike, node: ir.Node, acts: dict, weights: dict) -> ir.Value | None:
        if len(node.inputs) < 2:
            return None
        w = float_weight(node.inputs[1], self.config.min_elements)
        if w is None or w.ndim < 3:
            return None
        if self._excluded(node) and self.config.excluded_weights == "float":
            self.kept_float.append(node.name or node.op_type)
            return None
        weight = node.inputs[1]
        self._weight_only(_Builder(graph, self.opset), node, 1, w, axis=0)
        return weight


    def _recurrent(self, graph: GraphLike, node: ir.Node, acts: dict, weights: dict) -> list[ir.Value]:
        """LSTM/GRU/RNN ``W`` and ``R`` (``[directions, gates * hidden, K]``) stored int8 per gate row."""
        if self._excluded(node) and self.config.excluded_weights == "float":
            self.kept_float.append(node.name or node.op_type)
            return []
        done = []
        for index in (1, 2):
            w = float_weight(node.inputs[index] if len(node.inputs) > index else None, self.config.min_elements)
            if w is None or w.ndim != 3:
                continue
            weight = node.inputs[index]
            self._weight_only(_Builder(graph, self.opset), node, index, w, axis=1)
            done.append(weight)
        return done


def quantize_dynamic_int8(model: ir.Model, config: QuantizeInt8DynamicConfig, node_filter: NodeFilter) -> _Quantizer:
    """Rewrites ``model`` in place and returns the quantizer with its records."""
    quantizer = _Quantizer(model, config, node_filter)
    quantizer.run()
    return quantizer


@register
class QuantizeInt8DynamicPass(OnnxpressPass):
    """Int8 MatMul/Gemm (activations scaled at run time), int8 embedding rows and Conv weights."""

    name = "quantize-int8-dynamic"
    Config = QuantizeInt8DynamicConfig
    needs = Needs(
        min_opset=11, calibration_when="auto_exclude: true", calibration_if=lambda c: c.auto_exclude is True
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config: QuantizeInt8DynamicConfig = self.config
        node_filter = NodeFilter(config.exclude_nodes, config.exclude_op_types)
        check_exclusions(model, node_filter, self.name)
        auto: dict = {}
        if wants_auto_exclude(config.auto_exclude, self.calibration):
            from onnxpress.passes.auto_exclude import auto_exclude, calibration_sample

            node_filter, auto = auto_exclude(
                model, node_filter, calibration_sample(model, self.calibration, config.calibration_batches),
                self._quantize_copy,
                target_cosine=config.target_cosine, max_excluded=config.max_excluded,
                # MatMul/Gemm only: keeping an embedding Gather in float would undo most of the size saving
                quantizable=lambda n: n.op_type in ("MatMul", "Gemm") and n.op_type in config.op_types,
                progress=self._report,
            )
        quantizer = quantize_dynamic_int8(model, config, node_filter)
        self.details = {
            "quantized": len(quantizer.quantized),
            "weights_only_int8": len(quantizer.weight_only),
            "kept_float": quantizer.kept_float,
        } | ({"auto_exclude": auto} if auto else {})
        logger.info(
            "quantize-int8-dynamic: %d nodes int8, %d int8 weights with float compute, %d kept in float",
            len(quantizer.quantized), len(quantizer.weight_only), len(quantizer.kept_float),
        )
        return ir.passes.PassResult(model, modified=bool(quantizer.quantized or quantizer.weight_only))

    def _quantize_copy(self, model: ir.Model, node_filter: NodeFilter) -> ir.Model:
        copy = model.clone()
        quantize_dynamic_int8(copy, self.config, node_filter)
        return copy
