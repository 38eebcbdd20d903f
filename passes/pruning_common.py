"""What the pruning passes share: finding weight layers, reading calibration statistics, fixing biases.

A *weight layer* is a ``Conv``, ``Gemm`` or ``MatMul`` whose weight operand is a constant
(an initializer or a ``Constant`` node, see :func:`onnxpress.graphs.constant_value`). For each
one this module records which weight axis indexes the output channels and which the input
channels, and which axis of the data operand carries those input channels:

=========================  ==========  =========  =====================
layer                      weight      out axis   in axis (data axis)
=========================  ==========  =========  =====================
``Conv``                   ``[O, C/g, k...]``  0  1 (data axis 1)
``Gemm`` (``transB=0``)    ``[K, N]``  1          0 (data axis -1, or 0 with ``transA``)
``Gemm`` (``transB=1``)    ``[N, K]``  0          1
``MatMul`` (2-D weight)    ``[K, N]``  1          0 (data axis -1)
=========================  ==========  =========  =====================

Calibration statistics are read by running the model in onnxruntime with the wanted
intermediate values added as graph outputs, one batch at a time, and reducing each batch to
per-channel sums at once, so memory stays at one batch.

Bias correction (:func:`correct_output_means`) is the data-aware, post-training repair both
passes offer. Pruning shifts a layer's output mean; for each corrected layer, in graph order,

    b' = b + E[y_ref] - E[y_pruned]

where ``E`` is the per-output-channel mean over the calibration batches, ``y_ref`` the
layer's output in the original model and ``y_pruned`` its output in the model as pruned and
corrected so far. Correcting in graph order means each layer also absorbs the drift the
layers before it left (the "bias correction" of Nagel et al., 2019, measured rather than
derived from a Gaussian assumption). A layer with no bias gets one (``Conv`` and ``Gemm`` take
a third input; a ``MatMul`` without a following constant ``Add`` gets a new ``Add``).
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxpress.passes.base import CalibrationBatch

from onnxpress.graphs import constant_value, describe_node, graph_likes
from onnxpress.sessions import session_options

logger = logging.getLogger(__name__)

#: Op types whose constant weight the pruning passes can rewrite.
WEIGHT_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclass
class WeightLayer:
    """A node with a constant, prunable weight.

    Attributes:
        node: The Conv, Gemm or MatMul.
        weight: The value holding the weight (an initializer or a Constant's output).
        name: The weight's name (the node's name when the weight has none).
        out_axis: Weight axis that indexes output channels.
        in_axis: Weight axis that indexes input channels (per group for a grouped Conv).
        data: The data operand whose channels the weight reads.
        data_axis: Axis of ``data`` that holds those input channels (may be negative).
        groups: Conv ``group`` (1 elsewhere).
        graph: The graph or function the node lives in.
    """

    node: ir.Node
    weight: ir.Value
    name: str
    out_axis: int
    in_axis: int
    data: ir.Value
    data_axis: int
    groups: int
    graph: ir.Graph | ir.Function

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def output_axis(self) -> int:
        """Axis of the layer's output that holds its output channels."""
        return 1 if self.node.op_type == "Conv" else -1

    def array(self) -> np.ndarray:
        tensor = constant_value(self.weight)
        assert tensor is not None
        return tensor.numpy()

    def describe(self) -> str:
        return f"{self.name} in {describe_node(self.node)}"


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def weight_layer(node: ir.Node, graph: ir.Graph | ir.Function) -> tuple[WeightLayer | None, str]:
    """The node as a weight layer, or None and the reason it is not one."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS:
        return None, "not a Conv, Gemm or MatMul"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None, "missing operands"
    weight = node.inputs[1]
    tensor = constant_value(weight)
    if tensor is None:
        return None, "the weight is not a constant"
    if tensor.dtype not in _FLOAT_TYPES:
        return None, f"the weight is {tensor.dtype.name}, not floating point"
    rank = len(tensor.shape)
    name = weight.name or node.name or node.op_type
    op = node.op_type
    if op == "Conv":
        if rank < 3:
            return None, f"Conv weight of rank {rank}"
        return WeightLayer(node, weight, name, 0, 1, node.inputs[0], 1, _int_attr(node, "group", 1), graph), ""
    if rank != 2:
        return None, f"{op} weight of rank {rank} (only 2-D weights are pruned)"
    if op == "Gemm":
        trans_a = _int_attr(node, "transA", 0)
        trans_b = _int_attr(node, "transB", 0)
        out_axis, in_axis = (0, 1) if trans_b else (1, 0)
        return WeightLayer(node, weight, name, out_axis, in_axis, node.inputs[0], 0 if trans_a else -1, 1, graph), ""
    return WeightLayer(node, weight, name, 1, 0, node.inputs[0], -1, 1, graph), ""


def find_weight_layers(
    model: ir.Model, ops: Sequence[str] = WEIGHT_OPS
) -> Iterator[WeightLayer]:
    """Every weight layer of the model (subgraphs and functions included), each weight once."""
    seen: set[int] = set()
    for graph in graph_likes(model):
        for node in graph:
            if node.op_type not in ops:
                continue
            layer, _ = weight_layer(node, graph)
            if layer is None or id(layer.weight) in seen:
                continue
            seen.add(id(layer.weight))
            yield layer


def matches(patterns: Iterable[str], *names: str | None) -> bool:
    """Whether any glob pattern matches any of the names."""
    return any(n and fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def parse_ratios(entries: Sequence[str], option_name: str, *, upper: float = 1.0) -> list[tuple[str, float]]:
    """Reads ``PATTERN=FRACTION`` entries (a glob on layer names and a fraction in ``[0, upper)``).

    Raises:
        ValueError: An entry without ``=`` or with a fraction out of range, naming the entry.
    """
    parsed = []
    for entry in entries:
        pattern, sep, raw = entry.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"{option_name}: expected PATTERN=FRACTION (e.g. 'fc1.weight=0.9'), got {entry!r}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{option_name}: {entry!r}: {raw!r} is not a number") from None
        if not 0.0 <= value < upper:
            raise ValueError(f"{option_name}: {entry!r}: the fraction must be in [0, {upper}), got {value}")
        parsed.append((pattern, value))
    return parsed


def ratio_for(layer_names: Sequence[str | None], ratios: Sequence[tuple[str, float]]) -> float | None:
    """The fraction the last matching ``PATTERN=FRACTION`` entry gives, or None."""
    found = None
    for pattern, value in ratios:
        if matches([pattern], *layer_names):
            found = value
    return found


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replaces the tensor a constant value holds (an initializer or a Constant node's output)."""
    tensor = ir.tensor(array, name=value.name)
    if value.is_initializer():
        value.const_value = tensor
    else:
        producer = value.producer()
        assert producer is not None and producer.op_type == "Constant"
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
        value.const_value = tensor
    value.shape = ir.Shape(array.shape)


