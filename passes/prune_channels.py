"""prune-channels: remove whole output channels of Conv, Gemm and MatMul, and what reads them.

Unstructured zeros leave the compute as it was; removing a channel shrinks every tensor that
carries it, so the pruned model does fewer multiply-adds at any batch size.

**Channel groups.** From each *producer* (a ``Conv`` with ``group=1``, a ``Gemm`` or a ``MatMul``
with a constant weight) the pass follows the output value forward, recording what has to be
cut when channel ``c`` goes:

- elementwise unary ops and activations (Relu, Sigmoid, Erf, Clip, ...) carry the channels on;
- ``BatchNormalization``/``InstanceNormalization``, pooling and reductions over other axes
  (``ReduceMean`` as global pooling) carry them on (their per-channel
  parameters are sliced); a depthwise ``Conv`` (``group = C``) carries them on too (its weight,
  bias and ``group`` are cut);
- a binary elementwise op (Add, Mul, ...) with a constant carries them on; the constant is
  sliced when it has one entry per channel;
- a binary op of two computed values joins the groups of both operands (a residual ``Add``):
  all producers of a joined group lose the same channels, or the group is left alone when an
  operand comes from elsewhere (an input, a LayerNorm, an op the pass does not follow);
- ``Flatten`` and ``Reshape`` that merge the channel axis with the static axes after it
  (``[N, C, H, W] -> [N, C*H*W]``) carry the channels on as blocks of ``H*W`` entries; a
  Reshape whose target spells ``C*H*W`` gets a new target;
- *consumers*, a ``Conv`` (``group=1``), ``Gemm`` or ``MatMul`` reading the channels on its
  contraction axis, lose the matching input channels (rows of the weight);
- anything else (a graph output, Concat, Transpose, Softmax, a Reshape it cannot prove, a
  subgraph) stops the group, which is then left alone; the report gives the reason per group.

**Which channels.** ``ratio`` of the channels of each group go (``per_layer`` overrides it by
glob on a producer's weight or node name), keeping at least one and, with ``round_to``, a
multiple of it. Channels are ranked by importance:

- ``l1`` (no data): ``sum_p ||W_p[c]||_1 / mean_c ||W_p[c]||_1`` over the group's producers
  (Li et al., 2017);
- ``activation`` (calibration data): the energy channel ``c`` sends into its consumers,
  ``sqrt(sum_consumers sum_j ||W_cons[j]||^2 * E[x_j^2])`` over the entries ``j`` of channel
  ``c`` on the consumer's input; with ``compensation`` the variance ``Var[x_j]`` replaces
  ``E[x_j^2]``, since the mean part is restored.

**Compensation** (calibration data), applied to every producer and consumer of a pruned
group in graph order, so each also absorbs the drift of the layers before it:

- ``compensation: bias`` restores each layer's per-channel output mean,
  ``b' = b + E[y_ref] - E[y_pruned]``; for a removed channel this is ``b' = b + W_cons[:, c] .
  E[x_c]``, the channel replaced by its mean;
- ``compensation: weights`` refits the remaining weights and the bias of each layer to its
  original output by damped least squares (``min ||X W + b - Y||^2 + lambda ||W - W0||^2``,
  closed form, the "channel pruning" reconstruction of He et al., 2017, without training).

See :mod:`onnxpress.passes.pruning_common` for both.

Written with numpy over onnx_ir: the structured pruners that exist (torch-pruning, nni) work
on ``nn.Module`` graphs, not on ONNX.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnxpress.passes.base import Needs, OnnxpressPass, option
from onnxpress.passes.pruning_common import (
    WEIGHT_OPS,
    BiasTarget,
    WeightLayer,
    channel_stats,
    correct_output_means,
    matches,
    new_initializer,
    parse_ratios,
    ratio_for,
    reconstruct_outputs,
    set_constant,
    take_batches,
    weight_layer,
    weight_macs,
)
from onnxpress.passes.registry import register

from onnxpress.graphs import constant_value, describe_node, graph_likes, infer_shapes

logger = logging.getLogger(__name__)

_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Identity", "Neg", "Abs", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Dropout", "Clip", "Cast",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})
_REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ReduceProd"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_PER_CHANNEL_NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(frozen=True)
class PruneChannelsConfig:
    """Options of prune-channels."""

    ratio: float = option(0.3, "Fraction of the output channels of each group to remove, in [0, 1).")
    per_layer: tuple[str, ...] = option(
        (), "PATTERN=FRACTION entries overriding ratio for the groups whose producer weight or node name matches."
    )
    criterion: Literal["auto", "l1", "activation"] = option(
        "auto",
        "Channel importance: l1 of the producer weights, activation (energy sent to the consumers, "
        "calibration data), auto: activation when calibration data is given.",
    )
    compensation: Literal["none", "bias", "weights"] = option(
        "none",
        "With calibration data, repair the layers around a pruned group: bias restores their per-channel "
        "output means, weights refits their weights and bias by damped least squares.",
    )
    damping: float = option(0.1, "Damping of the least-squares refit, relative to the mean input energy.")
    ops: tuple[str, ...] = option(WEIGHT_OPS, "Producer op types whose output channels may be removed.")
    exclude: tuple[str, ...] = option((), "Globs on weight or node names whose groups are left alone.")
    min_channels: int = option(4, "Groups with fewer output channels than this are left alone.")
    round_to: int = option(
        1,
        "Keep the nearest multiple of this many channels per group; 8 or 16 keeps onnxruntime's "
        "blocked (NCHWc) convolution kernels, which odd widths lose.",
    )
    calibration_batches: int = option(16, "Most calibration batches read for importance and compensation.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        parse_ratios(self.per_layer, "per_layer")
        unknown = sorted(set(self.ops) - set(WEIGHT_OPS))
        if unknown:
            raise ValueError(f"ops: {unknown} cannot be pruned; choose from {list(WEIGHT_OPS)}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        for name in ("min_channels", "round_to", "calibration_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Flow:
    """How a value carries a group's channels.

    Attributes:
        axis: The channel axis, negative (counted from the end, so broadcasting keeps it).
        inner: Consecutive entries per channel along the axis (``H*W`` after a Flatten).
        rank: The value's rank when known.
    """

    axis: int
    inner: int = 1
    rank: int | None = None

    @property
    def positive_axis(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis


@dataclass
class Trace:
    """What removing channels of one producer touches."""

    producer: WeightLayer
    channels: int
    values: dict[int, tuple[ir.Value, Flow]] = field(default_factory=dict)
    consumers: dict[int, tuple[WeightLayer, Flow]] = field(default_factory=dict)
    slices: dict[tuple[int, int], tuple[ir.Node, int, int, int]] = field(default_factory=dict)
    reshapes: dict[int, tuple[ir.Node, int]] = field(default_factory=dict)
    depthwise: dict[int, ir.Node] = field(default_factory=dict)
    joins: list[tuple[ir.Value, Flow, ir.Node]] = field(default_factory=list)
    blocked: str | None = None

    def block(self, reason: str) -> None:
        if self.blocked is None:
            self.blocked = reason


def _rank(value: ir.Value, fallback: int | None) -> int | None:
    return len(value.shape) if value.shape is not None else fallback


def _const_dim(shape: tuple[int, ...], axis: int) -> int:
    """The size of a constant's dimension at a negative axis (1 when broadcast from fewer dims)."""
    return shape[axis] if len(shape) >= -axis else 1


