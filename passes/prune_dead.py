"""prune-dead: remove what no output depends on.

Removes nodes whose outputs nobody reads, initializers nobody reads (in the main graph and in
every subgraph), and local functions and opset imports that nothing uses. Node removal,
function and opset clean-up are onnx_ir's passes; this pass adds the subgraph initializers and
the counting.

A graph input that is also an initializer stays an input: it is a default the caller may
override (onnxruntime's "overridable initializers"), so turning it into a constant would
change the model's interface and what it computes for such a feed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxpress.graphs import graph_likes
from onnxpress.passes.base import OnnxpressPass
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneDeadConfig:
    """prune-dead has no options."""


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    for graph in graph_likes(model):
        if not isinstance(graph, ir.Graph) or graph is model.graph:
            continue
        outputs = frozenset(graph.outputs)
        inputs = frozenset(graph.inputs)
        for value in list(graph.initializers.values()):
            if not value.uses() and value not in outputs and value not in inputs:
                del graph.initializers[value.name]


def _remove_unused_nodes(model: ir.Model) -> None:
    """onnx_ir's node removal, repeated while removed If/Loop/Scan nodes free more.

    A removed node's subgraphs still read the outer values they used, so those values looked
    used until the model was saved and loaded again (then a second run removed more). Their
    reads are dropped and the removal runs again.
    """
    while True:
        holders = [n for g in graph_likes(model) for n in g if _subgraphs(n)]
        ir_common.RemoveUnusedNodesPass()(model)
        removed = [n for n in holders if n.graph is None]
        if not removed:
            return
        for node in removed:
            for subgraph in _subgraphs(node):
                for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                    for index, value in enumerate(inner.inputs):
                        if value is not None:
                            inner.replace_input_with(index, None)


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


@register
class PruneDeadPass(OnnxpressPass):
    """Remove unused nodes, initializers, functions and opset imports."""

    name = "prune-dead"
    Config = PruneDeadConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = _count_nodes(model)
        inits_before = _count_initializers(model)
        functions_before = len(model.functions)
        opsets_before = _count_opsets(model)

        _remove_unused_nodes(model)
        _remove_unused_subgraph_initializers(model)
        nodes = nodes_before - _count_nodes(model)
        inits = inits_before - _count_initializers(model)
        ir_common.RemoveUnusedFunctionsPass()(model)
        ir_common.RemoveUnusedOpsetsPass()(model)
        functions = functions_before - len(model.functions)
        opsets = opsets_before - _count_opsets(model)

        self.details = {
            "nodes": nodes,
            "initializers": inits,
            "functions": functions,
            "opset_imports": opsets,
        }
        logger.info(
            "prune-dead removed %d nodes, %d initializers, %d functions, %d opset imports",
            nodes, inits, functions, opsets,
        )
        return ir.passes.PassResult(model, modified=bool(nodes + inits + functions + opsets))


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for g in graph_likes(model) for _ in g)


def _count_initializers(model: ir.Model) -> int:
    return sum(len(g.initializers) for g in graph_likes(model) if isinstance(g, ir.Graph))


def _count_opsets(model: ir.Model) -> int:
    return len(model.opset_imports) + sum(len(f.opset_imports) for f in model.functions.values())