def new_initializer(graph: ir.Graph | ir.Function, array: np.ndarray, hint: str) -> ir.Value:
    """A new constant in ``graph`` (an initializer, or a Constant node in a function)."""
    tensor = ir.tensor(array)
    if isinstance(graph, ir.Graph):
        taken = {v.name for v in graph.initializers.values()}
        name = hint
        for i in itertools.count(1):
            if name not in taken:
                break
            name = f"{hint}_{i}"
        tensor.name = name
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
        graph.register_initializer(value)
        return value
    node = ir.node("Constant", inputs=[], attributes={"value": tensor})
    graph.insert_before(next(iter(graph)), node)
    node.outputs[0].name = hint
    node.outputs[0].const_value = tensor
    return node.outputs[0]


# ---------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------


def take_batches(
    calibration: Iterable[CalibrationBatch] | None, model: ir.Model, max_batches: int
) -> list[dict[str, np.ndarray]]:
    """Up to ``max_batches`` batches, keeping only the keys the model takes as inputs.

    Raises:
        ValueError: A batch misses an input of the model (named), or there is no batch.
    """
    if calibration is None:
        return []
    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    batches = []
    for i, batch in enumerate(itertools.islice(calibration, max_batches)):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(
                f"calibration batch {i} has no array for the model input(s) {missing}; it has {sorted(batch)}"
            )
        batches.append({n: np.asarray(batch[n]) for n in names})
    if not batches:
        raise ValueError("the calibration data holds no batch")
    return batches


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node of ``graph`` holds a subgraph (If, Loop, Scan), which may read outer values."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)