def _expand(kept: np.ndarray, inner: int) -> np.ndarray:
    """Indices of the entries that channel indices ``kept`` occupy with ``inner`` entries each."""
    if inner == 1:
        return kept
    return (kept[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)


class _Tracer:
    """Follows a producer's output channels through the graph (see the module docstring)."""

    def __init__(self, graph: ir.Graph | ir.Function) -> None:
        self.graph = graph

    def trace(self, producer: WeightLayer) -> Trace:
        weight = producer.array()
        channels = weight.shape[producer.out_axis]
        trace = Trace(producer, channels)
        out = producer.output
        if producer.node.op_type == "Conv":
            flow = Flow(axis=-(weight.ndim - 1), rank=weight.ndim)
        else:
            flow = Flow(axis=-1, rank=_rank(out, 2 if producer.node.op_type == "Gemm" else None))
        stack = [(out, flow)]
        while stack and trace.blocked is None:
            value, flow = stack.pop()
            if id(value) in trace.values:
                if trace.values[id(value)][1] != flow:
                    trace.block(f"value '{value.name}' carries the channels in two layouts")
                continue
            trace.values[id(value)] = (value, flow)
            if value.is_graph_output():
                trace.block(f"value '{value.name}' is a graph output")
                break
            for use in value.uses():
                follow = self._follow(trace, use.node, use.idx, value, flow)
                if follow is None:
                    break
                stack.extend(follow)
        return trace

    def _follow(
        self, trace: Trace, node: ir.Node, idx: int, value: ir.Value, flow: Flow
    ) -> list[tuple[ir.Value, Flow]] | None:
        """What the node passes on; None (after blocking the trace) when it stops the group."""
        where = describe_node(node)
        if node.graph is not self.graph:
            trace.block(f"{where} reads the channels from a subgraph")
            return None
        if node.domain not in ("", "ai.onnx"):
            trace.block(f"{where} is a custom op")
            return None
        op = node.op_type
        out = node.outputs[0]
        passed = Flow(flow.axis, flow.inner, _rank(out, flow.rank))
        if op in _UNARY and idx == 0:
            if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
                trace.block(f"{where}: its mask output is used")
                return None
            if op == "Cast" and node.outputs[0].dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16, None):
                trace.block(f"{where} casts the channels to {node.outputs[0].dtype}")
                return None
            if op == "Clip" and any(v is not None and constant_value(v) is None for v in node.inputs[1:]):
                trace.block(f"{where} has computed bounds")
                return None
            return [(out, passed)]
        if op == "PRelu" and idx == 0:
            return self._with_constant(trace, node, 1, flow, passed)
        if op in _PER_CHANNEL_NORMS and idx == 0:
            if flow.positive_axis != 1 or flow.inner != 1:
                trace.block(f"{where} normalizes axis 1, the channels are on another axis")
                return None
            for i in _PER_CHANNEL_NORMS[op]:
                if constant_value(node.inputs[i]) is None:
                    trace.block(f"{where} has a computed parameter")
                    return None
                trace.slices[(id(node), i)] = (node, i, 0, 1)
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                trace.block(f"{where} is in training mode")
                return None
            return [(out, passed)]
        if op in _POOLS and idx == 0:
            if flow.positive_axis != 1 or flow.inner != 1:
                trace.block(f"{where} pools a tensor whose channels are not on axis 1")
                return None
            if len(node.outputs) > 1 and node.outputs[1].uses():
                trace.block(f"{where}: its indices output is used")
                return None
            return [(out, passed)]
        if op in _BINARY:
            if op == "Pow" and idx != 0:
                trace.block(f"{where} uses the channels as an exponent")
                return None
            other_idx = 1 - idx
            other = node.inputs[other_idx]
            if other is value:
                return [(out, passed)]
            if constant_value(other) is not None:
                return self._with_constant(trace, node, other_idx, flow, passed)
            trace.joins.append((other, flow, node))
            return [(out, passed)]
        if op in _REDUCES and idx == 0:
            return self._reduce(trace, node, flow)
        if op == "Flatten" and idx == 0:
            return self._flatten(trace, node, value, flow)
        if op == "Reshape" and idx == 0:
            return self._reshape(trace, node, value, flow)
        if op in WEIGHT_OPS and idx == 0:
            return self._consumer(trace, node, flow, passed)
        trace.block(f"{where} reads the channels and is not followed (op {op}, input {idx})")
        return None

    def _with_constant(
        self, trace: Trace, node: ir.Node, const_idx: int, flow: Flow, passed: Flow
    ) -> list[tuple[ir.Value, Flow]] | None:
        tensor = constant_value(node.inputs[const_idx])
        if tensor is None:
            trace.block(f"{describe_node(node)} has a computed parameter")
            return None
        shape = tuple(tensor.shape)
        if len(shape) > (passed.rank or len(shape)):
            trace.block(f"{describe_node(node)}: its constant has more axes than the channels' value")
            return None
        size = _const_dim(shape, flow.axis)
        if size == trace.channels * flow.inner:
            trace.slices[(id(node), const_idx)] = (node, const_idx, flow.axis, flow.inner)
        elif size != 1:
            trace.block(f"{describe_node(node)}: constant of shape {list(shape)} does not broadcast per channel")
            return None
        return [(node.outputs[0], passed)]

    def _reduce(self, trace: Trace, node: ir.Node, flow: Flow) -> list[tuple[ir.Value, Flow]] | None:
        """A reduction over other axes than the channels (global pooling as ReduceMean) carries them."""
        where = describe_node(node)
        position, rank = flow.positive_axis, flow.rank
        if position is None or rank is None or flow.inner != 1:
            trace.block(f"{where}: the rank of its input is unknown")
            return None
        if "axes" in node.attributes:
            axes = list(node.attributes["axes"].as_ints())
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            tensor = constant_value(node.inputs[1])
            if tensor is None:
                trace.block(f"{where} has computed axes")
                return None
            axes = [int(a) for a in tensor.numpy().reshape(-1)]
        else:
            axes = []
        noop = node.attributes.get("noop_with_empty_axes")
        if not axes and not (noop is not None and noop.as_int()):
            trace.block(f"{where} reduces every axis, the channels too")
            return None
        axes = [a + rank if a < 0 else a for a in axes]
        if position in axes:
            trace.block(f"{where} reduces over the channels")
            return None
        keepdims = node.attributes.get("keepdims")
        if keepdims is None or keepdims.as_int():
            return [(node.outputs[0], Flow(flow.axis, 1, rank))]
        new_rank = rank - len(set(axes))
        new_position = position - sum(1 for a in set(axes) if a < position)
        return [(node.outputs[0], Flow(new_position - new_rank, 1, new_rank))]

    def _flatten(self, trace: Trace, node: ir.Node, value: ir.Value, flow: Flow) -> list[tuple[ir.Value, Flow]] | None:
        shape = value.shape
        axis_attr = node.attributes.get("axis")
        axis = axis_attr.as_int() if axis_attr is not None else 1
        position = flow.positive_axis
        if shape is None or position is None:
            trace.block(f"{describe_node(node)}: the shape of its input is unknown")
            return None
        if axis < 0:
            axis += len(shape)
        if axis != position:
            trace.block(f"{describe_node(node)} flattens at axis {axis}, the channels are on axis {position}")
            return None
        tail = list(shape)[position + 1 :]
        if not all(isinstance(d, int) for d in tail):
            trace.block(f"{describe_node(node)}: the axes after the channels are not static")
            return None
        return [(node.outputs[0], Flow(-1, flow.inner * math.prod(tail), 2))]

    def _reshape(self, trace: Trace, node: ir.Node, value: ir.Value, flow: Flow) -> list[tuple[ir.Value, Flow]] | None:
        where = describe_node(node)
        target = constant_value(node.inputs[1])
        shape = value.shape
        position = flow.positive_axis
        if target is None or shape is None or position is None:
            trace.block(f"{where}: its target or its input shape is not known, the channel layout cannot be proved")
            return None
        dims = [int(d) for d in target.numpy().reshape(-1)]
        allow_zero = node.attributes.get("allowzero")
        allow_zero = allow_zero.as_int() if allow_zero is not None else 0
        tail = list(shape)[position:]
        if len(dims) != position + 1 or not all(isinstance(d, int) for d in tail):
            trace.block(f"{where} does not merge the channels with static axes after them ({dims})")
            return None
        merged = math.prod(tail)
        last = dims[-1]
        if last not in (-1, merged):
            trace.block(f"{where} splits the channel axis ({dims} from {list(shape)})")
            return None
        for i, d in enumerate(dims[:-1]):
            ok = (d == 0 and not allow_zero) or d == shape[i] or (d == -1 and last != -1)
            if not ok:
                trace.block(f"{where} changes the axes before the channels ({dims} from {list(shape)})")
                return None
        if last == merged:
            trace.reshapes[id(node)] = (node, len(dims) - 1)
        inner = flow.inner * math.prod(tail[1:])
        return [(node.outputs[0], Flow(-1, inner, len(dims)))]

    def _consumer(self, trace: Trace, node: ir.Node, flow: Flow, passed: Flow) -> list[tuple[ir.Value, Flow]] | None:
        where = describe_node(node)
        layer, reason = weight_layer(node, self.graph)
        if layer is None:
            trace.block(f"{where} reads the channels: {reason}")
            return None
        if len(layer.weight.uses()) != 1:
            trace.block(f"{where}: its weight is shared with other nodes")
            return None
        weight = layer.array()
        if node.op_type == "Conv":
            if flow.positive_axis != 1 or flow.inner != 1:
                trace.block(f"{where} reads channels that are not on axis 1")
                return None
            groups = layer.groups
            if groups == 1:
                trace.consumers[id(node)] = (layer, flow)
                return []
            if groups == trace.channels and weight.shape[0] == groups and weight.shape[1] == 1:
                trace.depthwise[id(node)] = node
                trace.slices[(id(node), 1)] = (node, 1, -weight.ndim, 1)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    trace.slices[(id(node), 2)] = (node, 2, -1, 1)
                return [(node.outputs[0], passed)]
            trace.block(f"{where} is a grouped convolution (group={groups})")
            return None
        if layer.data_axis == 0 or flow.axis != -1:
            trace.block(f"{where} contracts another axis than the channels")
            return None
        if weight.shape[layer.in_axis] != trace.channels * flow.inner:
            trace.block(f"{where} has {weight.shape[layer.in_axis]} input rows for {trace.channels}x{flow.inner}")
            return None
        trace.consumers[id(node)] = (layer, flow)
        return []


