"""fold-constants: evaluate ahead of time the nodes whose inputs are all constant, within a size budget.

A node is folded when every input is constant (an initializer that is not a graph input, or
a ``Constant`` output) and folding does not grow the model by more than the budget:

    growth = bytes(outputs) - bytes(constant inputs that only this node reads) <= size_budget_bytes

The size of the outputs is known before evaluating from inferred static shapes, and for the
ops that blow up (ConstantOfShape, Expand, Tile, Range) from their constant inputs, so a
100 MB ``ConstantOfShape`` is never even materialised. ``Shape`` and ``Size`` of a value with
a static shape fold too.

Evaluation runs the node alone in onnxruntime on one thread: the same kernel onnxruntime's own
constant folding runs at session start, so the folded bits are the bits the original model
computes. (onnx's reference evaluator differs from onnxruntime in the last bit for some ops.)
Quantize/Dequantize nodes are kept, since onnxruntime keeps them for its quantized kernels;
custom-domain ops, random ops, control flow and anything onnxruntime cannot run are left as
they are.

A ``Shape`` or ``Size`` that an ``If`` condition depends on is not folded: once the condition
is constant, onnxruntime inlines the taken branch at session start and checks it with strict
shape inference, which refuses some branches that run as they are (``Range`` fed ``[1]``
tensors, as onnx's own expanded ``AffineGrid`` does), so the folded model would not load.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxpress.graphs import (
    constant_value,
    describe_node,
    draws_random,
    graph_likes,
    infer_shapes,
    static_shape,
)
from onnxpress.passes.base import OnnxpressPass, option
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)

_FEEDABLE = frozenset(
    {
        ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BOOL,
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
    }
)


@dataclass(frozen=True)
class FoldConstantsConfig:
    """Options of fold-constants."""

    size_budget_bytes: int = option(
        1 << 20,
        "Fold a node only if its results add at most this many bytes beyond the constants they replace.",
    )
    fold_shapes: bool = option(True, "Fold Shape and Size of values whose shape is static.")
    skip_ops: tuple[str, ...] = option(
        ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
        "Op types never folded (onnxruntime keeps Q/DQ nodes for its quantized kernels).",
    )

    def __post_init__(self) -> None:
        if self.size_budget_bytes < 0:
            raise ValueError(f"size_budget_bytes must be >= 0, got {self.size_budget_bytes}")


def _nbytes(shape: tuple[int, ...], dtype: ir.DataType | None) -> int | None:
    if dtype is None or dtype == ir.DataType.STRING:
        return None
    return int(math.prod(shape) * dtype.itemsize)


def _predicted_output_bytes(node: ir.Node, inputs: list[np.ndarray | None]) -> int | None:
    """Bytes of the node's outputs, known without evaluating it; None when unknown."""
    total = 0
    for out in node.outputs:
        shape = static_shape(out)
        size = _nbytes(shape, out.dtype) if shape is not None else None
        if size is None:
            break
        total += size
    else:
        return total
    op = node.op_type
    try:
        if op == "ConstantOfShape":
            value = node.attributes.get("value")
            itemsize = value.as_tensor().dtype.itemsize if value is not None else 4
            return int(np.prod(inputs[0])) * int(itemsize)
        if op == "Expand":
            shape = np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1]))
            return int(math.prod(shape)) * inputs[0].itemsize
        if op == "Tile":
            return inputs[0].nbytes * int(np.prod(inputs[1]))
        if op == "Range":
            start, limit, delta = (np.asarray(v).item() for v in inputs[:3])
            return max(int(math.ceil((limit - start) / delta)), 0) * inputs[0].itemsize
    except (ValueError, TypeError, ZeroDivisionError, IndexError):
        return None
    return None


def _same_dtype(array: np.ndarray, value: ir.Value) -> bool:
    """Whether the result has the element type the graph gives the value (when it gives one)."""
    try:
        return value.dtype is None or ir.DataType.from_numpy(array.dtype) == value.dtype
    except TypeError:
        return False


def _if_condition_cone(model: ir.Model) -> set[ir.Node]:
    """The nodes that some ``If`` condition depends on, through any graph."""
    cone: set[ir.Node] = set()
    stack = [
        node.inputs[0].producer()
        for graph in graph_likes(model)
        for node in graph
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.inputs and node.inputs[0] is not None
    ]
    while stack:
        node = stack.pop()
        if node is None or node in cone:
            continue
        cone.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return cone


def _evaluate(node: ir.Node, model: ir.Model, arrays: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """Runs one node in onnxruntime on one thread; its outputs, None for those left unnamed."""
    feeds = {}
    graph_inputs = []
    node_proto = ir.serde.serialize_node(node)
    for i, array in enumerate(arrays):
        if array is None:
            continue
        name = f"in{i}"
        node_proto.input[i] = name
        feeds[name] = array
        graph_inputs.append(
            onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
            )
        )
    outputs = []
    for i, out in enumerate(node.outputs):
        name = f"out{i}" if out.name else ""
        node_proto.output[i] = name
        if name:
            outputs.append(onnx.helper.make_empty_tensor_value_info(name))
    graph = onnx.helper.make_graph([node_proto], "fold", graph_inputs, outputs)
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version or 8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    results = session.run(None, feeds)
    for meta, array in zip(session.get_outputs(), results, strict=True):
        if isinstance(array, np.ndarray) and meta.type != _ort_type(array):
            raise TypeError(f"onnxruntime returned {meta.type} as a {array.dtype} array")
    produced = iter(results)
    return [next(produced) if out.name else None for out in node.outputs]


