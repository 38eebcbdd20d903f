r"""Per-node error localization: which node of a candidate model adds the error.

Both models are copied with every shared intermediate value added to the graph outputs, run
on the same few batches, and each shared value's signal-to-quantization-noise ratio is
accumulated (reference ``r``, candidate ``c``, over all elements of all batches):

.. math::

    \mathrm{SQNR}(v) = 10 \log_{10} \frac{\sum r_v^2}{\sum (r_v - c_v)^2} \ \mathrm{dB}

Each node is judged in isolation, so error that merely flows through it is not blamed on it:
a third copy of the candidate has every use of a shared value rewired to a new graph input,
which is fed the *reference's* value. Every candidate node (or chain of nodes between shared
values, e.g. ``QuantizeLinear -> DequantizeLinear -> Conv``) then computes from exact inputs,
and the error of its output is its own:

.. math::

    \mathrm{SQNR}_{node}(v) = 10 \log_{10} \frac{\sum r_v^2}{\sum (r_v - \tilde c_v)^2}, \qquad
    \mathrm{added}(v) = 10^{-\mathrm{SQNR}_{node}(v)/10}

with :math:`\tilde c_v` the candidate's value computed from exact inputs. Nodes are ranked by
``added`` (the noise-to-signal power the node adds), largest first. For context each row also
carries the propagated SQNR of the normal candidate run at the node's inputs (the worst of
them; graph inputs are exact, constants are not inputs, an input that is not shared is
replaced by the nearest shared values upstream) and at its output. The propagated drop alone
would mislead: a Relu after a noisy layer "loses" dB (it cuts signal, not noise) without
adding any error, and a slightly noisy first layer (exact inputs) "drops" more dB than a
badly broken later one.

Shared values are found, for each reference value ``<name>``, as the candidate's
``<name>_DequantizeLinear_Output`` (onnxruntime's QDQ quantizer), ``<name>_dequantized``, or
``<name>`` itself, in that order (the dequantized copy is what the candidate's consumers read;
with a fused ``Conv + Relu`` the quantizer even leaves the plain name on the pre-activation
value), or as given in ``value_map`` (reference name to candidate name, e.g. from pass
records that renamed values). Only floating-point tensors of the same shape are compared.

The sessions run at onnxruntime's basic optimization level, so every run computes what the
graph says (a QDQ model's quantization simulated exactly); see :func:`_semantic_session`.
Effects of particular integer kernels (e.g. u8s8 saturation on CPUs without VNNI) show in
``validate``'s end-to-end metrics, not here.

Library use (the quantizer's ``--auto-exclude``)::

    from onnxpress.runtime import localize
    table = localize("model.onnx", "model.int8.onnx", batches, top=5)
    exclude = [row.node for row in table if row.node_sqnr_db < 30]  # nodes whose own SQNR is < 30 dB
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
import onnxruntime as ort

from onnxpress.errors import InputError
from onnxpress.graphs import constant_value, infer_shapes
from onnxpress.model_io import load_model, save_model
from onnxpress.runtime.metrics import MAX_SQNR_DB, same_value, sqnr_db
from onnxpress.runtime.runner import ORT_DTYPES
from onnxpress.sessions import session_options

logger = logging.getLogger(__name__)

def DEQUANTIZED_NAMES(name: str) -> tuple[str, ...]:  # noqa: N802 - reads as a table
    """Candidate names for a reference value, most specific first (onnxruntime's QDQ naming, then the name)."""
    return (f"{name}_DequantizeLinear_Output", f"{name}_dequantized", name)


class NoSharedValuesError(InputError):
    """The reference and the candidate share no intermediate value, so no node can be judged."""


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
        sqnr_in_db: The worst propagated SQNR among the node's inputs, dB.
        sqnr_out_db: The propagated SQNR of its output, dB.
        drop_db: ``sqnr_in_db - sqnr_out_db``: the propagated SQNR lost across the node, dB.
        added_error: Noise-to-signal power of the node's output computed from exact inputs
            (``10**(-node_sqnr_db/10)``); the ranking key.
        node_sqnr_db: The node's own SQNR (exact inputs), dB (capped at 200).
        rel_l2_error: ``||r - c|| / ||r||`` of the output in the normal (propagated) run.
        span: Every reference node between the nearest shared values upstream and this
            output, in graph order, ending with ``node``: when the candidate fused or renamed
            intermediates (``Conv + Relu``), the error belongs to all of them, and a quantizer
            that keeps the node out should keep out the span.
    """

    node: str
    op_type: str
    output: str
    candidate_node: str
    candidate_op_type: str
    sqnr_in_db: float
    sqnr_out_db: float
    drop_db: float
    added_error: float
    node_sqnr_db: float
    rel_l2_error: float
    span: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ModelLike = str | os.PathLike[str] | ir.Model


def load_value_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """Reads reference-to-candidate value names from a JSON file.

    The file is either a flat ``{"reference_name": "candidate_name"}`` mapping, or the report
    of ``onnxpress compress --report``, whose steps may record ``details.renamed`` (old name to
    new name); the steps' renames are composed in order.

    Raises:
        InputError: The file is missing, not JSON, or neither shape.
    """
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON value map: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("steps"), list):
        mapping: dict[str, str] = {}
        for step in data["steps"]:
            renamed = (step.get("details") or {}).get("renamed") if isinstance(step, dict) else None
            if not isinstance(renamed, dict):
                continue
            carried = set()
            for ref_name, current in list(mapping.items()):
                if current in renamed:
                    mapping[ref_name] = str(renamed[current])
                    carried.add(current)
            for old, new in renamed.items():
                if old not in carried:
                    mapping.setdefault(str(old), str(new))
        return mapping
    if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return dict(data)
    raise InputError(
        f"{path}: expected {{reference_name: candidate_name}} or a compress report with steps[].details.renamed"
    )


def _as_model(model: ModelLike) -> tuple[ir.Model, bool]:
    """The model as onnx_ir and whether it is our own copy (a path we loaded)."""
    if isinstance(model, ir.Model):
        return model, False
    try:
        return load_model(model), True
    except InputError as exc:
        raise InputError(
            f"localization reads the graph with onnxpress.model_io.load_model, which cannot read {model}: {exc} "
            "(for a packed .onnxz, localize against the .onnx it was packed from)"
        ) from exc


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
            # The dequantized copy is what the candidate's consumers read; a quantizer may even
            # keep the plain name on a value computed before a fused activation.
            target = next((t for t in DEQUANTIZED_NAMES(name) if t in cand_values), None)
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
    return _semantic_session(path)


def _semantic_session(path: Path) -> Any:
    """A session on a temporary ``.onnx`` this module wrote, with basic graph optimizations only.

    Localization compares the graphs' meaning, and onnxruntime's extended optimizations fuse
    ``DequantizeLinear -> op -> QuantizeLinear`` into integer kernels depending on which values
    are graph outputs: exposing an intermediate changes what gets fused, and the fused kernels
    round differently (measured on the digits CNN: one value at 42.3 dB unfused, 18.0 dB fused).
    At the basic level every run computes what the ONNX graph says (QDQ simulated exactly),
    so the three runs agree with each other. :func:`onnxpress.sessions.load_session` takes no
    optimization level; the file is always a plain ``.onnx`` written by :func:`save_model`,
    so no artifact format is bypassed here. The end-to-end metrics of ``validate`` still come
    from fully optimized sessions.
    """
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot load the model with exposed intermediates: {exc}") from exc


def _isolated_session(model: ir.Model, names: list[str], workdir: Path) -> tuple[Any, dict[str, str]]:
    """A session of ``model`` where every use of each named value reads a new input instead.

    Returns the session and ``{value name: new input name}``; the model is restored after.
    """
    values = _values_by_name(model.graph)
    taken = set(values) | {v.name for v in model.graph.initializers.values()}
    rewired: list[tuple[ir.Node, int, ir.Value]] = []
    new_inputs: list[ir.Value] = []
    feeds: dict[str, str] = {}
    for name in names:
        value = values[name]
        uses = list(value.uses())
        if not uses or value.type is None:
            continue
        feed_name = f"{name}__reference"
        while feed_name in taken:
            feed_name += "_"
        taken.add(feed_name)
        feed = ir.Value(name=feed_name, type=value.type, shape=value.shape)
        model.graph.inputs.append(feed)
        new_inputs.append(feed)
        for node, index in uses:
            node.replace_input_with(index, feed)
            rewired.append((node, index, value))
        feeds[name] = feed_name
    try:
        session = _session_with_outputs(model, names, workdir, "isolated")
    finally:
        for node, index, value in rewired:
            node.replace_input_with(index, value)
        for feed in new_inputs:
            model.graph.inputs.remove(feed)
    return session, feeds


def _node_inputs(node: ir.Node) -> list[ir.Value | None]:
    """The node's inputs, and the values of its graph that its subgraphs (If/Loop/Scan bodies) read.

    A branch reads the values around it by name, not through the node's inputs; they are inputs
    of the node all the same (the If's output depends on them).
    """
    found: list[ir.Value | None] = list(node.inputs)
    seen = {id(v) for v in found if v is not None}
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        else:
            continue
        for graph in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                for value in inner.inputs:
                    if value is not None and value.graph is node.graph and id(value) not in seen:
                        seen.add(id(value))
                        found.append(value)
    return found


def _span(node: ir.Node, shared: set[str]) -> tuple[str, ...]:
    """Names of ``node`` and the nodes above it that compute values no shared value covers."""
    found: list[ir.Node] = []
    stack = [node]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        for value in _node_inputs(current):
            if value is None or value.name in shared or value.is_graph_input() or constant_value(value) is not None:
                continue
            producer = value.producer()
            if producer is not None and producer.graph is node.graph:
                stack.append(producer)
    order = {id(n): i for i, n in enumerate(node.graph)} if node.graph is not None else {}
    return tuple(n.name or n.op_type for n in sorted(found, key=lambda n: order.get(id(n), 0)))


def _upstream_shared(node: ir.Node, shared: set[str], cache: dict[str, list[str]]) -> list[str]:
    """For each non-constant input of ``node``: itself when shared, else the nearest shared values above it."""
    found: list[str] = []
    for value in _node_inputs(node):
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


def _as_type(array: np.ndarray, ort_type: str) -> np.ndarray:
    """The array in the dtype an onnxruntime input declares (a float16 model gets float16)."""
    dtype = ORT_DTYPES.get(ort_type)
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)


def _sum_squares(array: np.ndarray, *, finite_only: bool = False) -> float:
    """Sum of squares accumulated in float64 (no float64 copy of the array).

    With ``finite_only``, infinities and NaNs are left out (a signal with one ``-inf`` from a
    ``Log`` of zero would otherwise be infinite, and every error beside it invisible).
    """
    flat = array.reshape(-1)
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float32)
    total = float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    if not np.isfinite(total) and finite_only:
        flat = flat[np.isfinite(flat)]
        total = float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return total if np.isfinite(total) else float("inf")


def _difference(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """``reference - candidate``, with 0 where both hold the same infinity or both NaN.

    As in :class:`~onnxpress.runtime.metrics.OutputMetrics`, equal non-finite values are an
    exact match (``-inf - -inf`` would be NaN, an infinite noise for a node that adds none);
    any other non-finite difference stays, and makes the noise infinite.
    """
    candidate = candidate.astype(reference.dtype, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = reference - candidate
    if reference.dtype.kind == "f" and not np.isfinite(diff).all():
        diff = np.where(same_value(reference, candidate), 0, diff)
    return diff


def localize(
    reference: ModelLike,
    candidate: ModelLike,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    top: int | None = None,
    value_map: Mapping[str, str] | None = None,
    max_batches: int = 4,
    rows_per_run: int = 8,
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
        rows_per_run: Each batch runs in slices of this many rows (not for a fixed batch
            size): every shared intermediate of a slice is held at once, which for a
            transformer is hundreds of activations.

    Returns:
        One :class:`NodeError` per reference node with a shared output, largest
        ``added_error`` first.

    Raises:
        NoSharedValuesError: The models share no intermediate value (an InputError).
        InputError: No batch was given.
    """
    ref_model, _ = _as_model(reference)
    cand_model, _ = _as_model(candidate)
    for model in (ref_model, cand_model):
        if any(v.type is None for node in model.graph for v in node.outputs):
            infer_shapes(model)
    pairs = shared_values(ref_model, cand_model, value_map)
    if not pairs:
        raise NoSharedValuesError(
            "the reference and the candidate share no intermediate value (same name, '<name>_DequantizeLinear_Output', "
            "'<name>_dequantized', or value_map); cannot localize the error"
        )
    workdir = Path(tempfile.mkdtemp(prefix="onnxpress-localize-"))
    try:
        ref_session = _session_with_outputs(ref_model, pairs.keys(), workdir, "reference")
        cand_session = _session_with_outputs(cand_model, pairs.values(), workdir, "candidate")
        ref_outputs = {o.name for o in ref_session.get_outputs()}
        cand_outputs = {o.name for o in cand_session.get_outputs()}
        pairs = {r: c for r, c in pairs.items() if r in ref_outputs and c in cand_outputs}
        iso_session, iso_feeds = _isolated_session(cand_model, list(pairs.values()), workdir)
        ref_names, cand_names = list(pairs), list(pairs.values())
        ref_inputs = [i.name for i in ref_session.get_inputs()]
        cand_inputs = [i.name for i in cand_session.get_inputs()]
        iso_types = {i.name: i.type for i in iso_session.get_inputs()}
        ref_types = {i.name: i.type for i in ref_session.get_inputs()}
        cand_types = {i.name: i.type for i in cand_session.get_inputs()}
        signal = dict.fromkeys(ref_names, 0.0)
        noise = dict.fromkeys(ref_names, 0.0)
        own_noise = dict.fromkeys(ref_names, 0.0)
        skipped: set[str] = set()
        runs = 0

        def _accumulate(feeds: Mapping[str, np.ndarray]) -> None:
            ref_feeds = {k: _as_type(feeds[k], ref_types[k]) for k in ref_inputs}
            cand_feeds = {k: _as_type(feeds[k], cand_types[k]) for k in cand_inputs}
            rows = len(next(iter(ref_feeds.values()))) if ref_feeds else 0
            try:
                ref_vals = dict(zip(ref_names, ref_session.run(ref_names, ref_feeds), strict=True))
                cand_vals = cand_session.run(cand_names, cand_feeds)
            except Exception as exc:  # onnxruntime raises its own exception types
                reason = " ".join(str(exc).split())
                raise InputError(f"localization could not run the models on a batch of {rows} rows "
                                 f"(both must take the same batch): {reason}") from exc
            exact = dict(cand_feeds)
            for ref_name, cand_name in pairs.items():
                if cand_name in iso_feeds:
                    exact[iso_feeds[cand_name]] = _as_type(ref_vals[ref_name], iso_types[iso_feeds[cand_name]])
            try:
                iso_vals = iso_session.run(cand_names, exact)
            except Exception as exc:  # a shape the candidate cannot take from the reference
                raise InputError(f"localization could not feed the reference's values to the candidate: {exc}") from exc
            for name, c, ci in zip(ref_names, cand_vals, iso_vals, strict=True):
                r = ref_vals[name]
                if r.shape != c.shape or r.shape != ci.shape:
                    skipped.add(name)
                    continue
                signal[name] += _sum_squares(r, finite_only=True)
                noise[name] += _sum_squares(_difference(r, c))
                own_noise[name] += _sum_squares(_difference(r, ci))
        fixed_batch = any(isinstance(i.shape[0], int) for i in ref_session.get_inputs() if i.shape)
        for batch in batches:
            if runs >= max_batches:
                break
            rows = len(next(iter(batch.values())))
            step = rows if fixed_batch else max(1, rows_per_run)
            for lo in range(0, rows, step):
                feeds = {k: v[lo:lo + step] for k, v in batch.items()} if step < rows else batch
                _accumulate(feeds)
            runs += 1
        if runs == 0:
            raise InputError("localization needs at least one input batch")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if skipped:
        logger.info("localization skipped %d values whose shapes differ: %s", len(skipped), sorted(skipped)[:5])
    sqnr = {n: sqnr_db(signal[n], noise[n]) for n in ref_names if n not in skipped}
    rel = {n: float(np.sqrt(noise[n] / signal[n])) if signal[n] > 0 else (0.0 if noise[n] == 0 else float("inf"))
           for n in sqnr}
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
            own = sqnr_db(signal[value.name], own_noise[value.name])
            producer = cand_values[pairs[value.name]].producer()
            table.append(NodeError(
                node=node.name or "", op_type=node.op_type, output=value.name,
                candidate_node=(producer.name or "") if producer else "",
                candidate_op_type=producer.op_type if producer else "",
                sqnr_in_db=round(sqnr_in, 4), sqnr_out_db=round(sqnr[value.name], 4),
                drop_db=round(sqnr_in - sqnr[value.name], 4),
                added_error=0.0 if own >= MAX_SQNR_DB else 10.0 ** (-own / 10.0),
                node_sqnr_db=round(own, 4), rel_l2_error=rel[value.name], span=_span(node, shared),
            ))
    table.sort(key=lambda e: e.added_error, reverse=True)
    logger.info("localized %d nodes over %d batches; worst: %s", len(table), runs,
                f"{table[0].node} ({table[0].op_type}, own SQNR {table[0].node_sqnr_db:.1f} dB)" if table else "none")
    return table[:top] if top is not None else table
