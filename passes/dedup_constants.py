"""dedup-constants: identical constants share one tensor.

Initializers and ``Constant`` nodes with the same dtype, shape and bytes are merged: readers of
a duplicate read the first copy instead. Candidates are grouped by ``(dtype, shape, nbytes)``
and only tensors that share a group are hashed (SHA-256), so a model of large distinct weights
is never read twice; equal hashes are confirmed byte for byte before merging. Hashing and
comparing read memory-mapped weights in place, never copying a tensor.

Scoping follows ONNX: the main graph's initializers are visible in every subgraph, so a
subgraph constant equal to one of them reads that one; a function only sees its own. A main
graph ``Constant`` node is not offered to subgraphs: it may come after the node that holds the
subgraph, and reading it there would break the topological order. Graph inputs and outputs
are never merged away.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress.graphs import constant_value, graph_likes_of_function, replace_output
from onnxpress.passes.base import OnnxpressPass
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DedupConstantsConfig:
    """dedup-constants has no options."""


_CHUNK = 1 << 24


def _buffer(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's bytes as uint8; for memory-mapped external data a view, not a copy."""
    if tensor.dtype == ir.DataType.STRING:
        data = b"".join(len(s).to_bytes(8, "little") + s for s in tensor.string_data())
        return np.frombuffer(data, np.uint8)
    return np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte equality in 16 MiB slices, so no full-size boolean array is made."""
    return a.size == b.size and all(
        np.array_equal(a[i : i + _CHUNK], b[i : i + _CHUNK]) for i in range(0, a.size, _CHUNK)
    )


def _candidates(graph: ir.Graph | ir.Function) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    found = []
    if isinstance(graph, ir.Graph):
        for value in graph.initializers.values():
            if value.const_value is not None and not value.is_graph_input() and not value.is_graph_output():
                found.append((value, value.const_value))
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.outputs) == 1:
            tensor = constant_value(node.outputs[0])
            if tensor is not None and not node.outputs[0].is_graph_output():
                found.append((node.outputs[0], tensor))
    return found


class _Table:
    """Constants seen so far, grouped by (dtype, shape, nbytes), hashed on demand."""

    def __init__(self) -> None:
        self.groups: dict[tuple, list[tuple[ir.Value, ir.TensorProtocol]]] = defaultdict(list)
        self.digests: dict[int, str] = {}

    @staticmethod
    def key(tensor: ir.TensorProtocol) -> tuple:
        return (tensor.dtype, tuple(tensor.shape.numpy()), tensor.nbytes)

    def digest(self, tensor: ir.TensorProtocol) -> str:
        ident = id(tensor)
        if ident not in self.digests:
            self.digests[ident] = hashlib.sha256(_buffer(tensor)).hexdigest()
        return self.digests[ident]

    def find(self, tensor: ir.TensorProtocol) -> ir.Value | None:
        group = self.groups.get(self.key(tensor), [])
        if not group:
            return None
        digest = self.digest(tensor)
        for value, other in group:
            if self.digest(other) == digest and _equal(_buffer(other), _buffer(tensor)):
                return value
        return None

    def add(self, value: ir.Value, tensor: ir.TensorProtocol) -> None:
        self.groups[self.key(tensor)].append((value, tensor))


def _remove_duplicate(graph: ir.Graph | ir.Function, duplicate: ir.Value) -> None:
    producer = duplicate.producer()
    if producer is not None:
        graph.remove(producer, safe=True)
    elif isinstance(graph, ir.Graph):
        del graph.initializers[duplicate.name]


@register
class DedupConstantsPass(OnnxpressPass):
    """Make identical initializers and Constant nodes (dtype, shape, bytes) share one tensor."""

    name = "dedup-constants"
    Config = DedupConstantsConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = _Table()
        main_initializers = _Table()
        merged = 0
        saved = 0
        # (graph, tables it may read from, its own table first): subgraphs of the main graph
        # see the main graph's initializers; functions and their subgraphs see only their own.
        scopes: list[tuple[ir.Graph | ir.Function, list[_Table]]] = [(model.graph, [main])]
        scopes += [(g, [_Table(), main_initializers]) for g in model.graph.subgraphs()]
        for function in model.functions.values():
            scopes += [(g, [_Table()]) for g in graph_likes_of_function(function)]
        for graph, tables in scopes:
            own = tables[0]
            for value, tensor in _candidates(graph):
                keeper = next((k for t in tables if (k := t.find(tensor)) is not None), None)
                if keeper is None or not replace_output(value, keeper):
                    own.add(value, tensor)
                    if graph is model.graph and value.is_initializer():
                        main_initializers.add(value, tensor)
                    continue
                _remove_duplicate(graph, value)
                merged += 1
                saved += tensor.nbytes
        self.details = {"merged": merged, "bytes_saved": saved}
        logger.info("dedup-constants merged %d constants, saving %d bytes", merged, saved)
        return ir.passes.PassResult(model, modified=bool(merged))