def _ort_type(array: np.ndarray) -> str:
    """onnxruntime's name for an array's type, e.g. ``tensor(float)``."""
    try:
        elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, TypeError, ValueError):
        return ""
    return f"tensor({onnx.TensorProto.DataType.Name(elem).lower()})"


@register
class FoldConstantsPass(OnnxpressPass):
    """Evaluate nodes whose inputs are all constant, unless the result would grow the model past a budget."""

    name = "fold-constants"
    Config = FoldConstantsConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        infer_shapes(model)
        self._condition_cone = _if_condition_cone(model)
        folded: Counter[str] = Counter()
        kept_for_size: list[str] = []
        total = sum(1 for g in graph_likes(model) for _ in g)
        seen = 0
        for graph in list(graph_likes(model)):
            for node in list(graph):
                seen += 1
                if seen % 256 == 0 or seen == total:
                    self._report(seen, total, "nodes")
                result = self._try_fold(node, model, kept_for_size)
                if result is None:
                    continue
                self._replace(graph, node, result, as_initializer=(model.ir_version or 0) >= 4)
                folded[node.op_type] += 1
        self.details = {"folded": dict(folded), "kept_for_size": kept_for_size}
        logger.info(
            "fold-constants folded %d nodes %s; %d kept unfolded by the size budget",
            sum(folded.values()), dict(folded), len(kept_for_size),
        )
        return ir.passes.PassResult(model, modified=bool(folded))

    def _try_fold(
        self, node: ir.Node, model: ir.Model, kept_for_size: list[str]
    ) -> list[np.ndarray | None] | None:
        cfg = self.config
        if node.domain not in ("", "ai.onnx") or node.op_type in cfg.skip_ops:
            return None
        if draws_random(node) or node.op_type == "Constant":
            return None
        if any(out.is_graph_output() for out in node.outputs):
            return None
        for attr in node.attributes.values():
            if attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                return None
        if cfg.fold_shapes and node.op_type in ("Shape", "Size") and node.inputs:
            return None if node in self._condition_cone else self._fold_shape(node)
        present = [v for v in node.inputs if v is not None]
        if not present:
            return None
        tensors = [constant_value(v) if v is not None else None for v in node.inputs]
        if any(t is None for t, v in zip(tensors, node.inputs, strict=True) if v is not None):
            return None
        if any(t.dtype not in _FEEDABLE for t in tensors if t is not None):
            return None
        arrays = [t.numpy() if t is not None else None for t in tensors]
        predicted = _predicted_output_bytes(node, arrays)
        freed = sum(
            t.nbytes
            for v, t in zip(node.inputs, tensors, strict=True)
            if v is not None and t is not None and len(v.uses()) == 1 and not v.is_graph_output()
        )
        if predicted is not None and predicted - freed > cfg.size_budget_bytes:
            kept_for_size.append(describe_node(node))
            logger.debug("Keeping %s unfolded: %d bytes would be added", describe_node(node), predicted - freed)
            return None
        try:
            results = _evaluate(node, model, arrays)
        except Exception as exc:  # onnxruntime cannot run it alone: leave it for run time
            logger.debug("Cannot fold %s: %s", describe_node(node), exc)
            return None
        produced = [(r, out) for r, out in zip(results, node.outputs, strict=True) if out.name]
        if not all(isinstance(r, np.ndarray) for r, _ in produced):
            return None
        if not all(_same_dtype(r, out) for r, out in produced):
            return None
        if sum(r.nbytes for r, _ in produced) - freed > cfg.size_budget_bytes:
            kept_for_size.append(describe_node(node))
            return None
        return results

    @staticmethod
    def _fold_shape(node: ir.Node) -> list[np.ndarray] | None:
        shape = static_shape(node.inputs[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(math.prod(shape), dtype=np.int64)]
        rank = len(shape)
        start = node.attributes["start"].as_int() if "start" in node.attributes else 0
        end = node.attributes["end"].as_int() if "end" in node.attributes else rank
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return [np.array(shape[start:end], dtype=np.int64)]

    @staticmethod
    def _replace(
        graph: ir.Graph | ir.Function, node: ir.Node, results: list[np.ndarray | None], *, as_initializer: bool
    ) -> None:
        """Puts the results in place of the node: initializers, or Constant nodes in functions
        and before IR version 4 (when every initializer also had to be a graph input)."""
        for out, array in zip(node.outputs, results, strict=False):
            if array is None:
                continue
            tensor = ir.tensor(array, name=out.name)
            if isinstance(graph, ir.Graph) and as_initializer:
                new = ir.Value(name=None, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
                ir.convenience.replace_all_uses_with(out, new)
                name = out.name
                out.name = None
                new.name = name
                graph.register_initializer(new)
            else:
                constant = ir.node("Constant", inputs=[], attributes={"value": tensor})
                graph.insert_before(node, constant)
                ir.convenience.replace_all_uses_with(out, constant.outputs[0])
                name = out.name
                out.name = None
                constant.outputs[0].name = name
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for value in inputs:  # constants only this node read are dead now
            if value.uses() or value.is_graph_output():
                continue
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant" and producer.graph is not None:
                producer.graph.remove(producer, safe=True)
            elif value.is_initializer() and value.graph is not None and value.name in value.graph.initializers:
                del value.graph.initializers[value.name]
