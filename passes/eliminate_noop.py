"""eliminate-noop: remove nodes that provably return their input unchanged.

A node ``y = op(x, ...)`` is a no-op when, from static types and shapes:

* ``Identity``; ``Dropout`` in inference (no ``training_mode`` or a constant false one, mask unread);
* ``Cast`` whose ``to`` is already ``x``'s element type;
* ``Reshape`` to ``x``'s own static shape; ``Expand`` whose broadcast shape is ``x``'s shape;
* ``Transpose`` with the identity permutation;
* ``Squeeze`` without axes on a shape that has no 1; ``Pad`` with all pads zero;
* ``Slice`` whose constant starts, ends and steps select every element of every axis.

Each is removed and its readers read ``x``. Shapes come from onnx shape inference run first
(non-strict, so custom-domain ops are skipped rather than refused).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress.graphs import constant_value, graph_likes, infer_shapes, replace_output, static_shape
from onnxpress.passes.base import OnnxpressPass
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EliminateNoopConfig:
    """eliminate-noop has no options."""


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = constant_value(value)
    if tensor is None:
        return None
    array = tensor.numpy()
    if array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def _same_static(node: ir.Node) -> tuple[int, ...] | None:
    """The input's static shape if the output's is equal to it, else None."""
    x, y = node.inputs[0], node.outputs[0]
    shape_in, shape_out = static_shape(x), static_shape(y)
    if shape_in is None or shape_in != shape_out:
        return None
    return shape_in


def _slice_is_full(node: ir.Node, shape: tuple[int, ...]) -> bool:
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    if starts is None or ends is None:
        return False
    axes = _ints(inputs[3]) if inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if inputs[4] is not None else [1] * len(starts)
    if axes is None or steps is None:
        return False
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        if step != 1:
            return False
        dim = shape[axis]
        selected = range(dim)[slice(start, end, step)]
        if len(selected) != dim:
            return False
    return True


def is_noop(node: ir.Node) -> bool:
    """Whether the node provably returns its first input unchanged."""
    if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return False
    op = node.op_type
    x = node.inputs[0]
    if op == "Identity":
        return True
    if op == "Dropout":
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = constant_value(node.inputs[2])
            return mode is not None and not bool(np.asarray(mode.numpy()).reshape(-1)[0])
        return "training_mode" not in node.attributes or node.attributes["training_mode"].as_int() == 0
    if len(node.outputs) != 1:
        return False
    if op == "Cast":
        to = node.attributes.get("to")
        return x.dtype is not None and to is not None and not to.is_ref() and to.as_int() == x.dtype.value
    if op == "Transpose":
        perm = node.attributes.get("perm")
        if perm is not None and not perm.is_ref():
            return list(perm.as_ints()) == list(range(len(perm.as_ints())))
        return x.shape is not None and len(x.shape) <= 1
    shape = _same_static(node)
    if shape is None:
        return False
    if op in ("Reshape", "Expand"):
        target = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None:
            return False
        if op == "Reshape":
            return tuple(target) == shape
        return len(target) <= len(shape) and all(t in (1, s) for t, s in zip(target[::-1], shape[::-1], strict=False))
    if op == "Squeeze":
        return (len(node.inputs) < 2 or node.inputs[1] is None) and "axes" not in node.attributes and 1 not in shape
    if op == "Pad":
        pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None and "pads" in node.attributes:
            pads = list(node.attributes["pads"].as_ints())
        return pads is not None and not any(pads)
    if op == "Slice":
        return len(node.inputs) >= 3 and _slice_is_full(node, shape)
    return False


@register
class EliminateNoopPass(OnnxpressPass):
    """Remove Identity, inference Dropout, same-type Cast and shape ops that change nothing."""

    name = "eliminate-noop"
    Config = EliminateNoopConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        infer_shapes(model)
        removed: Counter[str] = Counter()
        for graph in list(graph_likes(model)):
            for node in list(graph):
                if not is_noop(node):
                    continue
                if replace_output(node.outputs[0], node.inputs[0]):
                    graph.remove(node, safe=True)
                    removed[node.op_type] += 1
        self.details = {"removed": dict(removed)}
        logger.info("eliminate-noop removed %d nodes: %s", sum(removed.values()), dict(removed))
        return ir.passes.PassResult(model, modified=bool(removed))
