r"""quantize-int4-weights: 4-bit MatMul weights (MatMulNBits) and 4-bit embedding tables.

Weights are split into blocks of ``block_size`` consecutive elements along the reduction axis
(``K`` of a ``[K, N]`` MatMul weight; ``D`` of a ``[V, D]`` embedding table) and each block
``w`` is stored as 4-bit codes with its own scale and zero point (asymmetric, the default):

.. math::

    s = \frac{\max(\max w, 0) - \min(\min w, 0)}{15}, \quad z = \mathrm{round}(-\min(\min w, 0) / s), \quad
    q = \mathrm{clip}(\mathrm{round}(w / s) + z, 0, 15), \quad \hat w = (q - z)\, s

(the span always reaches zero, so zero is exact; symmetric: ``s = max|w| / 7``, ``z = 8``). MatMuls become ``com.microsoft::MatMulNBits`` and
``Gather`` on a constant table becomes ``com.microsoft::GatherBlockQuantized``; both are
onnxruntime CPU kernels, and the work is done by onnxruntime's own ``MatMulNBitsQuantizer``
(round to nearest, or ``hqq``, half-quadratic optimization of scale and zero point).

Embedding tables are included on purpose: onnxruntime's quantizer quantizes only MatMul by
default, so a model whose largest tensor is an embedding (MiniLM: 47 of 90 MB) barely shrinks.

Excluded nodes (names, globs, op types, or those chosen by ``auto_exclude``) keep their
weights in 8 bits (``MatMulNBits`` with ``bits=8``) with ``excluded_weights: int8``, the
default, or in float.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import onnx_ir as ir
from onnxpress.passes.base import Needs, OnnxpressPass, option
from onnxpress.passes.quant_common import (
    NodeFilter,
    adopt,
    check_exclusions,
    load_for_adopt,
    to_proto_file,
    wants_auto_exclude,
)
from onnxpress.passes.registry import register

if TYPE_CHECKING:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeInt4WeightsConfig:
    """Options of quantize-int4-weights."""

    block_size: int = option(32, "elements per quantization block (a power of two, >= 16)")
    symmetric: bool = option(False, "symmetric blocks (no zero point); asymmetric is more accurate")
    algorithm: Literal["rtn", "hqq"] = option("rtn", "round to nearest, or HQQ's optimized scales (needs torch)")
    embeddings: bool = option(True, "also quantize Gather tables (embeddings) to 4 bits")
    accuracy_level: int = option(0, "MatMulNBits accuracy_level: 0 computes in float, 4 in int8")
    exclude_nodes: tuple[str, ...] = option((), "node names or globs to leave out of 4-bit")
    exclude_op_types: tuple[str, ...] = option((), "op types to leave out of 4-bit")
    excluded_weights: Literal["float", "int8"] = option(
        "int8", "how excluded MatMul weights are stored: float, or 8-bit blocks (MatMulNBits bits=8)"
    )
    auto_exclude: bool | None = option(
        False, "keep the most harmful nodes out of quantization until target_cosine is met (needs calibration data); null: only when calibration data is given"
    )
    target_cosine: float = option(0.98, "auto_exclude's goal: mean cosine of every float output")
    max_excluded: int = option(8, "auto_exclude keeps at most this many nodes out of 4-bit")

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if not 0.0 < self.target_cosine <= 1.0:
            raise ValueError(f"target_cosine must be within (0, 1], got {self.target_cosine}")


def gemm_to_matmul(model: ir.Model, node_filter: NodeFilter) -> int:
    """Rewrites ``Gemm(A, B, C)`` with a constant 2-D ``B`` as ``MatMul(A, B') [* alpha] [+ beta * C]``.

    ``B' = B^T`` when ``transB``; the transposed weight is a new constant. MatMulNBits replaces
    only MatMul, and exporters (torch's ``nn.Linear``) write Gemm.
    """
    import numpy as np
    from onnxpress.passes.quant_common import float_weight

    count = 0
    graph = model.graph
    made: dict[tuple[int, bool, float], ir.Value] = {}  # one MatMul weight per (weight, transB, alpha)
    node_names = {n.name for n in graph if n.name}
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or node_filter.excludes(node):
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        w = float_weight(node.inputs[1]) if len(node.inputs) > 1 else None
        if attrs.get("transA", 0) or w is None or w.ndim != 2:
            continue
        trans_b = bool(attrs.get("transB", 0))
        if trans_b:
            w = np.ascontiguousarray(w.T)
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        base = node.name or _unique_name("Gemm", node_names)  # onnxruntime refuses two nodes of one name
        key = (id(node.inputs[1]), trans_b, alpha)
        weight = made.get(key)
        if weight is None:  # a weight shared by several Gemms (tied layers) is converted once
            name = _unique_name(f"{node.inputs[1].name}_matmul", set(graph.initializers))
            weight = ir.Value(name=name, const_value=ir.tensor(w * np.float32(alpha)),
                              shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT))
            graph.register_initializer(weight)
            made[key] = weight
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=base)
        new_nodes = [matmul]
        result = matmul.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            if beta != 1.0:
                beta_name = _unique_name(f"{base}_beta", set(graph.initializers))
                scale = ir.Value(name=beta_name, const_value=ir.tensor(np.array(beta, np.float32)),
                                 shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
                graph.register_initializer(scale)
                bias_node = ir.node("Mul", [bias, scale], name=f"{base}/beta")
                new_nodes.append(bias_node)
                bias = bias_node.outputs[0]
            add = ir.node("Add", [result, bias], name=f"{base}/bias")
            new_nodes.append(add)
            result = add.outputs[0]
        graph.insert_before(node, new_nodes)
        old = node.outputs[0]
        name = old.name
        result.shape, result.type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        result.name = name
        count += 1
    return count


#: Weight types MatMulNBits and GatherBlockQuantized take on onnxruntime's CPU provider.
_NBITS_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def guard_for_ort(model: ir.Model, *, dry_run: bool = False) -> list[str] | bool:
    """Prepares ``model`` for onnxruntime's ``MatMulNBitsQuantizer``, which trusts every initializer.

    Left to itself the quantizer (a) quantizes a weight that is also a graph input (an
    overridable default) and deletes that input from the model's interface; (b) quantizes
    float64 (and other) weights into a ``MatMulNBits`` that no runtime loads; (c) names its
    4-bit tensors after the weight, so a table read by both a ``Gather`` and a ``MatMul`` (tied
    embeddings) gets two different ``<name>_Q4``/``<name>_scales`` with one name, and the model
    no longer loads. Here (a) and (b) are named (unnamed nodes get a name) and returned, for
    ``nodes_to_exclude``; for (c) each such ``Gather`` reads its own initializer, which holds the
    same tensor.

    Args:
        model: Changed in place unless ``dry_run``.
        dry_run: Only answer whether anything would change.

    Returns:
        The names of the nodes the quantizer must leave alone; with ``dry_run``, whether the
        model needs any change.
    """
    from onnxpress.graphs import graph_likes

    keep: list[str] = []
    names = {n.name for g in graph_likes(model) for n in g if n.name}
    changed = False
    # onnxruntime's quantizer does not look into functions; readers are counted over all
    # graphs, since a branch may read a table of the main graph.
    graphs = [g for g in graph_likes(model) if isinstance(g, ir.Graph)]
    readers: dict[int, set[str]] = {}
    for graph in graphs:
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gather"):
                continue
            index = 1 if node.op_type == "MatMul" else 0
            weight = node.inputs[index] if len(node.inputs) > index else None
            if weight is None or not weight.is_initializer():
                continue
            if weight.is_graph_input() or weight.dtype not in _NBITS_TYPES:
                if dry_run:
                    return True
                if not node.name:
                    node.name = _unique_name(f"{node.op_type}_kept_by_onnxpress", names)
                keep.append(node.name)
                continue
            readers.setdefault(id(weight), set()).add(node.op_type)
    copies: dict[int, ir.Value] = {}  # one Gather copy per shared table
    for graph in graphs:
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            weight = node.inputs[0]
            if weight is None or readers.get(id(weight)) != {"Gather", "MatMul"} or node.name in keep:
                continue
            if dry_run:
                return True
            if id(weight) not in copies:
                owner = weight.graph if isinstance(weight.graph, ir.Graph) else graph
                name = _unique_name(f"{weight.name}_gather", names | set(owner.initializers))
                # A new tensor object: registering the shared one would rename it (and the
                # caller's proto behind it).
                table = ir.Value(name=name, shape=weight.shape, type=weight.type,
                                 const_value=ir.Tensor(weight.const_value.numpy(), name=name))
                owner.register_initializer(table)
                copies[id(weight)] = table
            node.replace_input_with(0, copies[id(weight)])
            changed = True
    if dry_run:
        return changed
    return keep


def _unique_name(base: str, used: set[str]) -> str:
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def quantize_int4(model: ir.Model, config: QuantizeInt4WeightsConfig, node_filter: NodeFilter) -> ir.Model:
    """A copy of ``model`` with 4-bit weights (excluded MatMuls in 8 bits or float)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    has_gemm = any(n.op_type == "Gemm" for n in model.graph)
    if has_gemm or guard_for_ort(model, dry_run=True):
        model = model.clone()
        if has_gemm:
            gemm_to_matmul(model, node_filter)
    unsupported = guard_for_ort(model)
    excluded = node_filter.excluded_names(model)
    excluded_matmuls = [n.name for n in model.graph if n.name in set(excluded) and n.op_type == "MatMul"]
    accuracy = config.accuracy_level or None
    with tempfile.TemporaryDirectory(prefix="onnxpress-int4-") as folder:
        source = to_proto_file(model, folder)
        proto = onnx.load(str(source))
        quantizer_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = quantizer_logger.level
        quantizer_logger.setLevel(logging.WARNING)  # it logs one INFO line per node it skips
        try:
            if config.algorithm == "hqq":
                algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
            else:
                algo = DefaultWeightOnlyQuantConfig(
                    block_size=config.block_size, is_symmetric=config.symmetric,
                    accuracy_level=accuracy, op_types_to_quantize=("MatMul",), bits=4,
                )
            proto = _apply(MatMulNBitsQuantizer(proto, algo_config=algo, nodes_to_exclude=excluded + unsupported))
            if config.embeddings:
                gather = DefaultWeightOnlyQuantConfig(
                    block_size=config.block_size, is_symmetric=config.symmetric,
                    op_types_to_quantize=("Gather",), bits=4,
                )
                opsets = {o.domain: o.version for o in proto.opset_import}
                proto = _apply(MatMulNBitsQuantizer(proto, algo_config=gather, nodes_to_exclude=excluded + unsupported))
                # onnxruntime's quantizer raises the default opset to 21 for the 4-bit tables
                # without converting a single op (a ReduceMean's 'axes' attribute is invalid from
                # opset 18 on). The tables are com.microsoft ops whose uint4 initializers need
                # IR version 10, not opset 21, so the model's own opset is put back.
                for entry in proto.opset_import:
                    if entry.domain in opsets:
                        entry.version = opsets[entry.domain]
            if excluded_matmuls and config.excluded_weights == "int8":
                eight = DefaultWeightOnlyQuantConfig(
                    block_size=config.block_size, is_symmetric=config.symmetric,
                    accuracy_level=accuracy, op_types_to_quantize=("MatMul",), bits=8,
                )
                # nodes_to_include adds to op_types_to_quantize (every MatMul left), so the
                # weights onnxruntime must not touch are excluded here too.
                proto = _apply(MatMulNBitsQuantizer(proto, algo_config=eight, nodes_to_include=excluded_matmuls,
                                                    nodes_to_exclude=unsupported))
        finally:
            quantizer_logger.setLevel(level)
        out = Path(folder) / "quantized.onnx"
        large = proto.ByteSize() > (1 << 30)
        onnx.save(proto, str(out), save_as_external_data=large)
        return load_for_adopt(out)


def _apply(quantizer: MatMulNBitsQuantizer) -> onnx.ModelProto:
    """Runs onnxruntime's quantizer and returns its model."""
    quantizer.process()
    return quantizer.model.model


@register
class QuantizeInt4WeightsPass(OnnxpressPass):
    """4-bit block-quantized MatMul weights (MatMulNBits) and embedding tables (GatherBlockQuantized)."""

    name = "quantize-int4-weights"
    Config = QuantizeInt4WeightsConfig
    needs = Needs(
        min_opset=11, calibration_when="auto_exclude: true", calibration_if=lambda c: c.auto_exclude is True
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config: QuantizeInt4WeightsConfig = self.config
        node_filter = NodeFilter(config.exclude_nodes, config.exclude_op_types)
        check_exclusions(model, node_filter, self.name)
        auto: dict = {}
        if wants_auto_exclude(config.auto_exclude, self.calibration):
            from onnxpress.passes.auto_exclude import auto_exclude, calibration_sample

            node_filter, auto = auto_exclude(
                model, node_filter, calibration_sample(model, self.calibration, 4),
                lambda m, f: quantize_int4(m, config, f),
                target_cosine=config.target_cosine, max_excluded=config.max_excluded,
                quantizable=lambda n: n.op_type == "MatMul", progress=self._report,
            )
        kept = node_filter.excluded_names(model)
        quantized = quantize_int4(model, config, node_filter)
        adopt(model, quantized)
        ops = [n.op_type for n in model.graph]
        nbits, gathers = ops.count("MatMulNBits"), ops.count("GatherBlockQuantized")
        self.details = {
            "matmul_nbits": nbits, "gather_block_quantized": gathers,
            "kept_out_of_4bit": kept,
        } | ({"auto_exclude": auto} if auto else {})
        logger.info("quantize-int4-weights: %d MatMulNBits, %d GatherBlockQuantized", nbits, gathers)
        return ir.passes.PassResult(model, modified=bool(nbits or gathers))
