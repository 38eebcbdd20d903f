"""What a model holds, counted the same way before and after every pass.

Counts cover the main graph, every subgraph and every local function, so a pass that
works inside an ``If`` branch shows up in the numbers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxpress.graphs import all_nodes, constant_tensors, graph_likes


@dataclass(frozen=True)
class ModelStats:
    """Counts that describe a model's size.

    Attributes:
        nodes: Nodes in all graphs and functions.
        op_histogram: Node count per op type (``domain::op`` outside the ONNX domain).
        constants: Number of constant tensors (initializers and tensor attributes).
        constant_bytes: Bytes those constants hold.
        functions: Local functions.
        subgraphs: Subgraphs (If branches, Loop and Scan bodies), nested ones included.
    """

    nodes: int
    op_histogram: dict[str, int] = field(default_factory=dict)
    constants: int = 0
    constant_bytes: int = 0
    functions: int = 0
    subgraphs: int = 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary."""
        return {
            "nodes": self.nodes,
            "op_histogram": dict(sorted(self.op_histogram.items())),
            "constants": self.constants,
            "constant_bytes": self.constant_bytes,
            "functions": self.functions,
            "subgraphs": self.subgraphs,
        }


def op_key(node: ir.Node) -> str:
    """The histogram key of a node: its op type, prefixed by a custom domain."""
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def model_stats(model: ir.Model) -> ModelStats:
    """Counts nodes, op types and constants of the whole model."""
    histogram = Counter(op_key(node) for node in all_nodes(model))
    constants = 0
    nbytes = 0
    for _, tensor in constant_tensors(model):
        constants += 1
        nbytes += tensor.nbytes
    subgraphs = sum(1 for g in graph_likes(model) if isinstance(g, ir.Graph)) - 1
    return ModelStats(
        nodes=sum(histogram.values()),
        op_histogram=dict(histogram),
        constants=constants,
        constant_bytes=nbytes,
        functions=len(model.functions),
        subgraphs=subgraphs,
    )