@dataclass
class Group:
    """Producers that lose the same channels, and everything their traces touch."""

    traces: list[Trace]

    @property
    def name(self) -> str:
        return self.traces[0].producer.name

    @property
    def channels(self) -> int:
        return self.traces[0].channels

    def blocked(self) -> str | None:
        for trace in self.traces:
            if trace.blocked:
                own = trace.producer.name == self.name
                return trace.blocked if own else f"through {trace.producer.name}: {trace.blocked}"
        return None

    def consumers(self) -> Iterator[tuple[WeightLayer, Flow]]:
        seen: set[int] = set()
        for trace in self.traces:
            for key, item in trace.consumers.items():
                if key not in seen:
                    seen.add(key)
                    yield item


def _groups(traces: list[Trace]) -> list[Group]:
    """Unions the traces that meet in a binary op; blocks joins with values no trace carries."""
    parent = list(range(len(traces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    carriers: dict[int, list[tuple[int, Flow]]] = {}
    for i, trace in enumerate(traces):
        for key, (_, flow) in trace.values.items():
            carriers.setdefault(key, []).append((i, flow))
    for i, trace in enumerate(traces):
        for other, flow, node in trace.joins:
            found = carriers.get(id(other), [])
            if not found:
                trace.block(f"{describe_node(node)} adds channels that come from elsewhere ('{other.name}')")
                continue
            for j, other_flow in found:
                if other_flow.axis != flow.axis or other_flow.inner != flow.inner:
                    trace.block(f"{describe_node(node)} meets the channels in another layout")
                elif traces[j].channels != trace.channels:
                    trace.block(f"{describe_node(node)} joins groups of {trace.channels} and {traces[j].channels} channels")
                else:
                    parent[find(i)] = find(j)
    members: dict[int, list[Trace]] = {}
    for i, trace in enumerate(traces):
        members.setdefault(find(i), []).append(trace)
    return [Group(m) for m in members.values()]


def _slice_constant(node: ir.Node, idx: int, axis: int, indices: np.ndarray, graph: ir.Graph | ir.Function) -> None:
    value = node.inputs[idx]
    assert value is not None
    tensor = constant_value(value)
    assert tensor is not None
    array = tensor.numpy()
    sliced = np.take(array, indices, axis=axis if axis >= 0 else array.ndim + axis)
    if len(value.uses()) == 1 and not value.is_graph_output():
        set_constant(value, sliced)
        return
    replacement = new_initializer(graph, sliced, f"{value.name or 'const'}_pruned")
    node.replace_input_with(idx, replacement)


@register
class PruneChannelsPass(OnnxpressPass):
    """Remove output channels of Conv, Gemm and MatMul and the matching inputs of their consumers."""

    name = "prune-channels"
    Config = PruneChannelsConfig
    needs = Needs(
        calibration_when="criterion is activation or compensation is not none",
        calibration_if=lambda c: c.compensation != "none" or c.criterion == "activation",
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        infer_shapes(model)
        macs_before = weight_macs(model)
        ratios = parse_ratios(cfg.per_layer, "per_layer")
        left_alone: dict[str, str] = {}
        plans: list[tuple[Group, float, ir.Graph | ir.Function]] = []
        for graph in graph_likes(model):
            tracer = _Tracer(graph)
            traces = []
            for node in graph:
                if node.op_type not in cfg.ops:
                    continue
                layer, _ = weight_layer(node, graph)
                if layer is None:
                    continue
                if node.op_type == "Conv" and layer.groups != 1:
                    left_alone[layer.name] = f"grouped convolution (group={layer.groups})"
                    continue
                if node.op_type == "Gemm" and layer.data_axis == 0:
                    left_alone[layer.name] = "Gemm with transA"
                    continue
                trace = tracer.trace(layer)
                if len(layer.weight.uses()) != 1:
                    trace.block("its weight is shared with other nodes")
                bias = node.inputs[2] if len(node.inputs) > 2 else None
                if bias is not None:
                    tensor = constant_value(bias)
                    if tensor is None or len(bias.uses()) != 1:
                        trace.block("its bias is computed or shared")
                    elif tuple(tensor.shape) not in ((), (1,), (trace.channels,)):
                        trace.block(f"its bias of shape {list(tensor.shape)} is not per channel")
                    elif tuple(tensor.shape) == (trace.channels,):
                        trace.slices[(id(node), 2)] = (node, 2, -1, 1)
                traces.append(trace)
            for group in _groups(traces):
                names = [n for t in group.traces for n in (t.producer.name, t.producer.node.name)]
                reason = group.blocked()
                ratio = ratio_for(names, ratios)
                ratio = cfg.ratio if ratio is None else ratio
                if reason is None and matches(cfg.exclude, *names):
                    reason = "excluded by the exclude option"
                if reason is None and group.channels < cfg.min_channels:
                    reason = f"{group.channels} channels < min_channels {cfg.min_channels}"
                if reason is None and ratio == 0:
                    reason = "ratio 0"
                if reason is None and not any(True for _ in group.consumers()) and not group.traces[0].depthwise:
                    reason = "no consumer reads its channels"
                if reason is not None:
                    left_alone[group.name] = reason
                    logger.info("prune-channels: leaving %s alone: %s", group.name, reason)
                else:
                    plans.append((group, ratio, graph))
        self.details = {"groups": {}, "left_alone": left_alone}
        if not plans:
            message = "no prunable channel group; the model is left as it is"
            self.details["message"] = message
            logger.info("prune-channels: %s (%d groups left alone)", message, len(left_alone))
            return ir.passes.PassResult(model, modified=False)

        criterion = cfg.criterion
        if criterion == "auto":
            criterion = "activation" if self.calibration is not None else "l1"
        batches = []
        if criterion == "activation" or cfg.compensation != "none":
            batches = take_batches(self.calibration, model, cfg.calibration_batches)
        reference = ir.to_proto(model).SerializeToString() if cfg.compensation != "none" else b""
        stats = {}
        if criterion == "activation":
            requests = {}
            for group, _, graph in plans:
                if graph is not model.graph:
                    continue
                for layer, _ in group.consumers():
                    requests[layer.data.name] = layer.data_axis
            stats = channel_stats(model, requests, batches)

        keeps = []
        for group, ratio, _ in plans:
            importance = self._importance(group, criterion, stats, centred=cfg.compensation != "none")
            keep = max(1, group.channels - round(ratio * group.channels))
            if cfg.round_to > 1:  # the nearest multiple: onnxruntime's blocked kernels want 8 or 16
                keep = max(cfg.round_to, round(keep / cfg.round_to) * cfg.round_to)
            keep = min(keep, group.channels)
            kept = np.sort(np.argsort(-importance, kind="stable")[:keep])
            keeps.append(kept)

        targets: dict[int, BiasTarget] = {}
        removed = 0
        for i, ((group, _, graph), kept) in enumerate(zip(plans, keeps, strict=True)):
            self._report(i, len(plans), group.name)
            if len(kept) == group.channels:
                left_alone[group.name] = "rounding keeps every channel"
                continue
            self._apply(group, kept, graph)
            removed += group.channels - len(kept)
            for trace in group.traces:
                target = targets.setdefault(id(trace.producer.node), BiasTarget(trace.producer))
                target.kept = kept
            for layer, _ in group.consumers():
                targets.setdefault(id(layer.node), BiasTarget(layer))
            self.details["groups"][group.name] = {
                "producers": [t.producer.name for t in group.traces],
                "consumers": [layer.name for layer, _ in group.consumers()],
                "channels_before": group.channels,
                "channels_after": len(kept),
            }
        for graph in graph_likes(model):
            for node in graph:
                for out in node.outputs:
                    if not out.is_graph_output():
                        out.shape = None
        infer_shapes(model)
        if cfg.compensation == "bias" and targets:
            self.details["compensation"] = correct_output_means(reference, model, list(targets.values()), batches)
        elif cfg.compensation == "weights" and targets:
            self.details["compensation"] = reconstruct_outputs(
                reference, model, list(targets.values()), batches, cfg.damping
            )
        if cfg.compensation != "none" and targets:
            infer_shapes(model)
        macs_after = weight_macs(model)
        pruned = len(self.details["groups"])
        self.details.update(
            criterion=criterion, channels_removed=removed, macs_before=macs_before, macs_after=macs_after
        )
        logger.info(
            "prune-channels: %d channels removed from %d groups (%d left alone), weight-layer MACs per sample %d -> %d",
            removed, pruned, len(left_alone), macs_before, macs_after,
        )
        return ir.passes.PassResult(model, modified=bool(pruned))

    @staticmethod
    def _importance(group: Group, criterion: str, stats: dict, *, centred: bool) -> np.ndarray:
        channels = group.channels
        if criterion == "activation":
            energy = np.zeros(channels)
            found = False
            for layer, flow in group.consumers():
                s = stats.get(layer.data.name or "")
                if s is None:
                    continue
                weight = layer.array().astype(np.float64)
                rows = np.moveaxis(weight, layer.in_axis, 0).reshape(weight.shape[layer.in_axis], -1)
                squares = s.squares / max(s.count, 1)
                if centred:
                    squares = np.maximum(squares - np.square(s.mean), 0.0)
                if squares.shape[0] != rows.shape[0]:
                    continue
                contribution = np.square(rows).sum(axis=1) * squares
                energy += contribution.reshape(channels, flow.inner).sum(axis=1)
                found = True
            if found:
                return np.sqrt(energy)
        score = np.zeros(channels)
        for trace in group.traces:
            weight = trace.producer.array().astype(np.float64)
            l1 = np.abs(np.moveaxis(weight, trace.producer.out_axis, 0).reshape(channels, -1)).sum(axis=1)
            score += l1 / max(float(l1.mean()), 1e-30)
        return score

    @staticmethod
    def _apply(group: Group, kept: np.ndarray, graph: ir.Graph | ir.Function) -> None:
        done: set[tuple[int, int]] = set()
        for trace in group.traces:
            producer = trace.producer
            set_constant(producer.weight, np.take(producer.array(), kept, axis=producer.out_axis))
            for key, (node, idx, axis, inner) in trace.slices.items():
                if key not in done:
                    done.add(key)
                    _slice_constant(node, idx, axis, _expand(kept, inner), graph)
            for key, (node, position) in trace.reshapes.items():
                if (key, -1) in done:
                    continue
                done.add((key, -1))
                target = constant_value(node.inputs[1])
                assert target is not None
                dims = target.numpy().copy()
                dims[position] = dims[position] // group.channels * len(kept)
                value = node.inputs[1]
                if len(value.uses()) == 1 and not value.is_graph_output():
                    set_constant(value, dims)
                else:
                    node.replace_input_with(1, new_initializer(graph, dims, f"{value.name or 'shape'}_pruned"))
            for key, node in trace.depthwise.items():
                if (key, -2) not in done:
                    done.add((key, -2))
                    node.attributes["group"] = ir.AttrInt64("group", len(kept))
        for layer, flow in group.consumers():
            key = (id(layer.node), 1)
            if key in done:
                continue
            done.add(key)
            set_constant(layer.weight, np.take(layer.array(), _expand(kept, flow.inner), axis=layer.in_axis))
