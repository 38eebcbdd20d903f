"""Walking a whole model: the main graph, every subgraph (If, Loop, Scan) and every local function.

onnx_ir's ``Model.graphs()`` skips local functions and ``RecursiveGraphIterator`` covers one
graph-like at a time; every pass and every statistic in onnxpress needs all of them, so the
walk lives here once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

logger = logging.getLogger(__name__)

GraphLike = ir.Graph | ir.Function


def graph_likes(model: ir.Model) -> Iterator[GraphLike]:
    """Yields the main graph, its subgraphs, then each function and the subgraphs in it."""
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield from graph_likes_of_function(function)


def graph_likes_of_function(function: ir.Function) -> Iterator[GraphLike]:
    """Yields a function, then every subgraph inside it, nested ones included."""
    yield function
    for node in ir.traversal.RecursiveGraphIterator(function):
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.as_graph()
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.as_graphs()


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Yields every node of the model, subgraphs and functions included."""
    for graph in graph_likes(model):
        yield from graph


def initializer_values(model: ir.Model) -> Iterator[ir.Value]:
    """Yields every initializer value of the main graph and of every subgraph."""
    for graph in graph_likes(model):
        if isinstance(graph, ir.Graph):
            yield from graph.initializers.values()


def constant_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Yields ``(owner, tensor)`` for every initializer and every tensor-valued attribute.

    ``owner`` names where the tensor lives: the initializer name, or ``node/attribute``.
    """
    for value in initializer_values(model):
        if value.const_value is not None:
            yield value.name or "", value.const_value
    for node in all_nodes(model):
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                yield f"{node.name or node.op_type}/{attr.name}", attr.value
            elif attr.type == ir.AttributeType.TENSORS and attr.value is not None:
                for i, tensor in enumerate(attr.value):
                    yield f"{node.name or node.op_type}/{attr.name}[{i}]", tensor


def describe_node(node: ir.Node) -> str:
    """A short human name for a node: ``'name' (Domain::OpType)``."""
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    return f"'{node.name}' ({op})" if node.name else f"<unnamed> ({op})"


def constant_value(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor a value always holds, or None.

    A value is constant when it is an initializer that is not also a graph input (a graph
    input can be overridden by the caller) or the output of an ONNX ``Constant`` node.
    """
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # sparse_value or a malformed Constant: treat as unknown
        return None


#: ONNX ops that draw random numbers: never folded ahead of time nor merged with one another.
RANDOM_OPS = frozenset(
    {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}
)


def draws_random(node: ir.Node) -> bool:
    """Whether the node draws random numbers: a random op, or a Dropout that may train."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in RANDOM_OPS:
        return True
    if node.op_type == "Dropout":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = constant_value(node.inputs[2])
            return mode is None or bool(mode.numpy().reshape(-1)[0])
        training = node.attributes.get("training_mode")
        return training is not None and (training.is_ref() or training.as_int() != 0)
    return False


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if not isinstance(dim, int):
            return None
        dims.append(dim)
    return tuple(dims)


def replace_output(old: ir.Value, new: ir.Value) -> bool:
    """Makes every reader of ``old`` read ``new`` instead, graph outputs included.

    When ``old`` is an output of its graph, ``new`` takes its place and its name; that is
    only done when ``new`` is computed by a node of the same graph and is not itself an
    input, initializer or output of a graph (renaming those would change an interface).

    Returns:
        Whether the replacement was made.
    """
    if not old.is_graph_output():
        ir.convenience.replace_all_uses_with(old, new)
        return True
    producer = new.producer()
    graph = old.graph
    if (
        producer is None
        or graph is None
        or producer.graph is not graph
        or new.is_graph_output()
        or new.is_graph_input()
        or new.is_initializer()
        or new.type != old.type
    ):
        return False
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = None
    new.name = name
    return True


def _has_map(type_proto: onnx.TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _has_map(getattr(type_proto, kind).elem_type)
    return False


def nested_graphs(nodes: Iterable[onnx.NodeProto]) -> list[onnx.GraphProto]:
    """Every graph held in the nodes' attributes (If/Loop/Scan bodies), at any depth."""
    found: list[onnx.GraphProto] = []
    for node in nodes:
        for attr in node.attribute:
            for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                found.append(graph)
                found.extend(nested_graphs(graph.node))
    return found


def proto_graphs(proto: onnx.ModelProto) -> list[onnx.GraphProto]:
    """Every graph of the model: the main graph and the subgraphs in it and in its functions."""
    found = [proto.graph, *nested_graphs(proto.graph.node)]
    for function in proto.functions:
        found.extend(nested_graphs(function.node))
    return found


def set_aside_map_types(proto: onnx.ModelProto) -> dict[str, bytes]:
    """Clears map types (sklearn's ZipMap outputs ``seq(map(int64, float))``), which onnx_ir
    cannot read, and returns those of graph inputs and outputs by name, for
    ``onnxpress.model_io.save_model`` to put back. Passes keep the names of graph inputs and
    outputs."""
    types: dict[str, bytes] = {}
    for graph in proto_graphs(proto):
        for info in [*graph.input, *graph.output]:
            if info.HasField("type") and _has_map(info.type):
                types[info.name] = info.type.SerializeToString()
                info.ClearField("type")
        kept = [info for info in graph.value_info if not _has_map(info.type)]
        if len(kept) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
    for function in proto.functions:
        kept = [info for info in function.value_info if not _has_map(info.type)]
        if len(kept) != len(function.value_info):
            del function.value_info[:]
            function.value_info.extend(kept)
    return types


def infer_shapes(model: ir.Model) -> None:
    """Annotates tensor values with onnx's inferred types and shapes, in every graph and subgraph.

    onnx runs without the large initializers (onnx_ir's ``call_onnx_api`` sets them aside, so
    models over 2 GB work) and non-strict, so custom-domain ops are skipped rather than refused.
    Only tensor types are merged back: onnx_ir's own merge turns sequence values into tensors,
    which onnxruntime then refuses to load. A model onnx cannot infer is left as it is.
    """

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

    try:
        inferred_proto = _c_api_utils.call_onnx_api(infer, model)
        set_aside_map_types(inferred_proto)
        inferred = ir.serde.deserialize_model(inferred_proto)
    except Exception as exc:  # onnx raises many types on graphs it cannot follow
        logger.warning("shape inference failed, no-op checks use existing shapes only: %s", exc)
        return
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=False):
        known = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            other = known.get(name)
            if other is None or not isinstance(other.type, ir.TensorType):
                continue
            if value.type is not None and not isinstance(value.type, ir.TensorType):
                continue
            if value.type is None or value.dtype == other.dtype:
                value.type = other.type
                if other.shape is not None:
                    value.shape = other.shape
