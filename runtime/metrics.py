r"""Streaming error metrics between a reference output and a candidate output.

Batches are folded into running sums, so validation over a large dataset keeps only a few
numbers per output plus one cosine per sample. With reference ``r`` and candidate ``c``
(each sample flattened to a vector):

* max / mean absolute error: :math:`\max |r - c|`, :math:`\frac{1}{n}\sum |r - c|` over all elements;
* relative L2 error: :math:`\lVert r - c \rVert_2 / \lVert r \rVert_2` over the whole output;
* cosine per sample: :math:`\frac{r \cdot c}{\lVert r \rVert \lVert c \rVert}` (1 when both are
  zero); mean and minimum over samples. A sample where only one side is zero has no direction
  to compare (a Relu head whose reference row is all zero, the candidate's ``1e-6``: a cosine
  of 0 would fail a model off by ``1e-6``), so it takes the cosine of the whole output,
  :math:`\frac{\sum r \cdot c}{\sqrt{\sum r^2 \sum c^2}}`, whose denominator holds that sample's
  error: tiny values there barely move it, large ones pull it down. An output with one value per sample
  (``[N]``, ``[N, 1]``, a scalar per batch) has no per-sample direction (the cosine of two
  numbers is only their sign agreement, -1 for ``1e-7`` against ``-1e-7``), so its cosine is
  taken once over all samples (the column of values is the vector), and mean and minimum are
  that one value;
* top-1 agreement (outputs that hold class scores, ``[N, C]``): the share of samples whose
  arg-max is the same; for integer and bool outputs, the share of values that are equal (an
  arg-max head that outputs class ids agrees exactly when the top-1 class does; a mask, element
  by element);
* SQNR (used by localization): :math:`10 \log_{10} \frac{\sum r^2}{\sum (r - c)^2}` dB.

Non-finite values: an element where both outputs hold the same infinity, or both NaN, is an
exact match (a ``Log`` of zero in both models is not an error); any other element with a
non-finite value on either side is counted in ``nonfinite`` (the verdict fails on it) and left
out of the sums, so the other metrics stay numbers.

The absolute-error histogram uses fixed logarithmic bins (``1e-10`` to ``1e4``), so it streams
and two reports are comparable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Edges of the absolute-error histogram: 0, then 1e-10 ... 1e4, four bins a decade.
HISTOGRAM_EDGES = np.concatenate([[0.0], np.logspace(-10, 4, 57)])
#: Reported instead of an infinite SQNR (identical values).
MAX_SQNR_DB = 200.0

#: Output names that hold features, not class scores, even when shaped ``[N, C]``.
_NOT_SCORES = re.compile(r"embed|hidden|feature|pool|state|vector|encod", re.IGNORECASE)


def _bin_table() -> tuple[np.ndarray, np.ndarray]:
    """A lookup table from the top 17 bits of a non-negative float32 to its bin, and the edges
    it is corrected with (see :func:`histogram_bins`)."""
    edges = HISTOGRAM_EDGES.astype(np.float32)
    lowest = (np.arange(1 << 17, dtype=np.uint32) << 15).view(np.float32)  # smallest float of each bucket
    with np.errstate(invalid="ignore"):
        table = np.searchsorted(edges, lowest, side="left")
    table = np.minimum(np.where(np.isnan(lowest), len(edges) - 1, table), len(edges) - 1).astype(np.intp)
    # The last bin also takes everything above the last edge: never step past it.
    return table, np.append(edges[:-1], np.float32(np.inf))


_BIN_TABLE, _BIN_EDGES = _bin_table()


def histogram_bins(abs_error: np.ndarray) -> np.ndarray:
    """The :data:`HISTOGRAM_EDGES` bin of each absolute error: 0 for exact, else ``k`` with
    ``edges[k-1] < e <= edges[k]`` (the last bin also holds everything above ``1e4``).

    Computed from the float32 bit pattern, not a logarithm (about 4x faster, which matters
    when the model itself is cheap): the top 17 bits (exponent and 8 mantissa bits) pick a
    bucket narrower than a bin (a ratio of ``1 + 2^-8`` against ``10^{1/4}``), so a bucket
    holds at most one edge; the table gives the bin of the bucket's smallest value, and one
    comparison with that bin's upper edge moves values above it to the next bin. Errors are
    compared in float32 (float64 outputs are rounded first).
    """
    values = np.ascontiguousarray(abs_error, dtype=np.float32).reshape(-1)
    bins = _BIN_TABLE[values.view(np.uint32) >> 15]
    bins += values > _BIN_EDGES[bins]
    return bins


def holds_class_scores(name: str, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether an output looks like class scores: floating ``[N, C]`` with ``C >= 2``, not named as features."""
    return (
        len(shape) == 2 and shape[1] >= 2 and np.issubdtype(dtype, np.floating)
        and not _NOT_SCORES.search(name)
    )