def _basic_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session with basic optimizations only: intermediate values keep their names."""
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _keep_only(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Makes ``names`` the graph's only outputs and drops the nodes and initializers they do not need.

    onnxruntime runs every node of a graph whatever outputs are fetched, so reading a value
    early in the graph through the whole model costs a full run; cut to what the value needs,
    a run reads only the prefix. Graphs with subgraphs (which may read outer values) keep all
    their nodes.
    """
    outputs = {o.name: o for o in graph.output}
    del graph.output[:]
    graph.output.extend(outputs.get(n) or onnx.helper.make_empty_tensor_value_info(n) for n in names)
    if _has_subgraphs(graph):
        return
    needed = set(names)
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    declared = {i.name for i in graph.input}  # an initializer listed as an input stays (IR < 4)
    initializers = [t for t in graph.initializer if t.name in needed or t.name in declared]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _session_with_outputs(model: ir.Model | bytes, names: Sequence[str]) -> tuple[ort.InferenceSession, list[str]]:
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else ir.to_proto(model)
    if names:
        _keep_only(proto.graph, names)
    session = _basic_session(proto)
    return session, list(names)


def run_with_outputs(
    model: ir.Model | bytes, names: Sequence[str], batches: Sequence[dict[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """Runs the model over the batches, yielding the named values (graph inputs included) per batch."""
    input_names = set(batches[0]) if batches else set()
    wanted = [n for n in names if n not in input_names]
    session, _ = _session_with_outputs(model, wanted)
    for batch in batches:
        results = dict(zip(wanted, session.run(wanted, batch), strict=True)) if wanted else {}
        yield {n: (batch[n] if n in input_names else results[n]) for n in names}


class IncrementalReader:
    """Reads intermediate values of a model one after another, each from where the last read stopped.

    Sequential pruning reads the input of every layer in turn, from a model that changes only
    *after* the value read last (the layers reading it are rewritten before the next read).
    Running the whole model for each read costs one model run per layer input; this reader
    instead keeps, per batch, the *cut*: every value already computed that a node not yet run
    still needs (the residual stream, the attention mask, the value read last). The next read
    runs only the nodes between the cut and the new value, with the cut fed as graph inputs,
    so reading all layer inputs in graph order costs about one model run in all.

    Valid only while every rewritten node comes after the values already read (true for
    layers pruned in graph order). Graphs with subgraphs are read with whole-model runs.
    Memory: the cut of every batch, typically a few activations wide.
    """

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self.batches = list(batches)
        self.cut: list[dict[str, np.ndarray]] = [dict(b) for b in self.batches]
        self.done: set[str] = set()  # outputs of nodes already run

    def read(self, model: ir.Model | bytes, name: str) -> list[np.ndarray]:
        """The value ``name`` for every batch, as ``model`` computes it now."""
        if self.cut and name in self.cut[0]:
            return [c[name] for c in self.cut]
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else ir.to_proto(model)
        graph = proto.graph
        if _has_subgraphs(graph):
            return [v[name] for v in run_with_outputs(proto.SerializeToString(), [name], self.batches)]
        known = set(self.cut[0]) if self.cut else set()
        producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
        run: set[int] = set()
        stack = [name]
        fed: set[str] = set()
        while stack:
            value = stack.pop()
            if value in known:
                fed.add(value)
                continue
            index = producer.get(value)
            if index is None or index in run:
                continue
            run.add(index)
            stack.extend(i for i in graph.node[index].input if i)
        nodes = [graph.node[i] for i in sorted(run)]
        produced = {o for node in nodes for o in node.output if o}
        self.done |= produced
        pending = [node for node in graph.node if not all(o in self.done for o in node.output if o)]
        still_needed = {i for node in pending for i in node.input} | {o.name for o in graph.output}
        keep = sorted(v for v in (known | produced) if v in still_needed)
        outputs = sorted(({name} | set(keep)) & produced)
        inputs = sorted(fed)
        part = onnx.GraphProto(name=f"read_{name}", node=nodes)
        needed = {i for node in nodes for i in node.input}
        part.initializer.extend(t for t in graph.initializer if t.name in needed and t.name not in fed)
        part.input.extend(
            onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(self.cut[0][n].dtype), None)
            for n in inputs
        )
        part.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in outputs)
        piece = onnx.ModelProto(
            ir_version=proto.ir_version, graph=part, opset_import=proto.opset_import, functions=proto.functions
        )
        session = _basic_session(piece)
        result = []
        for cut in self.cut:
            values = dict(zip(outputs, session.run(outputs, {n: cut[n] for n in inputs}), strict=True))
            result.append(values[name])
            cut.update(values)
            for stale in [v for v in cut if v not in keep]:
                del cut[stale]
        return result


@dataclass
class ChannelStats:
    """Per-channel sums over every calibration element along one axis."""

    total: np.ndarray
    squares: np.ndarray
    count: int

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def norm(self) -> np.ndarray:
        """``||X_c||_2`` over all calibration elements of channel c (Wanda's activation norm)."""
        return np.sqrt(self.squares)


def _reduce(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    moved = np.moveaxis(array.astype(np.float64, copy=False), axis, 0).reshape(array.shape[axis], -1)
    return moved.sum(axis=1), np.square(moved).sum(axis=1), moved.shape[1]


def channel_stats(
    model: ir.Model | bytes, requests: dict[str, int], batches: Sequence[dict[str, np.ndarray]]
) -> dict[str, ChannelStats]:
    """Per-channel sum, sum of squares and count of the named values along the given axes."""
    stats: dict[str, ChannelStats] = {}
    names = list(requests)
    for values in run_with_outputs(model, names, batches):
        for name in names:
            total, squares, count = _reduce(values[name], requests[name])
            if name in stats:
                stats[name].total += total
                stats[name].squares += squares
                stats[name].count += count
            else:
                stats[name] = ChannelStats(total, squares, count)
    return stats


# ---------------------------------------------------------------------------------------------
# Bias correction
# ---------------------------------------------------------------------------------------------


@dataclass
class BiasTarget:
    """A layer whose output mean is to be restored.

    Attributes:
        layer: The weight layer.
        kept: Output channels the layer still has, as indices into the original ones (None: all).
    """

    layer: WeightLayer
    kept: np.ndarray | None = None


def bias_value(layer: WeightLayer, channels: int, dtype: np.dtype) -> tuple[ir.Value | None, str]:
    """The constant bias of a layer, created when missing; None with a reason when it cannot be."""
    node = layer.node
    graph = layer.graph
    if node.op_type in ("Conv", "Gemm"):
        if len(node.inputs) >= 3 and node.inputs[2] is not None:
            bias = node.inputs[2]
            tensor = constant_value(bias)
            if tensor is None:
                return None, "its bias is not a constant"
            if tuple(tensor.shape) != (channels,) or len(bias.uses()) != 1:
                return None, f"its bias has shape {tuple(tensor.shape)} or is shared"
            return bias, ""
        if node.op_type == "Gemm" and _int_attr(node, "transA", 0):
            return None, "Gemm with transA"
        value = new_initializer(graph, np.zeros(channels, dtype), f"{layer.name}_bias")
        node.resize_inputs(3)
        node.replace_input_with(2, value)
        return value, ""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        tensor = constant_value(other)
        if tensor is not None and tuple(tensor.shape) == (channels,) and len(other.uses()) == 1:
            return other, ""
    value = new_initializer(graph, np.zeros(channels, dtype), f"{layer.name}_bias")
    add = ir.node("Add", inputs=[out, value])
    graph.insert_after(node, add)
    biased = add.outputs[0]
    biased.type, biased.shape = out.type, out.shape
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, biased)
    name = out.name or layer.name
    if out.is_graph_output():  # the Add takes the output's place and name
        outputs = graph.outputs
        for i, v in enumerate(outputs):
            if v is out:
                outputs[i] = biased
        out.name = f"{name}_unbiased"
        biased.name = name
    else:
        biased.name = f"{name}_biased"
    return value, ""


def correct_output_means(
    reference: bytes,
    model: ir.Model,
    targets: Sequence[BiasTarget],
    batches: Sequence[dict[str, np.ndarray]],
) -> dict[str, str]:
    """Restores each target layer's per-channel output mean, in graph order (see the module doc).

    Args:
        reference: The original model, serialized before pruning.
        model: The pruned model, changed in place.
        targets: Layers to correct; only main-graph layers are corrected.
        batches: Calibration batches (model inputs only).

    Returns:
        Layer name -> ``"corrected"`` or the reason it was not.
    """
    outcome: dict[str, str] = {}
    order = {id(node): i for i, node in enumerate(model.graph)}
    usable = []
    for target in targets:
        if target.layer.graph is not model.graph or id(target.layer.node) not in order:
            outcome[target.layer.name] = "skipped: not in the main graph"
            continue
        usable.append(target)
    usable.sort(key=lambda t: order[id(t.layer.node)])
    if not usable:
        return outcome
    names = {t.layer.output.name: t.layer.output_axis for t in usable}
    reference_stats = channel_stats(reference, names, batches)
    for target in usable:
        layer = target.layer
        out_name = layer.output.name
        assert out_name is not None
        axis = layer.output_axis
        current = channel_stats(model, {out_name: axis}, batches)[out_name].mean
        wanted = reference_stats[out_name].mean
        if target.kept is not None:
            wanted = wanted[target.kept]
        if wanted.shape != current.shape:
            outcome[layer.name] = f"skipped: {wanted.shape[0]} reference channels, {current.shape[0]} now"
            continue
        dtype = layer.array().dtype
        bias, reason = bias_value(layer, current.shape[0], dtype)
        if bias is None:
            outcome[layer.name] = f"skipped: {reason}"
            continue
        old = constant_value(bias)
        assert old is not None
        set_constant(bias, (old.numpy().astype(np.float64) + (wanted - current)).astype(dtype))
        outcome[layer.name] = "corrected"
        logger.debug("bias of %s corrected by up to %.4g", layer.describe(), float(np.abs(wanted - current).max()))
    return outcome


def weight_macs(model: ir.Model) -> int:
    """Multiply-adds per sample of the main graph's weight layers, from inferred shapes.

    A layer does ``outputs * W.size / W.shape[out_axis]`` multiply-adds (for a Conv: every
    output entry reads ``C/g * prod(kernel)`` weights); symbolic dimensions (the batch) count
    as 1 and a layer whose output shape is unknown counts as 0.
    """
    total = 0
    for node in model.graph:
        layer, _ = weight_layer(node, model.graph)
        if layer is None or layer.output.shape is None:
            continue
        outputs = math.prod(d for d in layer.output.shape if isinstance(d, int))
        shape = tuple(layer.weight.const_value.shape)  # type: ignore[union-attr]
        total += outputs * math.prod(shape) // shape[layer.out_axis]
    return int(total)


# ---------------------------------------------------------------------------------------------
# Least-squares reconstruction
# ---------------------------------------------------------------------------------------------


def _im2col(x: np.ndarray, node: ir.Node, kernel: tuple[int, ...]) -> np.ndarray | None:
    """``[N*Ho*Wo, C*kh*kw]`` patches of a 2-D Conv's input, in the weight's ``[C, kh, kw]`` order."""
    if x.ndim != 4 or len(kernel) != 2:
        return None
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
        return None
    pads = node.attributes.get("pads")
    strides = node.attributes.get("strides")
    dilations = node.attributes.get("dilations")
    top, left, bottom, right = pads.as_ints() if pads is not None else (0, 0, 0, 0)
    sh, sw = strides.as_ints() if strides is not None else (1, 1)
    dh, dw = dilations.as_ints() if dilations is not None else (1, 1)
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    patches = np.empty((x.shape[0], out_h, out_w, x.shape[1], kh, kw), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
            patches[..., i, j] = np.moveaxis(window, 1, -1)
    return patches.reshape(-1, x.shape[1] * kh * kw)


def _design(layer: WeightLayer, x: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray | None:
    """The layer's input as a matrix whose rows each meet the weight as ``row @ W2d``."""
    if layer.node.op_type == "Conv":
        if layer.groups != 1:
            return None
        return _im2col(x.astype(np.float64), layer.node, tuple(weight_shape[2:]))
    moved = np.moveaxis(x, layer.data_axis, -1)
    return moved.reshape(-1, moved.shape[-1]).astype(np.float64)


def weight_matrix(layer: WeightLayer, weight: np.ndarray) -> np.ndarray:
    """The weight as ``[inputs, outputs]`` (Conv: ``[C*kh*kw, O]``)."""
    if layer.node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    return weight if layer.in_axis == 0 else weight.T


def weight_from_matrix(layer: WeightLayer, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if layer.node.op_type == "Conv":
        return matrix.T.reshape(shape)
    return matrix if layer.in_axis == 0 else matrix.T


def reconstruct_outputs(
    reference: bytes,
    model: ir.Model,
    targets: Sequence[BiasTarget],
    batches: Sequence[dict[str, np.ndarray]],
    damping: float,
) -> dict[str, str]:
    """Refits each target layer's weight and bias to reproduce its original output, in graph order.

    For a layer with input patches ``X`` in the pruned model and output ``Y`` in the original,
    the new weight and bias solve the damped least-squares problem

        min ||X W + 1 b - Y||^2 + lambda ||W - W0||^2,
        lambda = damping * max(1, k / n) * trace(X^T X) / k

    (``W0`` the weight as pruned, ``k`` its rows, ``n`` the rows of ``X``), in closed form from
    the normal equations accumulated batch by batch. The damping keeps the fit near the pruned weights when the
    calibration set is small against the layer's inputs. Layers that cannot be written as a
    matrix product (grouped or N-d convolutions, ``auto_pad``) get the mean correction of
    :func:`correct_output_means` instead.

    Returns:
        Layer name -> ``"refit"``, ``"corrected"`` or the reason it was left.
    """
    outcome: dict[str, str] = {}
    order = {id(node): i for i, node in enumerate(model.graph)}
    usable = sorted(
        (t for t in targets if t.layer.graph is model.graph and id(t.layer.node) in order),
        key=lambda t: order[id(t.layer.node)],
    )
    for t in targets:
        if t not in usable:
            outcome[t.layer.name] = "skipped: not in the main graph"
    if not usable:
        return outcome
    out_names = [t.layer.output.name for t in usable]
    reference_outputs = [dict(zip(out_names, values, strict=True)) for values in (
        [v[n] for n in out_names] for v in run_with_outputs(reference, out_names, batches)
    )]
    fallback = []
    for target in usable:
        layer = target.layer
        weight = layer.array()
        shape = tuple(weight.shape)
        w0 = weight_matrix(layer, weight).astype(np.float64)
        rows = w0.shape[0]
        gram = np.zeros((rows + 1, rows + 1))
        cross = np.zeros((rows + 1, w0.shape[1]))
        ok = True
        data_name = layer.data.name or ""
        for batch_index, values in enumerate(run_with_outputs(model, [data_name], batches)):
            x = _design(layer, values[data_name], shape)
            if x is None or x.shape[1] != rows:
                ok = False
                break
            y = reference_outputs[batch_index][layer.output.name]
            y = np.moveaxis(y, layer.output_axis, -1)
            if target.kept is not None:
                y = y[..., target.kept]
            y = y.reshape(-1, y.shape[-1]).astype(np.float64)
            if y.shape != (x.shape[0], w0.shape[1]):
                ok = False
                break
            a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
            gram += a.T @ a
            cross += a.T @ y
        if not ok:
            fallback.append(target)
            continue
        samples = gram[rows, rows]
        # Fewer samples than inputs leave the fit underdetermined: lean harder on the pruned weights.
        damp = damping * max(1.0, rows / max(samples, 1.0)) * max(float(np.trace(gram[:rows, :rows])) / rows, 1e-12)
        penalty = np.full(rows + 1, damp)
        penalty[-1] = 0.0
        previous_bias = np.zeros((1, w0.shape[1]))
        theta0 = np.concatenate([w0, previous_bias], axis=0)
        try:
            theta = np.linalg.solve(gram + np.diag(penalty), cross + penalty[:, None] * theta0)
        except np.linalg.LinAlgError:
            fallback.append(target)
            continue
        bias, _ = bias_value(layer, w0.shape[1], weight.dtype)
        if bias is None:
            fallback.append(target)
            continue
        intercept = theta[rows]
        if layer.node.op_type == "MatMul":  # the output read is before the Add that holds the bias
            old_bias = constant_value(bias)
            assert old_bias is not None
            intercept = intercept + old_bias.numpy().astype(np.float64)
        set_constant(layer.weight, weight_from_matrix(layer, theta[:rows], shape).astype(weight.dtype))
        set_constant(bias, intercept.astype(weight.dtype))
        outcome[layer.name] = "refit"
    if fallback:
        outcome.update(correct_output_means(reference, model, fallback, batches))
    return outcome


def input_grams(
    model: ir.Model | bytes, layers: Sequence[WeightLayer], batches: Sequence[dict[str, np.ndarray]]
) -> dict[int, tuple[np.ndarray, int]]:
    """``X^T X`` and the row count of each layer's input matrix (see :func:`_design`), by node id.

    Layers reading the same value with the same row layout (Q, K and V of an attention block)
    share one matrix. Layers outside the main graph, or whose input is not a matrix product
    (grouped convolutions, ``auto_pad``), are missing from the result.
    """

    def key_of(layer: WeightLayer) -> tuple[str, str]:
        signature = str(layer.data_axis)
        if layer.node.op_type == "Conv":
            kernel = tuple(layer.weight.const_value.shape[2:])  # type: ignore[union-attr]
            attrs = sorted((k, repr(v.value)) for k, v in layer.node.attributes.items())
            signature = f"conv{kernel}{attrs}"
        return layer.data.name or "", signature

    keys: dict[int, tuple[str, str]] = {}
    representative: dict[tuple[str, str], WeightLayer] = {}
    for layer in layers:
        if isinstance(model, ir.Model) and layer.graph is not model.graph:
            continue
        if layer.node.op_type == "Conv" and layer.groups != 1:
            continue
        key = key_of(layer)
        keys[id(layer.node)] = key
        representative.setdefault(key, layer)
    grams: dict[tuple[str, str], list] = {}
    names = sorted({key[0] for key in representative})
    for values in run_with_outputs(model, names, batches):
        for key, layer in representative.items():
            shape = tuple(layer.weight.const_value.shape)  # type: ignore[union-attr]
            x = _design(layer, values[key[0]], shape)
            if x is None:
                continue
            entry = grams.setdefault(key, [np.zeros((x.shape[1], x.shape[1])), 0])
            entry[0] += x.T @ x
            entry[1] += x.shape[0]
    return {node_id: (grams[key][0], grams[key][1]) for node_id, key in keys.items() if key in grams}


def cross_grams(
    reference: bytes,
    model: ir.Model,
    layers: Sequence[WeightLayer],
    readers: tuple[IncrementalReader, IncrementalReader],
    *,
    ones: bool = False,
) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """For layers that read one value: ``X~^T X~`` and ``X^T X~``, by node id.

    ``X~`` is the layers' input in ``model`` (pruned so far) and ``X`` the same value in the
    original model, so a layer can be refit to reproduce its original output from the
    input it will really get. With ``ones`` both get a last column of ones (``[X, 1]``), so
    the bias can be fit with the weights. Layers with no matrix form are missing from the result.
    ``readers`` (one for ``reference``, one for ``model``, kept across the calls for the layer
    inputs in graph order) compute each value from where the previous read stopped.
    """
    if not layers:
        return {}
    name = layers[0].data.name or ""
    layer = layers[0]
    shape = tuple(layer.weight.const_value.shape)  # type: ignore[union-attr]
    pruned_gram = dense_cross = None
    count = 0
    pairs = zip(readers[0].read(reference, name), readers[1].read(model, name), strict=True)
    for dense_value, current_value in pairs:
        x_dense = _design(layer, dense_value, shape)
        x_pruned = _design(layer, current_value, shape)
        if x_dense is None or x_pruned is None:
            return {}
        if ones:
            x_dense = np.concatenate([x_dense, np.ones((x_dense.shape[0], 1))], axis=1)
            x_pruned = np.concatenate([x_pruned, np.ones((x_pruned.shape[0], 1))], axis=1)
        if pruned_gram is None:
            pruned_gram = np.zeros((x_pruned.shape[1],) * 2)
            dense_cross = np.zeros_like(pruned_gram)
        pruned_gram += x_pruned.T @ x_pruned
        dense_cross += x_dense.T @ x_pruned
        count += x_pruned.shape[0]
    assert pruned_gram is not None and dense_cross is not None
    return {id(other.node): (pruned_gram, dense_cross, count) for other in layers}
