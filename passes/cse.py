"""cse: common subexpression elimination in every graph, subgraph and function.

Two nodes with the same op, the same inputs and the same attributes compute the same bits,
so the second one's outputs are replaced by the first one's. The matching is onnx_ir's
``CommonSubexpressionEliminationPass`` (which skips control-flow and non-deterministic ops);
it only looks at the main graph, so this pass applies its per-graph routine to every graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxpress.graphs import graph_likes
from onnxpress.passes.base import OnnxpressPass, option
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CseConfig:
    """Options of cse."""

    max_constant_elements: int = option(
        16, "Constant nodes with at most this many elements are compared by value."
    )


@register
class CsePass(OnnxpressPass):
    """Merge nodes that compute the same thing from the same inputs (common subexpressions)."""

    name = "cse"
    Config = CseConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        engine = ir_common.CommonSubexpressionEliminationPass(
            size_limit=self.config.max_constant_elements
        )
        before = sum(1 for g in graph_likes(model) for _ in g)
        modified = False
        for graph in list(graph_likes(model)):
            # The onnx_ir pass only visits model.graph; its per-graph routine works on any graph.
            modified |= engine._eliminate_common_subexpression(graph)  # noqa: SLF001
        merged = before - sum(1 for g in graph_likes(model) for _ in g)
        self.details = {"merged_nodes": merged}
        logger.info("cse merged %d nodes", merged)
        return ir.passes.PassResult(model, modified=modified)