def same_value(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Where both hold the same value, NaN counting as the same as NaN (module docstring)."""
    return (reference == candidate) | (np.isnan(reference) & np.isnan(candidate))


def _needs_float64(dtype: np.dtype) -> bool:
    """float64 outputs, and integers of 32 bits or more, are compared in float64."""
    return dtype == np.float64 or (np.issubdtype(dtype, np.integer) and dtype.itemsize >= 4)


def _cosines(dot: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """``dot / sqrt(rr * cc)`` per row: 1 where both vectors are zero, NaN where only one is
    (no direction; :attr:`OutputMetrics.cosine_values` fills those in)."""
    norms = np.sqrt(rr * cc)
    safe = np.where(norms > 0, norms, 1.0)
    cos = np.where(norms > 0, dot / safe, np.where((rr == 0) & (cc == 0), 1.0, np.nan))
    return np.clip(cos, -1.0, 1.0)


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``, capped at :data:`MAX_SQNR_DB` (no noise)."""
    if noise <= 0.0 or not math.isfinite(noise):
        return MAX_SQNR_DB if noise <= 0.0 else -MAX_SQNR_DB
    if signal <= 0.0:
        return -MAX_SQNR_DB
    return float(min(MAX_SQNR_DB, 10.0 * math.log10(signal / noise)))


@dataclass
class OutputMetrics:
    """Accumulated comparison of one output; feed batches with :meth:`update`."""

    name: str
    class_scores: bool = False
    elements: int = 0
    samples: int = 0
    max_abs_error: float = 0.0
    sum_abs_error: float = 0.0
    sum_sq_error: float = 0.0
    sum_sq_reference: float = 0.0
    top1_matches: int = 0
    #: Integer or bool output: agreement is the share of equal values (``equal_values``).
    exact_values: bool = False
    equal_values: int = 0
    nonfinite: int = 0
    shape_mismatch: str = ""
    cosines: list[np.ndarray] = field(default_factory=list, repr=False)
    #: Sums over all samples of r.c, r.r and c.c: the cosine of the whole output.
    totals: np.ndarray = field(default_factory=lambda: np.zeros(3), repr=False)
    #: The output has one value per sample: its cosine is the whole output's (module docstring).
    one_value: bool = False
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(HISTOGRAM_EDGES), dtype=np.int64), repr=False)

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Folds one batch in (first axis = samples)."""
        if reference.shape != candidate.shape:
            self.shape_mismatch = f"reference {list(reference.shape)} vs candidate {list(candidate.shape)}"
            return
        if reference.ndim and len(reference) == 0:
            return
        if self.samples == 0:
            self.class_scores = holds_class_scores(self.name, reference.shape, reference.dtype)
            self.exact_values = reference.dtype == np.bool_ or np.issubdtype(reference.dtype, np.integer)
        if self.exact_values:
            self.equal_values += int(np.count_nonzero(reference == candidate))
        # Differences in the outputs' own precision (float32 unless float64, or integers that
        # float32 cannot hold exactly: ids above 2**24 differing by one); every sum in float64.
        work = np.float64 if _needs_float64(reference.dtype) or _needs_float64(candidate.dtype) else np.float32
        rows = len(reference) if reference.ndim else 1
        r = reference.astype(work, copy=False).reshape(rows, -1)
        c = candidate.astype(work, copy=False).reshape(rows, -1)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = r - c
        if not np.isfinite(diff).all():  # rare: count and zero the non-finite differences
            finite = np.isfinite(diff)
            # the same infinity, or NaN, on both sides is an exact match, not an error
            same = ~finite & same_value(r, c)
            self.nonfinite += int(diff.size - np.count_nonzero(finite) - np.count_nonzero(same))
            diff = np.where(finite, diff, 0)
            r = np.where(np.isfinite(r), r, 0)
            c = np.where(np.isfinite(c), c, 0)
        abs_diff = np.abs(diff)
        self.elements += diff.size
        self.samples += rows
        if diff.size:
            self.max_abs_error = max(self.max_abs_error, float(abs_diff.max()))
        self.sum_abs_error += float(abs_diff.sum(dtype=np.float64))
        self.sum_sq_error += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        rr = np.einsum("ij,ij->i", r, r, dtype=np.float64)
        cc = np.einsum("ij,ij->i", c, c, dtype=np.float64)
        dot = np.einsum("ij,ij->i", r, c, dtype=np.float64)
        self.sum_sq_reference += float(rr.sum())
        self.histogram += np.bincount(histogram_bins(abs_diff.reshape(-1)), minlength=len(HISTOGRAM_EDGES))
        self.totals += (dot.sum(), rr.sum(), cc.sum())
        if r.shape[1] == 1:  # one value per sample: one cosine over the column (see the module docstring)
            self.one_value = True
        else:
            self.cosines.append(_cosines(dot, rr, cc))
        if self.class_scores:
            self.top1_matches += int(np.count_nonzero(reference.argmax(axis=1) == candidate.argmax(axis=1)))

    @property
    def mean_abs_error(self) -> float:
        return self.sum_abs_error / self.elements if self.elements else 0.0

    @property
    def rel_l2_error(self) -> float:
        if self.sum_sq_reference == 0:
            return 0.0 if self.sum_sq_error == 0 else float("inf")
        return math.sqrt(self.sum_sq_error / self.sum_sq_reference)

    @property
    def overall_cosine(self) -> float:
        """The cosine of the whole output as one vector (0 when only one side is all zero)."""
        dot, rr, cc = self.totals
        value = float(_cosines(np.array([dot]), np.array([rr]), np.array([cc]))[0])
        return 0.0 if math.isnan(value) else value

    @property
    def cosine_values(self) -> np.ndarray:
        """The per-sample cosines; samples without a direction take :attr:`overall_cosine`
        (a one-value-per-sample output has just that one)."""
        if self.one_value:
            return np.array([self.overall_cosine]) if self.samples else np.zeros(0)
        values = np.concatenate(self.cosines) if self.cosines else np.zeros(0)
        undefined = np.isnan(values)
        return np.where(undefined, self.overall_cosine, values) if undefined.any() else values

    @property
    def mean_cosine(self) -> float:
        values = self.cosine_values
        return float(values.mean()) if values.size else 1.0

    @property
    def min_cosine(self) -> float:
        values = self.cosine_values
        return float(values.min()) if values.size else 1.0

    @property
    def top1_agreement(self) -> float | None:
        """Percentage of samples with the same arg-max (class scores), or of equal values (integer
        and bool outputs); None for other outputs."""
        if self.class_scores and self.samples:
            return 100.0 * self.top1_matches / self.samples
        if self.exact_values and self.elements:
            return 100.0 * self.equal_values / self.elements
        return None

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.sum_sq_reference, self.sum_sq_error)

    def to_dict(self) -> dict[str, Any]:
        """The metrics as JSON values; None for each metric of an output whose shapes differ
        (nothing comparable was measured: zeros there would read as a perfect match)."""
        valid = not self.shape_mismatch
        return {
            "max_abs_error": self.max_abs_error if valid else None,
            "mean_abs_error": self.mean_abs_error if valid else None,
            "rel_l2_error": self.rel_l2_error if valid else None,
            "mean_cosine": self.mean_cosine if valid else None,
            "min_cosine": self.min_cosine if valid else None,
            "top1_agreement": self.top1_agreement if valid else None,
            "sqnr_db": self.sqnr_db if valid else None,
            "samples": self.samples,
            "nonfinite_differences": self.nonfinite,
            "shape_mismatch": self.shape_mismatch or None,
            "abs_error_histogram": {
                "edges": [float(e) for e in HISTOGRAM_EDGES],
                "counts": [int(c) for c in self.histogram],
                "note": "counts[0]: exactly equal; counts[i]: edges[i-1] < |error| <= edges[i]",
            },
        }
