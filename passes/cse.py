"""cse: common subexpression elimination in every graph, subgraph and function.

Two nodes with the same op, the same inputs and the same attributes compute the same bits,
so the second one's outputs are replaced by the first one's. The replacement is onnx_ir's
(``CommonSubexpressionEliminationPass``); the matching key is built here, because onnx_ir's
only visits the main graph, compares float attributes with ``==`` (so ``-0.0`` matched
``0.0`` and two Constants of opposite zeros merged), raises on type attributes (``Optional``'s
``type``) and merges ``Bernoulli`` and training-mode ``Dropout``, which draw random bits.

A node is never merged when it has a subgraph, draws random numbers, or has an attribute
that is a reference to a function attribute or a sparse tensor.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import common_subexpression_elimination as ir_cse

from onnxpress.graphs import draws_random, graph_likes
from onnxpress.passes.base import OnnxpressPass, option
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CseConfig:
    """Options of cse."""

    max_constant_elements: int = option(
        16, "Constant nodes with at most this many elements are compared by value."
    )


def _attribute_key(attr: ir.Attr, size_limit: int) -> object | None:
    """A hashable key equal only for attributes with the same bits; None: never merge."""
    if attr.is_ref():
        return None
    kind, value = attr.type, attr.value
    if kind == ir.AttributeType.FLOAT:
        return kind, struct.pack("<f", value)
    if kind == ir.AttributeType.FLOATS:
        return kind, struct.pack(f"<{len(value)}f", *value)
    if kind in (ir.AttributeType.INT, ir.AttributeType.STRING):
        return kind, value
    if kind in (ir.AttributeType.INTS, ir.AttributeType.STRINGS):
        return kind, tuple(value)
    if kind == ir.AttributeType.TENSOR:
        if value.size > size_limit:
            return None
        array = value.numpy()
        data = tuple(array.reshape(-1).tolist()) if array.dtype == object else array.tobytes()
        return kind, value.dtype, array.shape, data
    if kind in (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS):
        return kind, str(value)
    return None  # graphs, sparse tensors, lists of tensors


def _node_key(node: ir.Node, size_limit: int) -> tuple | None:
    if draws_random(node):
        return None
    attributes = []
    for name, attr in sorted(node.attributes.items()):
        key = _attribute_key(attr, size_limit)
        if key is None:
            return None
        attributes.append((name, key))
    return (
        node.op_identifier(),
        len(node.outputs),
        tuple(id(value) for value in node.inputs),
        tuple(attributes),
    )


def _eliminate(graph: ir.Graph | ir.Function, size_limit: int) -> int:
    seen: dict[tuple, ir.Node] = {}
    merged = 0
    for node in list(graph):
        key = _node_key(node, size_limit)
        if key is None:
            continue
        kept = seen.setdefault(key, node)
        if kept is node:
            continue
        ir_cse._remove_node_and_replace_values(  # noqa: SLF001
            graph, remove_node=node, remove_values=node.outputs, new_values=kept.outputs
        )
        merged += 1
    return merged


@register
class CsePass(OnnxpressPass):
    """Merge nodes that compute the same thing from the same inputs (common subexpressions)."""

    name = "cse"
    Config = CseConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        merged = sum(_eliminate(graph, self.config.max_constant_elements) for graph in list(graph_likes(model)))
        self.details = {"merged_nodes": merged}
        logger.info("cse merged %d nodes", merged)
        return ir.passes.PassResult(model, modified=bool(merged))
