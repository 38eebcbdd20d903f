"""A model's summary: interface, opsets, nodes by op type, constants by dtype, external data."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import onnx_ir as ir

from onnxpress.graphs import all_nodes, constant_tensors, describe_node
from onnxpress.stats import model_stats


def _value_info(value: ir.Value) -> dict[str, Any]:
    shape = None if value.shape is None else [d if isinstance(d, int) else str(d.value or "?") for d in value.shape]
    return {"name": value.name, "dtype": value.dtype.name.lower() if value.dtype else None, "shape": shape}


def _subgraphs(model: ir.Model) -> list[dict[str, Any]]:
    """One entry per subgraph: the node that owns it, the attribute, its node count."""
    found = []
    for node in all_nodes(model):
        for attr in node.attributes.values():
            if attr.is_ref() or attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                continue
            graphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else list(attr.as_graphs())
            for graph in graphs:
                found.append({"node": describe_node(node), "attribute": attr.name, "nodes": len(graph)})
    return found


def summarize(model: ir.Model) -> dict[str, Any]:
    """Everything ``onnxpress inspect`` prints, as a JSON-ready dictionary."""
    stats = model_stats(model)
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    external: Counter[str] = Counter()
    for _, tensor in constant_tensors(model):
        entry = by_dtype[tensor.dtype.name.lower()]
        entry["count"] += 1
        entry["bytes"] += tensor.nbytes
        if isinstance(tensor, ir.ExternalTensor):
            external[str(tensor.location)] += tensor.nbytes
    return {
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opsets": dict(sorted(model.opset_imports.items())),
        "inputs": [_value_info(v) for v in model.graph.inputs],
        "outputs": [_value_info(v) for v in model.graph.outputs],
        "nodes": stats.nodes,
        "op_histogram": dict(sorted(stats.op_histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "constants": dict(sorted(by_dtype.items())),
        "constant_bytes": stats.constant_bytes,
        "subgraphs": _subgraphs(model),
        "functions": sorted(f"{d}::{n}" for d, n, _ in model.functions),
        "external_data": dict(external),
    }
