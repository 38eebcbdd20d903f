"""The fidelity check every export goes through: framework vs onnxruntime on the same inputs.

For each batch of inputs (batch size 1 and a larger one) the framework model and the ONNX
model run on identical arrays, and for each output ``r`` (reference) and ``o`` (onnxruntime):

    max_abs_error = max_i |o_i - r_i|
    rel_l2_error  = ||o - r||_2 / max(||r||_2, tiny)
    cosine        = <o, r> / (||o||_2 ||r||_2)      (1 when both are zero)
    mismatched    = #{i : |o_i - r_i| > atol + rtol |r_i|}   (numpy.allclose's rule)

A float16 output is compared at :data:`FP16_ATOL` and :data:`FP16_RTOL` when the default
(float32) tolerances are in effect; the record keeps the tolerances each output used.

An output passes when shapes agree, ``mismatched == 0`` (NaN only where the reference has
NaN) and, when a minimum cosine is asked for, ``cosine >= min_cosine``. The whole record
passes when every output at every batch size passes. :func:`check_fidelity` never hides a
failure: :meth:`FidelityRecord.raise_if_failed` turns it into
:class:`~onnxpress.errors.ValidationFailedError` (exit status 4) naming every output that missed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxpress.errors import InputError, ValidationFailedError

logger = logging.getLogger(__name__)

#: Default absolute tolerance of an fp32 export.
DEFAULT_ATOL = 1e-4
#: Default relative tolerance of an fp32 export.
DEFAULT_RTOL = 1e-3
#: Tolerances a float16 output is compared at when the defaults (meant for float32) are in
#: effect: float16 has a machine epsilon of 2**-10 ~ 9.8e-4, so an output the framework and
#: onnxruntime accumulate in a different order differs by a few units in the last place.
FP16_ATOL = 5e-3
FP16_RTOL = 1e-2
#: Default batch sizes checked: 1 and a larger one.
DEFAULT_BATCH_SIZES = (1, 4)

Reference = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]


@dataclasses.dataclass
class OutputFidelity:
    """How one output of the export compares with the framework at one batch size."""

    name: str
    batch_size: int
    shape: list[int]
    dtype: str
    max_abs_error: float
    rel_l2_error: float
    cosine: float
    mismatched: int
    elements: int
    passed: bool
    note: str = ""
    #: The tolerances this output was compared at when they differ from the record's
    #: (a float16 output under the default tolerances).
    atol: float | None = None
    rtol: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; infinities and NaN (a failed comparison) become None."""
        return {k: _finite(v) for k, v in dataclasses.asdict(self).items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclasses.dataclass
class FidelityRecord:
    """Every output at every batch size, the tolerances and where the inputs came from."""

    atol: float
    rtol: float
    min_cosine: float | None
    inputs: str
    outputs: list[OutputFidelity] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({o.batch_size for o in self.outputs})

    @property
    def worst_max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=float("nan"))

    @property
    def min_cosine_seen(self) -> float:
        return min((o.cosine for o in self.outputs), default=float("nan"))

    @property
    def worst_rel_l2_error(self) -> float:
        return max((o.rel_l2_error for o in self.outputs), default=float("nan"))

    def failures(self) -> list[str]:
        """One line per output and batch size that missed the tolerance."""
        lines = []
        for o in self.outputs:
            if o.passed:
                continue
            detail = o.note or (
                f"{o.mismatched}/{o.elements} elements beyond atol={o.atol or self.atol:g} + "
                f"rtol={o.rtol or self.rtol:g}*|ref|, max abs error {o.max_abs_error:.3g}, "
                f"cosine {o.cosine:.8f}"
            )
            lines.append(f"output '{o.name}' at batch size {o.batch_size}: {detail}")
        return lines

    def summary(self) -> str:
        """One line: pass or fail, worst errors, batch sizes."""
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"fidelity {verdict}: max abs error {self.worst_max_abs_error:.3g}, "
            f"rel L2 {self.worst_rel_l2_error:.3g}, min cosine {self.min_cosine_seen:.8f} "
            f"over {len({o.name for o in self.outputs})} output(s) at batch sizes "
            f"{', '.join(map(str, self.batch_sizes))} (atol {self.atol:g}, rtol {self.rtol:g}"
            + (f", min cosine {self.min_cosine:g}" if self.min_cosine is not None else "")
            + f"; inputs: {self.inputs})"
        )

    def table(self) -> str:
        """A fixed-width table, one row per output and batch size."""
        header = ("output", "batch", "shape", "max abs err", "rel L2 err", "cosine", "ok")
        rows = [
            (
                o.name, str(o.batch_size), "x".join(map(str, o.shape)) or "scalar",
                f"{o.max_abs_error:.3g}", f"{o.rel_l2_error:.3g}", f"{o.cosine:.8f}",
                "yes" if o.passed else "NO",
            )
            for o in self.outputs
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "min_cosine": self.min_cosine,
            "inputs": self.inputs,
            "batch_sizes": self.batch_sizes,
            "max_abs_error": _finite(self.worst_max_abs_error),
            "rel_l2_error": _finite(self.worst_rel_l2_error),
            "cosine": _finite(self.min_cosine_seen),
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def raise_if_failed(self, what: str = "the export") -> None:
        """Raises ValidationFailedError (exit 4) naming every output that missed."""
        if not self.passed:
            raise ValidationFailedError(
                f"{what} does not match the framework model: " + "; ".join(self.failures())
                if self.outputs
                else f"{what}: no outputs were compared"
            )


def compare_output(
    name: str,
    batch_size: int,
    reference: np.ndarray,
    actual: np.ndarray,
    *,
    atol: float,
    rtol: float,
    min_cosine: float | None,
) -> OutputFidelity:
    """Compares one output; see the module docstring for the metrics."""
    reference = np.asarray(reference)
    actual = np.asarray(actual)
    if reference.shape != actual.shape:
        return OutputFidelity(
            name, batch_size, list(actual.shape), str(actual.dtype), float("inf"), float("inf"),
            float("nan"), int(max(actual.size, reference.size)), int(reference.size), False,
            f"shape {list(actual.shape)} from onnxruntime but {list(reference.shape)} from the framework",
        )
    ref = reference.astype(np.float64).ravel()
    act = actual.astype(np.float64).ravel()
    ref_nan, act_nan = np.isnan(ref), np.isnan(act)
    nan_mismatch = int(np.count_nonzero(ref_nan != act_nan))
    finite = ~(ref_nan | act_nan)
    ref_f, act_f = ref[finite], act[finite]
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(act_f - ref_f)
        same_inf = np.isinf(ref_f) & (ref_f == act_f)
        diff[same_inf] = 0.0
        mismatched = int(np.count_nonzero(~(diff <= atol + rtol * np.abs(ref_f)))) + nan_mismatch
        max_abs = float(diff.max()) if diff.size else 0.0
        ref_norm = float(np.linalg.norm(np.where(same_inf, 0.0, ref_f)))
        act_norm = float(np.linalg.norm(np.where(same_inf, 0.0, act_f)))
        err_norm = float(np.linalg.norm(diff))
        rel_l2 = err_norm / max(ref_norm, np.finfo(np.float64).tiny) if err_norm else 0.0
        if ref_norm == 0.0 and act_norm == 0.0:
            cosine = 1.0
        elif ref_norm == 0.0 or act_norm == 0.0:
            cosine = 0.0
        else:
            cosine = float(
                np.dot(np.where(same_inf, 0.0, ref_f), np.where(same_inf, 0.0, act_f))
                / (ref_norm * act_norm)
            )
    passed = mismatched == 0 and (min_cosine is None or cosine >= min_cosine)
    note = ""
    if nan_mismatch:
        note = f"{nan_mismatch} NaN value(s) where the other side has a number"
    elif mismatched == 0 and not passed:
        note = f"cosine {cosine:.8f} below the minimum {min_cosine:g}"
    return OutputFidelity(
        name, batch_size, list(actual.shape), str(actual.dtype), max_abs, rel_l2, cosine,
        mismatched, int(ref.size), passed, note,
    )


def check_fidelity(
    reference: Reference,
    session: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    min_cosine: float | None = None,
    inputs: str = "generated",
    progress: Callable[[str], None] | None = None,
) -> FidelityRecord:
    """Runs the framework and onnxruntime on each batch and records every output.

    Args:
        reference: The framework model as a function from named numpy inputs to its outputs,
            flattened in the ONNX model's output order.
        session: An onnxruntime ``InferenceSession`` of the export.
        batches: Named inputs, one mapping per batch size.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        min_cosine: Lowest acceptable cosine per output, or None.
        inputs: Where the inputs came from, for the record.
        progress: Called with a short description as each batch is checked.

    Returns:
        The record; it is not raised on. Call :meth:`FidelityRecord.raise_if_failed`.

    Raises:
        InputError: A batch lacks an input the model expects, or the two sides return a
            different number of outputs.
    """
    onnx_inputs = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    record = FidelityRecord(atol=atol, rtol=rtol, min_cosine=min_cosine, inputs=inputs)
    for batch in batches:
        missing = [n for n in onnx_inputs if n not in batch]
        if missing:
            raise InputError(
                f"the check inputs lack {', '.join(missing)}; the ONNX model expects "
                f"{', '.join(onnx_inputs)} and was given {', '.join(batch)}"
            )
        feeds = {n: np.asarray(batch[n]) for n in onnx_inputs}
        batch_size = int(next(iter(feeds.values())).shape[0]) if feeds and next(
            iter(feeds.values())).ndim else 1
        try:
            expected = [np.asarray(r) for r in reference(dict(batch))]
        except Exception as exc:  # the framework's own error, on inputs of this shape
            shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in batch.items())
            raise InputError(
                f"the framework model fails on the check inputs ({shapes}): "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; "
                "if a dynamic dimension only takes certain sizes, write it as a number or pass --data"
            ) from exc
        if progress is not None:
            progress(f"checking at batch size {batch_size}")
        try:
            actual = session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own types
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            for name in output_names:
                record.outputs.append(OutputFidelity(
                    name, batch_size, [], "", float("inf"), float("inf"), float("nan"), 0, 0,
                    False, f"onnxruntime failed on inputs {shapes}: {str(exc).strip()[:300]}",
                ))
            continue
        if len(expected) != len(actual):
            raise InputError(
                f"the framework model returned {len(expected)} output(s) but the ONNX model "
                f"has {len(actual)} ({', '.join(output_names)})"
            )
        for name, ref, act in zip(output_names, expected, actual, strict=True):
            half = (
                np.asarray(ref).dtype == np.float16 and atol == DEFAULT_ATOL and rtol == DEFAULT_RTOL
            )
            result = compare_output(
                name, batch_size, ref, act, atol=FP16_ATOL if half else atol,
                rtol=FP16_RTOL if half else rtol, min_cosine=min_cosine,
            )
            if half:
                result.atol, result.rtol = FP16_ATOL, FP16_RTOL
            record.outputs.append(result)
            logger.debug(
                "fidelity %s batch %d: max abs %.3g cosine %.8f", name, batch_size,
                result.max_abs_error, result.cosine,
            )
    logger.info("%s", record.summary())
    return record
