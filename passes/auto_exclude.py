r"""Choosing which nodes a quantizer keeps in float, from calibration batches.

The fidelity of a candidate is the mean cosine, over samples, between each float output of
the original and of the candidate (each sample's output flattened), taken for the worst output:

.. math::

    F = \min_{o} \frac{1}{n} \sum_{i=1}^{n} \frac{\langle r_{o,i}, c_{o,i} \rangle}{\|r_{o,i}\| \|c_{o,i}\|}

The search quantizes everything once, and when ``F`` is below the target asks
:func:`onnxpress.runtime.localize` to rank the nodes by the error each one adds when fed exact
inputs. The ``max_excluded + 4`` worst are then probed: each is kept out alone and ``F``
measured, because what a node costs at the outputs also depends on the layers after it. In
order of the fidelity each reached alone, nodes are kept out one at a time, re-quantizing and
re-measuring ``F`` after each, until the target is met or ``max_excluded`` nodes are kept.
One localization (three sessions over every intermediate) is the expensive step; each probe
and step is one quantization and one run of the batches.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxpress.passes.quant_common import NodeFilter, to_proto_file

from onnxpress.calibration import checked_batches

logger = logging.getLogger(__name__)

Batches = Sequence[Mapping[str, np.ndarray]]


def calibration_sample(model: ir.Model, calibration: Any, count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` calibration batches, checked against the model, for the search.

    Raises:
        ValueError: No calibration data was given, or it holds no batch.
    """
    if calibration is None:
        raise ValueError("auto_exclude needs calibration batches: pass --data FILE.npz (or set auto_exclude: false)")
    batches: list[dict[str, np.ndarray]] = []
    for batch in checked_batches(model, calibration):
        batches.append(dict(batch))
        if len(batches) >= count:
            break
    if not batches:
        raise ValueError("auto_exclude: the calibration data holds no batch")
    return batches


def _session(model: ir.Model, folder: str, name: str) -> ort.InferenceSession:
    from onnxpress.sessions import load_session

    return load_session(to_proto_file(model, folder, name))


def run_outputs(model: ir.Model, batches: Batches) -> list[list[np.ndarray]]:
    """Every output of ``model`` on each batch, in onnxruntime on the CPU."""
    with tempfile.TemporaryDirectory(prefix="onnxpress-auto-exclude-") as folder:
        session = _session(model, folder, "model.onnx")
        names = [i.name for i in session.get_inputs()]
        return [session.run(None, {k: batch[k] for k in names}) for batch in batches]


def fidelity(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """The worst output's mean per-sample cosine (1.0 when no float output exists)."""
    per_output: dict[int, list[np.ndarray]] = {}
    for ref_batch, cand_batch in zip(reference, candidate, strict=True):
        for index, (r, c) in enumerate(zip(ref_batch, cand_batch, strict=True)):
            if not np.issubdtype(r.dtype, np.floating) or r.ndim == 0 or r.shape != c.shape:
                continue
            r2 = r.reshape(r.shape[0], -1).astype(np.float64)
            c2 = c.reshape(c.shape[0], -1).astype(np.float64)
            norms = np.linalg.norm(r2, axis=1) * np.linalg.norm(c2, axis=1)
            cos = np.where(norms > 0, np.sum(r2 * c2, axis=1) / np.maximum(norms, 1e-300), 1.0)
            per_output.setdefault(index, []).append(cos)
    if not per_output:
        return 1.0
    return float(min(np.concatenate(v).mean() for v in per_output.values()))


def auto_exclude(
    model: ir.Model,
    base: NodeFilter,
    batches: Batches,
    quantize: Callable[[ir.Model, NodeFilter], ir.Model],
    *,
    target_cosine: float,
    max_excluded: int,
    quantizable: Callable[[ir.Node], bool] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[NodeFilter, dict[str, Any]]:
    """Finds the nodes to keep in float so the quantized model meets ``target_cosine``.

    Args:
        model: The float model (not changed).
        base: The user's exclusions; the nodes found are added to them.
        batches: Calibration batches, ``{input_name: array}``.
        quantize: Returns a quantized copy of a model under a filter.
        target_cosine: The fidelity to reach.
        max_excluded: At most this many nodes are kept in float.
        quantizable: Which reference nodes the quantizer would touch (others are skipped).
        progress: ``(done, total, message)`` callback.

    Returns:
        The filter to quantize with, and a record: the nodes kept in float, the fidelity
        before and after, and whether the target was met.
    """
    from onnxpress.runtime.localize import localize

    reference = run_outputs(model, batches)
    candidate = quantize(model, base)
    score = fidelity(reference, run_outputs(candidate, batches))
    record: dict[str, Any] = {"target_cosine": target_cosine, "cosine_all_quantized": round(score, 6)}
    logger.info("auto-exclude: fidelity with everything quantized %.5f (target %.4f)", score, target_cosine)
    kept: list[str] = []
    if score < target_cosine and max_excluded > 0:
        by_name = {n.name: n for n in model.graph if n.name}
        try:
            ranked = [name for row in localize(model, candidate, batches) for name in reversed(row.span or (row.node,))]
        except Exception as exc:  # noqa: BLE001 - a ranking failure must not fail the quantization
            # The localization exposes every intermediate as an output, which onnxruntime
            # refuses for some graphs (values inside an If branch). The nodes are then probed
            # in graph order instead of by their localized error.
            logger.warning("auto-exclude: localization failed (%s); probing nodes in graph order",
                           str(exc).splitlines()[0][:200])
            record["localization_failed"] = str(exc).splitlines()[0][:200]
            ranked = list(by_name)
        order: list[str] = []
        for name in ranked:
            node = by_name.get(name)
            if node is None or name in order or base.excludes(node):
                continue
            if quantizable is not None and not quantizable(node):
                continue
            order.append(name)
        # The localization ranks nodes by the error each adds from exact inputs; what a node
        # costs at the outputs also depends on what follows it. So the leading candidates are
        # tried one by one and taken in order of the fidelity each reaches alone.
        probe = order[: max_excluded + 4]
        alone: dict[str, float] = {}
        for index, name in enumerate(probe, start=1):
            trial = NodeFilter(base.nodes + (name,), base.op_types)
            alone[name] = fidelity(reference, run_outputs(quantize(model, trial), batches))
            if progress is not None:
                progress(index, len(probe), f"probed {name}: cosine {alone[name]:.5f}")
        order = sorted(probe, key=lambda n: -alone[n]) + order[len(probe):]
        record["probed"] = {n: round(v, 6) for n, v in alone.items()}
        for step, name in enumerate(order[:max_excluded], start=1):
            kept.append(name)
            trial = NodeFilter(base.nodes + tuple(kept), base.op_types)
            score = fidelity(reference, run_outputs(quantize(model, trial), batches))
            logger.info("auto-exclude: excluded %s, fidelity %.5f", name, score)
            if progress is not None:
                progress(step, min(len(order), max_excluded), f"excluded {name}: cosine {score:.5f}")
            if score >= target_cosine:
                break
    record.update({
        "kept_float": kept,
        "cosine": round(score, 6),
        "target_met": score >= target_cosine,
    })
    if score < target_cosine:
        logger.warning(
            "auto-exclude: fidelity %.5f is still below the target %.4f after keeping %d nodes in float",
            score, target_cosine, len(kept),
        )
    return NodeFilter(base.nodes + tuple(kept), base.op_types), record
