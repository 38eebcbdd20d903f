r"""Per-node error localization: which node of a candidate model adds the error.

Both models are copied with every shared intermediate value added to the graph outputs, run
on the same few batches, and each shared value's signal-to-quantization-noise ratio is
accumulated (reference ``r``, candidate ``c``, over all elements of all batches):

.. math::

    \mathrm{SQNR}(v) = 10 \log_{10} \frac{\sum r_v^2}{\sum (r_v - c_v)^2} \ \mathrm{dB}

A node ``n`` of the reference graph whose output ``v`` is shared gets

.. math::

    \mathrm{SQNR}_{in}(n) = \min_{u \in \mathrm{inputs}(n)} \mathrm{SQNR}(u), \qquad
    \mathrm{added}(n) = \mathrm{SQNR}_{in}(n) - \mathrm{SQNR}(v)

where graph inputs are exact (:data:`~onnxpress.runtime.metrics.MAX_SQNR_DB`), constants
(weights) do not count as inputs (their error is the node's own), and an input that is not
shared is replaced by the nearest shared values upstream of it. A node that only passes error
along has ``added`` near 0 dB; the node with a perturbed or badly quantized weight has a large
one. Nodes are ranked by ``added``, largest first.

Shared values are those with the same name in both graphs (onnxruntime's QDQ quantizer keeps
the float names), a candidate value ``<name>_dequantized`` for a reference value ``<name>``,
or a pair given in ``value_map`` (reference name to candidate name, e.g. from pass records
that renamed values). Only floating-point tensors of the same shape are compared.

Library use (the quantizer's ``--auto-exclude``)::

    from onnxpress.runtime import localize
    table = localize("model.onnx", "model.int8.onnx", batches, top=5)
    exclude = [row.node for row in table if row.added_db > 10]
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.errors import InputError
from onnxpress.graphs import constant_value, infer_shapes
from onnxpress.model_io import load_model, save_model
from onnxpress.runtime.metrics import MAX_SQNR_DB, sqnr_db
from onnxpress.sessions import load_session

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class NodeError:
    """The error one reference node adds, measured on its output.

    Attributes:
        node: The reference node's name (the name a quantizer's exclude list takes).
        op_type: The reference node's op type.
        output: The value compared (the node's output name in the reference).
        candidate_node: The node that computes the value in the candidate ('' if unnamed).
        candidate_op_type: Its op type (e.g. ``MatMul`` or ``DequantizeLinear``).
        sqnr_in_db: The worst SQNR among the node's inputs, dB.
        sqnr_out_db: The SQNR of its output, dB.
        added_db: ``sqnr_in_db - sqnr_out_db``: the error the node adds, dB.
        rel_l2_error: ``||r - c|| / ||r||`` of the output.
    """

    node: str
    op_type: str
    output: str
    candidate_node: str
    candidate_op_type: str
    sqnr_in_db: float
    sqnr_out_db: float
    added_db: float
    rel_l2_error: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ModelLike = str | os.PathLike[str] | ir.Model


def _as_model(model: ModelLike) -> tuple[ir.Model, bool]:
    """The model as onnx_ir and whether it is our own copy (a path we loaded)."""
    if isinstance(model, ir.Model):
        return model, False
    return load_model(model), True


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for value in graph.inputs:
        if value.name:
            values[value.name] = value
    for node in graph:
        for value in node.outputs:
            if value.name:
                values[value.name] = value
    return values


def _is_comparable(value: ir.Value) -> bool:
    return value.dtype in _FLOAT_TYPES and constant_value(value) is None


def shared_values(
    reference: ir.Model, candidate: ir.Model, value_map: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Reference value name -> candidate value name for every intermediate both compute.

    Graph inputs and constants are left out; only floating-point values whose known shapes
    agree are kept.
    """
    ref_values = _values_by_name(reference.graph)
    cand_values = _values_by_name(candidate.graph)
    pairs: dict[str, str] = {}
    for name, value in ref_values.items():
        if value.is_graph_input() or value.producer() is None or not _is_comparable(value):
            continue
        target = (value_map or {}).get(name)
        if target is None:
            if name in cand_values:
                target = name
            elif f"{name}_dequantized" in cand_values:
                target = f"{name}_dequantized"
        other = cand_values.get(target) if target else None
        if other is None or other.is_graph_input() or not _is_comparable(other):
            continue
        if value.shape is not None and other.shape is not None and value.shape.rank() != other.shape.rank():
            continue
        pairs[name] = target  # type: ignore[assignment]
    return pairs


def _expose(model: ir.Model, names: Iterable[str]) -> list[ir.Value]:
    """Adds the named values to the main graph's outputs; returns those added."""
    values = _values_by_name(model.graph)
    present = {v.name for v in model.graph.outputs}
    added = []
    for name in names:
        value = values[name]
        if name in present or value.type is None:
            continue
        model.graph.outputs.append(value)
        added.append(value)
    return added


def _session_with_outputs(model: ir.Model, names: Iterable[str], workdir: Path, label: str) -> Any:
    """An onnxruntime session of ``model`` with ``names`` exposed; the model is restored after."""
    added = _expose(model, names)
    try:
        path = workdir / label / "model.onnx"
        path.parent.mkdir()
        # save_model writes external data above 1.5 GB, so a large model never becomes one protobuf.
        save_model(model, path)
    finally:
        for value in added:
            model.graph.outputs.remove(value)
    return load_session(path)


def _upstream_shared(node: ir.Node, shared: set[str], cache: dict[str, list[str]]) -> list[str]:
    """For each non-constant input of ``node``: itself when shared, else the nearest shared values above it."""
    found: list[str] = []
    for value in node.inputs:
        if value is None or constant_value(value) is not None:
            continue
        found.extend(_nearest_shared(value, shared, cache))
    return found


def _nearest_shared(value: ir.Value, shared: set[str], cache: dict[str, list[str]]) -> list[str]:
    name = value.name or ""
    if name in cache:
        return cache[name]
    if value.is_graph_input():
        result = ["<input>"]
    elif name in shared:
        result = [name]
    else:
        producer = value.producer()
        cache[name] = []  # breaks cycles (none in a valid graph, but be safe)
        result = _upstream_shared(producer, shared, cache) if producer is not None else []
    cache[name] = result
    return result


def localize(
    reference: ModelLike,
    candidate: ModelLike,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    top: int | None = None,
    value_map: Mapping[str, str] | None = None,
    max_batches: int = 4,
) -> list[NodeError]:
    """Ranks the reference's nodes by the error the candidate adds at each of them.

    Args:
        reference: The reference model (a path or an onnx_ir model; an onnx_ir model is
            changed only while it is saved and is left as it was).
        candidate: The candidate model, likewise.
        batches: Input batches, ``{input_name: array}``; the first ``max_batches`` are used.
        top: Return only the ``top`` worst nodes (all when None).
        value_map: Reference value name -> candidate value name, for values a pass renamed.
        max_batches: How many batches to run.

    Returns:
        One :class:`NodeError` per reference node with a shared output, largest
        ``added_db`` first.

    Raises:
        InputError: The models share no intermediate value, or no batch was given.
    """
    ref_model, _ = _as_model(reference)
    cand_model, _ = _as_model(candidate)
    for model in (ref_model, cand_model):
        if any(v.type is None for node in model.graph for v in node.outputs):
            infer_shapes(model)
    pairs = shared_values(ref_model, cand_model, value_map)
    if not pairs:
        raise InputError(
            "the reference and the candidate share no intermediate value (same name, '<name>_dequantized', "
            "or value_map); cannot localize the error"
        )
    workdir = Path(tempfile.mkdtemp(prefix="onnxpress-localize-"))
    try:
        ref_session = _session_with_outputs(ref_model, pairs.keys(), workdir, "reference")
        cand_session = _session_with_outputs(cand_model, pairs.values(), workdir, "candidate")
        ref_outputs = {o.name for o in ref_session.get_outputs()}
        cand_outputs = {o.name for o in cand_session.get_outputs()}
        pairs = {r: c for r, c in pairs.items() if r in ref_outputs and c in cand_outputs}
        ref_names, cand_names = list(pairs), list(pairs.values())
        ref_inputs = [i.name for i in ref_session.get_inputs()]
        cand_inputs = [i.name for i in cand_session.get_inputs()]
        signal = dict.fromkeys(ref_names, 0.0)
        noise = dict.fromkeys(ref_names, 0.0)
        skipped: set[str] = set()
        runs = 0
        for feeds in batches:
            if runs >= max_batches:
                break
            ref_vals = ref_session.run(ref_names, {k: feeds[k] for k in ref_inputs})
            cand_vals = cand_session.run(cand_names, {k: feeds[k] for k in cand_inputs})
            for name, r, c in zip(ref_names, ref_vals, cand_vals, strict=True):
                if r.shape != c.shape:
                    skipped.add(name)
                    continue
                r64 = r.astype(np.float64, copy=False)
                d = r64 - c.astype(np.float64, copy=False)
                signal[name] += float(np.square(r64).sum())
                noise[name] += float(np.square(d).sum())
            runs += 1
        if runs == 0:
            raise InputError("localization needs at least one input batch")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if skipped:
        logger.info("localization skipped %d values whose shapes differ: %s", len(skipped), sorted(skipped)[:5])
    sqnr = {n: sqnr_db(signal[n], noise[n]) for n in ref_names if n not in skipped}
    rel = {n: float(np.sqrt(noise[n] / signal[n])) if signal[n] > 0 else 0.0 for n in sqnr}
    cand_values = _values_by_name(cand_model.graph)
    shared = set(sqnr)
    cache: dict[str, list[str]] = {}
    table: list[NodeError] = []
    for node in ref_model.graph:
        for value in node.outputs:
            if value.name not in shared:
                continue
            upstream = _upstream_shared(node, shared, cache)
            sqnr_in = min((MAX_SQNR_DB if u == "<input>" else sqnr[u] for u in upstream), default=MAX_SQNR_DB)
            producer = cand_values[pairs[value.name]].producer()
            table.append(NodeError(
                node=node.name or "", op_type=node.op_type, output=value.name,
                candidate_node=(producer.name or "") if producer else "",
                candidate_op_type=producer.op_type if producer else "",
                sqnr_in_db=round(sqnr_in, 4), sqnr_out_db=round(sqnr[value.name], 4),
                added_db=round(sqnr_in - sqnr[value.name], 4), rel_l2_error=rel[value.name],
            ))
    table.sort(key=lambda e: e.added_db, reverse=True)
    logger.info("localized %d nodes over %d batches; worst: %s", len(table), runs,
                f"{table[0].node} ({table[0].op_type}, +{table[0].added_db:.1f} dB)" if table else "none")
    return table[:top] if top is not None else table
