"""Compare a candidate model with its reference on the same batches and give a verdict.

:func:`validate` runs both models (each through :class:`~onnxpress.runtime.runner.BatchRunner`,
so fixed batch sizes are padded) at the same time, each on half of the cores, over the same
batches of real data, or of random data built
from the reference's input specs when there is none (the report then warns that random inputs
are a weak signal). Per output it reports the metrics of :mod:`onnxpress.runtime.metrics`;
with labels, each model's accuracy; each artifact's size on disk (external data included);
each model's throughput at the batch size (median of timed runs after warm-up, in blocks
that alternate between the models so machine drift hits both alike); optionally the per-node localization table of
:mod:`onnxpress.runtime.localize`. The verdict checks :class:`Tolerances`.

The returned :class:`ValidationReport` serializes to the JSON the CLI writes (``to_dict``).

What is refused, and how (each an :class:`~onnxpress.errors.InputError` naming the model or
file and what was expected): data that does not fit either model; a model that onnxruntime
cannot run on a batch (random inputs: the message says to pass ``--data``); outputs that are
not tensors; labels that are not one class index per sample of the data, or outside the
class-score output's classes. Labels are scored on the first output that holds class scores
(floating ``[N, C >= 2]``, not named as features); labels found in the data rather than given
are skipped with a warning when they do not fit. Localization that cannot run (no shared
value, batch sizes the two models cannot share) leaves the comparison and its verdict as they
are and adds a warning.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxpress import __version__
from onnxpress.errors import InputError, RecipeError
from onnxpress.external_data import external_data_files
from onnxpress.report import format_table, human_bytes, write_json
from onnxpress.runtime.data import ArraySource, InputSource, iter_slices, open_source
from onnxpress.runtime.metrics import OutputMetrics, holds_class_scores
from onnxpress.runtime.runner import ORT_DTYPES, BatchRunner, InputSpec, pad_rows
from onnxpress.sessions import load_session

if TYPE_CHECKING:
    from onnxpress.runtime.localize import NodeError

logger = logging.getLogger(__name__)

#: Random inputs generated when no data is given.
DEFAULT_RANDOM_SAMPLES = 128
#: Batches each model runs in a row before the other takes its turn.
PHASE_BATCHES = 8
#: Output elements buffered before the metrics are updated (bounds memory at ~2 x 8 MiB).
METRIC_CHUNK_ELEMENTS = 1 << 20
#: Data keys read as labels when the data holds them and the model does not take them.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
WEAK_SIGNAL_WARNING = (
    "no --data: inputs are random, drawn from the model's input specs; random inputs are a weak "
    "signal (they miss the distribution the model was trained on); validate on real batches"
)


@dataclass(frozen=True)
class Tolerances:
    """Limits the verdict checks; None switches a check off.

    Attributes:
        min_cosine: Every floating output's *mean* cosine (over samples) must reach this.
        min_worst_cosine: Every floating output's *minimum* cosine over samples must reach this.
        max_abs_error: Every output's maximum absolute error must stay within this.
        max_mean_abs_error: Every output's mean absolute error must stay within this.
        max_rel_l2: Every output's relative L2 error must stay within this.
        min_top1_agreement: Percent of samples whose top-1 class agrees (class-score outputs).
        min_equal_values: Integer and bool outputs (an arg-max head's class ids, a mask): the
            percent of values equal in both models must reach this. Such outputs take no
            cosine check: the cosine of two vectors of class ids is near 1 however many differ
            (ids 0-9 with 2 % of them changed give about 0.994).
        max_accuracy_drop: Reference accuracy minus candidate accuracy, percentage points
            (needs labels).
        min_speedup: Candidate throughput / reference throughput must reach this.
        max_size_ratio: Candidate size / reference size must stay within this.
    """

    min_cosine: float | None = 0.99
    min_worst_cosine: float | None = None
    max_abs_error: float | None = None
    max_mean_abs_error: float | None = None
    max_rel_l2: float | None = None
    min_top1_agreement: float | None = None
    min_equal_values: float | None = 99.0
    max_accuracy_drop: float | None = 1.0
    min_speedup: float | None = None
    max_size_ratio: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value)):
                raise InputError(f"tolerance {f.name}: expected a number or None, got {value!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "tolerances") -> Tolerances:
        """Builds tolerances from a mapping (a recipe's ``validate:`` section), keys as the fields.

        Raises:
            RecipeError: An unknown key or a value that is not a number (or null).
        """
        names = {f.name for f in fields(cls)}
        values: dict[str, float | None] = {}
        for key, value in data.items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise RecipeError(f"{source}.{key}: unknown tolerance; known: {', '.join(sorted(names))}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value)):
                raise RecipeError(f"{source}.{key}: expected a number or null, got {value!r}")
            values[key] = None if value is None else float(value)
        return cls(**values)

    def to_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Check:
    """One verdict line: what was checked, the value, the limit and whether it held."""

    name: str
    value: float | None
    limit: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "value": self.value, "limit": self.limit, "passed": self.passed}


@dataclass
class ModelRun:
    """One side of the comparison: the artifact, its size, throughput and accuracy."""

    path: str
    size_bytes: int
    samples_per_second: float | None = None
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "size_bytes": self.size_bytes,
            "samples_per_second": self.samples_per_second, "accuracy": self.accuracy,
        }


@dataclass
class ValidationReport:
    """Everything :func:`validate` measured, and the verdict.

    Attributes:
        outputs: Per output name, its :class:`~onnxpress.runtime.metrics.OutputMetrics`
            (``.mean_cosine``, ``.max_abs_error``, ``.top1_agreement`` ...).
        passed: Whether every check held.
    """

    reference: ModelRun
    candidate: ModelRun
    data: str
    samples: int
    batch_size: int
    outputs: dict[str, OutputMetrics]
    tolerances: Tolerances
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    label_output: str | None = None
    speed_repeats: int = 0
    localization: list[NodeError] | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference.accuracy is None or self.candidate.accuracy is None:
            return None
        return self.reference.accuracy - self.candidate.accuracy

    @property
    def speedup(self) -> float | None:
        r, c = self.reference.samples_per_second, self.candidate.samples_per_second
        return c / r if r and c else None

    @property
    def size_ratio(self) -> float | None:
        return self.candidate.size_bytes / self.reference.size_bytes if self.reference.size_bytes else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: metrics per output, models, verdict, localization table."""
        return {
            "onnxpress": __version__,
            "verdict": "pass" if self.passed else "fail",
            "passed": self.passed,
            "reference": self.reference.to_dict(),
            "candidate": self.candidate.to_dict(),
            "data": self.data,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "warnings": self.warnings,
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
            "accuracy": None if self.accuracy_drop is None else {
                "output": self.label_output,
                "reference": self.reference.accuracy,
                "candidate": self.candidate.accuracy,
                "drop_points": self.accuracy_drop,
            },
            "size": {"reference_bytes": self.reference.size_bytes, "candidate_bytes": self.candidate.size_bytes,
                     "ratio": self.size_ratio},
            "speed": None if self.speedup is None else {
                "batch_size": self.batch_size, "repeats": self.speed_repeats,
                "reference_samples_per_second": self.reference.samples_per_second,
                "candidate_samples_per_second": self.candidate.samples_per_second,
                "speedup": self.speedup,
            },
            "tolerances": self.tolerances.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
            "localization": None if self.localization is None else [e.to_dict() for e in self.localization],
            "seconds": round(self.seconds, 3),
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Writes :meth:`to_dict` atomically."""
        write_json(path, _finite(self.to_dict()))

    def summary(self, localization_rows: int = 10) -> str:
        """The tables the CLI prints: outputs, models, checks, top localization rows."""
        rows = [["output", "max abs", "mean abs", "rel L2", "mean cos", "min cos", "top-1 agree"]]
        for name, m in self.outputs.items():
            if m.shape_mismatch:
                rows.append([name, "-", "-", "-", "-", "-", f"shapes differ: {m.shape_mismatch}"])
                continue
            top1 = "-" if m.top1_agreement is None else f"{m.top1_agreement:.2f}%"
            rows.append([name, f"{m.max_abs_error:.3g}", f"{m.mean_abs_error:.3g}", f"{m.rel_l2_error:.3g}",
                         f"{m.mean_cosine:.6f}", f"{m.min_cosine:.6f}", top1])
        parts = [format_table(rows)]
        model_rows = [["model", "size", "samples/s", "accuracy"]]
        for label, run in (("reference", self.reference), ("candidate", self.candidate)):
            model_rows.append([
                label, human_bytes(run.size_bytes),
                "-" if run.samples_per_second is None else f"{run.samples_per_second:.1f}",
                "-" if run.accuracy is None else f"{run.accuracy:.2f}%",
            ])
        ratio = ["ratio", f"{self.size_ratio:.3f}x" if self.size_ratio else "-",
                 f"{self.speedup:.3f}x" if self.speedup else "-",
                 "-" if self.accuracy_drop is None else f"{-self.accuracy_drop:+.2f} pts"]
        model_rows.append(ratio)
        parts.append(format_table(model_rows))
        if self.localization:
            loc = [["node", "op", "output", "SQNR in dB", "SQNR out dB", "node SQNR dB", "added NSR"]]
            for e in self.localization[:localization_rows]:
                loc.append([e.node or "<unnamed>", e.op_type, e.output, f"{e.sqnr_in_db:.1f}",
                            f"{e.sqnr_out_db:.1f}", f"{e.node_sqnr_db:.1f}", f"{e.added_error:.3g}"])
            parts.append(f"nodes adding the most error (top {min(localization_rows, len(self.localization))}"
                         f" of {len(self.localization)}):\n" + format_table(loc))
        if self.checks:
            check_rows = [["check", "value", "limit", "result"]]
            for c in self.checks:
                value = "-" if c.value is None else f"{c.value:.6g}"
                check_rows.append([c.name, value, f"{c.limit:g}", "pass" if c.passed else "FAIL"])
            parts.append(format_table(check_rows))
        parts.extend(f"warning: {w}" for w in self.warnings)
        parts.append(f"verdict: {'PASS' if self.passed else 'FAIL'} ({self.samples} samples, batch {self.batch_size})")
        return "\n\n".join(parts)


def _finite(data: Any) -> Any:
    """Replaces inf/nan (not JSON) by strings."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    return data


def artifact_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of a model artifact: the file plus every external data file an ``.onnx`` names."""
    path = Path(path)
    extra = [path.parent / location for location in external_data_files(path)]
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


#: Ops that pass integer ids through unchanged in value (so a Gather after them still bounds them).
_ID_PRESERVING = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand"})


def gather_index_bounds(path: str | os.PathLike[str]) -> dict[str, int]:
    """For each integer graph input used as ``Gather`` indices into a constant table, the table's size.

    ``ids -> Gather(table[V, D], ids)`` (an embedding) only accepts ids in ``[0, V)``: random
    inputs must stay below the smallest such ``V`` (a ``token_type_ids`` table has 2 rows).
    The indices may pass through casts and reshapes first. Only the main graph is read, and
    only shapes: external data is not loaded and a packed model's tensors are not decoded.
    """
    from onnxpress.packing.unpack import PackedModel, is_packed

    path = Path(path)
    try:
        if is_packed(path):
            with PackedModel(path) as packed:
                proto = packed.graph_proto()
        else:
            proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - the session already opened it; bounds only refine
        logger.debug("no index bounds for %s: %s", path, exc)
        return {}
    graph = proto.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
    integer = {
        i.name for i in graph.input
        if i.name not in shapes and i.type.tensor_type.elem_type in (
            onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
            onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64)
    }
    origin = {name: name for name in integer}  # value -> the graph input whose ids it carries
    bounds: dict[str, int] = {}
    for node in graph.node:  # topological order: origins are known before their uses
        if node.op_type in _ID_PRESERVING and node.input and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in origin:
            table = shapes.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if table and -len(table) <= axis < len(table) and table[axis] > 0:
                source = origin[node.input[1]]
                bounds[source] = min(bounds.get(source, table[axis]), table[axis])
    return bounds


def random_inputs(
    specs: list[InputSpec],
    samples: int,
    dims: Mapping[str, int] | None = None,
    seed: int | None = None,
    bounds: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Random arrays for the model's inputs: ``samples`` rows, named dimensions bound from ``dims``.

    Floats are standard normal; integers are drawn from [0, 2) for names containing ``mask``
    and [0, 100) otherwise (small enough to be valid token ids), and below ``bounds[name]``
    when given (see :func:`gather_index_bounds`); booleans are fair coins.

    Raises:
        InputError: A named dimension after the first is not bound in ``dims``.
    """
    dims = dict(dims or {})
    named = sorted({d for spec in specs for d in spec.dims if isinstance(d, str)})
    unknown = sorted(set(dims) - set(named))
    if unknown:
        raise InputError(
            f"--dim {unknown[0]}: the model has no dimension of that name "
            f"(its named dimensions: {', '.join(named) or 'none'})"
        )
    small = sorted(name for name, value in dims.items() if int(value) < 1)
    if small:
        raise InputError(f"--dim {small[0]}={dims[small[0]]}: a dimension needs a size of at least 1")
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = [samples]
        for axis, dim in enumerate(spec.dims[1:], start=1):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in dims:
                shape.append(int(dims[dim]))
            else:
                label = f"dimension {dim!r}" if dim else f"axis {axis} (unnamed)"
                hint = f"--dim {dim}=VALUE" if dim else "--data with real inputs"
                raise InputError(
                    f"input {spec.name!r} ({spec.describe()}): {label} has no size for random inputs; "
                    f"bind it with {hint}"
                )
        if spec.dtype == np.bool_:
            arrays[spec.name] = rng.random(shape) > 0.5
        elif np.issubdtype(spec.dtype, np.integer):
            high = 2 if "mask" in spec.name.lower() else 100
            high = min(high, (bounds or {}).get(spec.name, high))
            arrays[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return arrays


def _open_data(
    data: str | os.PathLike[str] | InputSource | Mapping[str, np.ndarray] | None,
    runner: BatchRunner,
    samples: int | None,
    dims: Mapping[str, int] | None,
    warnings: list[str],
) -> tuple[InputSource, str]:
    if not runner.inputs:
        raise InputError(f"reference {runner.model_path}: the model has no inputs; validate compares models "
                         "that compute outputs from input batches")
    if data is None:
        count = samples or DEFAULT_RANDOM_SAMPLES
        warnings.append(WEAK_SIGNAL_WARNING)
        bounds = gather_index_bounds(runner.model_path)
        return ArraySource(random_inputs(runner.inputs, count, dims, bounds=bounds), "<random>"), "random"
    if dims:
        warnings.append(f"--dim {', '.join(f'{k}={v}' for k, v in dims.items())} is ignored: the data gives "
                        "every size (--dim only sizes random inputs)")
    if isinstance(data, Mapping):
        return ArraySource(dict(data)), "<arrays>"
    if isinstance(data, (str, os.PathLike)):
        return open_source(data, runner.input_names), str(data)
    return data, str(data.path)


def _labels(
    labels: str | os.PathLike[str] | np.ndarray | None, source: InputSource, model_inputs: list[str], rows: int,
    warnings: list[str],
) -> tuple[np.ndarray | None, bool]:
    """The labels of the first ``rows`` samples, and whether the user gave them (not found in the data).

    Labels found in the data are used only when they are one integer class index per sample
    (integral floats are accepted); anything else is skipped with a warning, since the user
    did not ask for accuracy.
    """
    if labels is None:
        key = next((k for k in LABEL_KEYS if k in source.specs and k not in model_inputs), None)
        if key is None:
            return None, False
        found = np.asarray(source.read(0, rows, [key])[key])
        if found.ndim > 1 and int(np.prod(found.shape[1:])) == 1:
            found = found.reshape(rows)
        integral = np.issubdtype(found.dtype, np.integer) or (
            np.issubdtype(found.dtype, np.floating) and bool(np.all(np.isfinite(found) & (found == np.round(found)))))
        if found.ndim != 1 or not integral:
            warnings.append(f"the data's {key!r} array ({found.dtype}{list(found.shape)}) is not one class index "
                            "per sample; accuracy is not measured")
            return None, False
        warnings.append(f"labels read from the data's {key!r} array")
        return found.astype(np.int64, copy=False), False
    if not isinstance(labels, np.ndarray):
        path = Path(labels)
        if not path.is_file():
            raise InputError(f"{path}: no such labels file")
        try:
            labels = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not a readable .npy labels file: {exc}") from exc
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # a column of class indices
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels: expected a 1-D integer array of class indices, got {labels.dtype}{list(labels.shape)}")
    if len(labels) < rows:
        raise InputError(f"labels: {len(labels)} labels for {rows} samples; one label per sample is needed")
    if len(labels) not in (rows, source.num_rows):
        raise InputError(
            f"labels: {len(labels)} labels for data of {source.num_rows} samples; one label per sample of the "
            "data is needed (a different count means the labels belong to other data)"
        )
    return labels[:rows], True


def _label_output(
    runner: BatchRunner, label_output: str | None, given: bool, labels: np.ndarray, warnings: list[str]
) -> str | None:
    """The output compared with the labels: ``label_output``, else the first that holds class scores.

    Class scores are a floating ``[samples, classes]`` output with at least two classes, not
    named as features (:func:`~onnxpress.runtime.metrics.holds_class_scores`). Labels must be
    class indices of that output.

    Raises:
        InputError: No such output (for labels the user gave; labels found in the data are
            skipped with a warning), or a label outside ``[0, classes)``.
    """
    outputs = {o.name: o for o in runner.session.get_outputs()}

    def classes(name: str) -> int | None:
        shape = outputs[name].shape
        return shape[1] if isinstance(shape[1], int) else None

    def scores(name: str) -> bool:
        arg = outputs[name]
        dtype = ORT_DTYPES.get(arg.type)
        if not arg.shape or len(arg.shape) != 2 or dtype is None:
            return False
        width = classes(name)
        return holds_class_scores(name, (0, 2 if width is None else width), dtype)

    if label_output is not None:
        if label_output not in outputs:
            raise InputError(f"label output {label_output!r}: the model has no such output ({', '.join(outputs)})")
        if not outputs[label_output].shape or len(outputs[label_output].shape) != 2:
            raise InputError(f"label output {label_output!r}: expected class scores [samples, classes], got "
                             f"{outputs[label_output].shape}")
    else:
        label_output = next((n for n in runner.output_names if scores(n)), None)
    if label_output is None:
        listing = ", ".join(f"{n} {outputs[n].shape}" for n in runner.output_names)
        if not given:
            warnings.append(f"the data holds labels, but no output holds class scores [samples, classes >= 2] "
                            f"({listing}); accuracy is not measured")
            return None
        raise InputError(f"labels were given, but no output holds class scores [samples, classes >= 2] ({listing})")
    width = classes(label_output)
    if len(labels) and (labels.min() < 0 or (width is not None and labels.max() >= width)):
        expected = f"[0, {width})" if width is not None else "non-negative"
        if not given:
            warnings.append(f"the data's labels run from {labels.min()} to {labels.max()}, not class indices "
                            f"{expected} of output {label_output!r}; accuracy is not measured")
            return None
        raise InputError(f"labels: class indices must be {expected} for output {label_output!r} "
                         f"{outputs[label_output].shape}; got values from {labels.min()} to {labels.max()}")
    return label_output


def _run_checked(
    runner: BatchRunner, feeds: Mapping[str, np.ndarray], label: str, lo: int, hi: int, data_label: str
) -> dict[str, np.ndarray]:
    """One batch of one model; a model that fails on the batch, or returns no tensor, is an InputError.

    Raises:
        InputError: onnxruntime failed on the batch (the message names the model and the rows,
            and for random inputs says to pass real data), or an output is not a tensor
            (a sequence or map).
    """
    try:
        outputs = runner.run_batch(feeds)  # pads a fixed batch size's short batch and trims it back
    except InputError as exc:  # the runner turns onnxruntime's failures into InputError
        reason = " ".join(str(exc).split())
        hint = ""
        if data_label == "random":
            hint = ("; the inputs are random (integers drawn from [0, 100) or below the size of the table they "
                    "index, floats standard normal), which this model "
                    "does not accept: pass --data with real inputs (--dim sets sizes of named dimensions)")
        raise InputError(f"{label} {runner.model_path}: samples {lo}-{hi}: {reason}{hint}") from exc
    for name, value in outputs.items():
        if not isinstance(value, np.ndarray):
            raise InputError(f"{label} {runner.model_path}: output {name!r} is a {type(value).__name__}, not a "
                             "tensor; validate compares tensor outputs")
    return outputs


def _stackable(arrays: list[np.ndarray]) -> bool:
    """Whether arrays can be joined along the first axis (same rank and trailing dimensions)."""
    first = arrays[0].shape[1:]
    return all(a.ndim == arrays[0].ndim and a.shape[1:] == first for a in arrays)


def compare_threads(threads: int | None) -> int:
    """Intra-op threads for each model of the comparison pass: half of ``threads`` (or of the cores).

    Both models run at once, each on its own half of the cores, instead of taking turns on
    all of them: small models scale poorly across cores, and two sessions that take turns
    either leave their idle threads spinning against each other or pay for waking them.
    """
    if threads:
        cores = threads
    elif hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _measure_speed(
    reference: BatchRunner, candidate: BatchRunner, feeds: Mapping[str, np.ndarray], repeats: int, warmup: int = 2,
    rows: int | None = None,
) -> tuple[float, float]:
    """Median samples/s of each model on one batch.

    Each model is timed in blocks of consecutive runs (after ``warmup`` untimed ones), the
    blocks alternating twice, A B A B: drift on the machine hits both models alike, and no
    run is slowed by the other session's spinning threads, as strict alternation would be.
    """
    rows = rows or len(next(iter(feeds.values())))  # ``rows``: the real rows of a batch padded to a fixed size
    times: dict[str, list[float]] = {"r": [], "c": []}
    blocks = [(repeats + 1) // 2, repeats // 2]
    for block in blocks:
        for key, runner in (("r", reference), ("c", candidate)):
            for _ in range(warmup):
                runner.run_batch(feeds)
            for _ in range(block):
                start = time.perf_counter()
                runner.run_batch(feeds)
                times[key].append(time.perf_counter() - start)
    return rows / statistics.median(times["r"]), rows / statistics.median(times["c"])


def _verdict(report: ValidationReport) -> list[Check]:
    t = report.tolerances
    checks: list[Check] = []
    for name, m in report.outputs.items():
        if m.shape_mismatch:
            checks.append(Check(f"{name}: same shape ({m.shape_mismatch})", None, 0.0, False))
            continue
        if m.nonfinite:
            checks.append(Check(f"{name}: non-finite differences", float(m.nonfinite), 0.0, False))
        if t.min_cosine is not None and not m.exact_values:
            checks.append(Check(f"{name}: mean cosine >=", m.mean_cosine, t.min_cosine, m.mean_cosine >= t.min_cosine))
        if t.min_worst_cosine is not None and not m.exact_values:
            checks.append(Check(f"{name}: min cosine >=", m.min_cosine, t.min_worst_cosine,
                                m.min_cosine >= t.min_worst_cosine))
        if t.min_equal_values is not None and m.exact_values and m.top1_agreement is not None:
            checks.append(Check(f"{name}: equal values % >=", m.top1_agreement, t.min_equal_values,
                                m.top1_agreement >= t.min_equal_values))
        if t.max_abs_error is not None:
            checks.append(Check(f"{name}: max abs error <=", m.max_abs_error, t.max_abs_error,
                                m.max_abs_error <= t.max_abs_error))
        if t.max_mean_abs_error is not None:
            checks.append(Check(f"{name}: mean abs error <=", m.mean_abs_error, t.max_mean_abs_error,
                                m.mean_abs_error <= t.max_mean_abs_error))
        if t.max_rel_l2 is not None:
            checks.append(Check(f"{name}: rel L2 error <=", m.rel_l2_error, t.max_rel_l2, m.rel_l2_error <= t.max_rel_l2))
        if t.min_top1_agreement is not None and m.class_scores and m.top1_agreement is not None:
            checks.append(Check(f"{name}: top-1 agreement % >=", m.top1_agreement, t.min_top1_agreement,
                                m.top1_agreement >= t.min_top1_agreement))
    if t.max_accuracy_drop is not None and report.accuracy_drop is not None:
        checks.append(Check("accuracy drop (points) <=", report.accuracy_drop, t.max_accuracy_drop,
                            report.accuracy_drop <= t.max_accuracy_drop))
    if t.min_speedup is not None:
        checks.append(Check("speedup >=", report.speedup, t.min_speedup,
                            report.speedup is not None and report.speedup >= t.min_speedup))
    if t.max_size_ratio is not None and report.size_ratio is not None:
        checks.append(Check("size ratio <=", report.size_ratio, t.max_size_ratio, report.size_ratio <= t.max_size_ratio))
    return checks


def validate(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    data: str | os.PathLike[str] | InputSource | Mapping[str, np.ndarray] | None = None,
    labels: str | os.PathLike[str] | np.ndarray | None = None,
    batch_size: int = 32,
    samples: int | None = None,
    tolerances: Tolerances | None = None,
    dims: Mapping[str, int] | None = None,
    measure_speed: bool = True,
    localize: bool = False,
    *,
    threads: int | None = None,
    speed_repeats: int = 7,
    localize_batches: int = 4,
    value_map: Mapping[str, str] | None = None,
    label_output: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationReport:
    """Runs both models over the same batches and compares them.

    Args:
        reference: The reference model file (opened with ``load_session``).
        candidate: The candidate model file.
        data: Real inputs: a path (``.npz``/``.npy``/``.parquet``/folder), an open source,
            or ``{input_name: array}``. None generates random inputs (and warns).
        labels: Class indices, one per sample (``.npy`` path or array); without them a
            ``label``/``labels`` array in the data that the model does not take is used.
        batch_size: Rows per batch (a model with a fixed batch size uses its own).
        samples: Use only the first ``samples`` rows (random data: how many to draw).
        tolerances: The verdict's limits (:class:`Tolerances` defaults when None).
        dims: Sizes of named dimensions for random inputs, e.g. ``{"seq": 128}``.
        measure_speed: Time both models (median of ``speed_repeats`` runs after warm-up).
        localize: Add the per-node localization table (:func:`~onnxpress.runtime.localize.localize`).
        threads: onnxruntime intra-op threads of the timed runs (its default when None);
            the comparison runs both models at once on half of them (of the cores) each.
        speed_repeats: Timed runs per model.
        localize_batches: Batches localization runs.
        value_map: Reference value name -> candidate value name, for localization.
        label_output: The output compared with labels (the first class-score output when None).
        progress: ``progress(rows_done, rows_total)`` after each batch.

    Returns:
        The report; ``report.passed`` is the verdict.

    Raises:
        InputError: The data does not fit a model, the models' outputs differ in names, or
            the labels do not match the data.
    """
    began = time.perf_counter()
    if samples is not None and samples < 1:
        raise InputError(f"samples must be at least 1, got {samples}")
    if speed_repeats < 1 or localize_batches < 1:
        raise InputError("speed repeats and localization batches must be at least 1")
    tolerances = tolerances or Tolerances()
    if tolerances.min_speedup is not None and not measure_speed:
        raise InputError(
            f"a minimum speedup ({tolerances.min_speedup:g}) is a check, but the models are not timed "
            "(--no-speed / measure_speed=False): time them, or switch the check off (--min-speedup none)"
        )
    warnings: list[str] = []
    # The comparison runs both models at once, each on half the cores (see compare_threads).
    half = compare_threads(threads)
    ref_runner = BatchRunner(reference, batch_size=batch_size,
                             session=load_session(reference, threads=half, spinning=False))
    cand_runner = BatchRunner(candidate, batch_size=batch_size,
                              session=load_session(candidate, threads=half, spinning=False))
    fixed = [b for b in (ref_runner.fixed_batch, cand_runner.fixed_batch) if b is not None]
    if fixed:
        batch_size = min(fixed)
        ref_runner.batch_size = cand_runner.batch_size = batch_size
    else:
        batch_size = ref_runner.batch_size
    missing = [n for n in ref_runner.output_names if n not in cand_runner.output_names]
    if missing:
        raise InputError(
            f"{candidate}: has no output {missing[0]!r} of the reference (candidate outputs: "
            f"{', '.join(cand_runner.output_names)})"
        )
    source, data_label = _open_data(data, ref_runner, samples, dims, warnings)
    try:
        for label, runner in (("reference", ref_runner), ("candidate", cand_runner)):
            try:
                runner.check(source, casting="same_kind")
            except InputError as exc:
                raise InputError(f"{label} {runner.model_path}: {exc}") from exc
        rows = source.num_rows if samples is None else min(samples, source.num_rows)
        if rows == 0:
            raise InputError(f"{data_label}: no samples to validate on")
        if samples is not None and samples > source.num_rows:
            warnings.append(f"{samples} samples were asked for, but the data holds {source.num_rows}; "
                            f"validated on {source.num_rows}")
        label_array, labels_given = _labels(labels, source, ref_runner.input_names, rows, warnings)
        if label_array is not None:
            label_output = _label_output(ref_runner, label_output, labels_given, label_array, warnings)
            if label_output is None:
                label_array = None
        metrics = {name: OutputMetrics(name) for name in ref_runner.output_names}
        correct: dict[str, int | None] = {"r": 0, "c": 0}
        first_feeds: dict[str, np.ndarray] | None = None
        inputs = sorted(set(ref_runner.input_names) | set(cand_runner.input_names))
        # Outputs are compared a few batches at a time: numpy's per-call cost, not arithmetic,
        # dominates small outputs, so one update over many rows is much cheaper than many.
        pending: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {n: ([], []) for n in metrics}
        pending_elements = 0
        pending_start = 0

        def flush(stop: int) -> None:
            nonlocal pending_elements, pending_start
            for name, (refs, cands) in pending.items():
                if refs:
                    if _stackable(refs) and _stackable(cands):
                        pairs = [(np.concatenate(refs) if len(refs) > 1 else refs[0],
                                  np.concatenate(cands) if len(cands) > 1 else cands[0])]
                    else:  # the shape varies from batch to batch (NonZero, TopK with a dynamic k ...)
                        pairs = list(zip(refs, cands, strict=True))
                    for r, c in pairs:
                        metrics[name].update(r, c)
                    if name == label_output and label_array is not None:
                        r, c = pairs[0]
                        truth = label_array[pending_start:stop]
                        if len(pairs) != 1 or len(r) != len(truth):
                            raise InputError(f"label output {name!r} has shape {list(r.shape)} for {len(truth)} "
                                             "samples; labels need one row of class scores per sample")
                        correct["r"] += int(np.count_nonzero(r.argmax(axis=1) == truth))
                        if c.shape != r.shape:  # the shape check fails; the candidate's accuracy is unknown
                            correct["c"] = None
                        elif correct["c"] is not None:
                            correct["c"] += int(np.count_nonzero(c.argmax(axis=1) == truth))
                refs.clear()
                cands.clear()
            pending_elements = 0
            pending_start = stop

        # Phases of PHASE_BATCHES batches: both models run a phase at once on two worker
        # threads (onnxruntime releases the GIL) while this thread folds the previous phase
        # into the metrics and reads the next one.
        def run_phase(runner: BatchRunner, batches: list[tuple[int, int, dict[str, np.ndarray]]],
                      label: str) -> list[dict[str, np.ndarray]]:
            return [_run_checked(runner, feeds, label, lo, hi, data_label) for lo, hi, feeds in batches]

        def collect(ref_outs: list[dict[str, np.ndarray]], cand_outs: list[dict[str, np.ndarray]], hi: int) -> None:
            nonlocal pending_elements
            for ref_out, cand_out in zip(ref_outs, cand_outs, strict=True):
                for name, (refs, cands) in pending.items():
                    # a scalar output (one value per batch) is compared batch by batch
                    refs.append(np.reshape(ref_out[name], 1) if np.ndim(ref_out[name]) == 0 else ref_out[name])
                    cands.append(np.reshape(cand_out[name], 1) if np.ndim(cand_out[name]) == 0 else cand_out[name])
                    pending_elements += ref_out[name].size
            if pending_elements >= METRIC_CHUNK_ELEMENTS:
                flush(hi)

        phase: list[tuple[int, int, dict[str, np.ndarray]]] = []
        done: tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], int] | None = None
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="onnxpress-validate") as pool:
            for lo, hi in iter_slices(rows, batch_size):
                feeds = source.read(lo, hi, inputs)
                if first_feeds is None:
                    first_feeds = feeds
                phase.append((lo, hi, feeds))
                if len(phase) < PHASE_BATCHES and hi < rows:
                    continue
                jobs = (pool.submit(run_phase, ref_runner, phase, "reference"),
                        pool.submit(run_phase, cand_runner, phase, "candidate"))
                if done is not None:
                    collect(*done)
                    if progress is not None:
                        progress(done[2], rows)
                done = (jobs[0].result(), jobs[1].result(), hi)
                phase = []
        if done is not None:
            collect(*done)
            if progress is not None:
                progress(done[2], rows)
        flush(rows)
        report = ValidationReport(
            reference=ModelRun(str(reference), artifact_bytes(reference)),
            candidate=ModelRun(str(candidate), artifact_bytes(candidate)),
            data=data_label, samples=rows, batch_size=batch_size, outputs=metrics,
            tolerances=tolerances, warnings=warnings, label_output=label_output if label_array is not None else None,
        )
        if label_array is not None:
            report.reference.accuracy = 100.0 * correct["r"] / rows
            report.candidate.accuracy = None if correct["c"] is None else 100.0 * correct["c"] / rows
        if measure_speed and first_feeds is not None:
            timed_rows = min(batch_size, rows)
            # padded before timing for a fixed batch size (no padding inside the timed runs); throughput counts the real rows
            full = pad_rows(source.read(0, timed_rows, inputs), batch_size if fixed else None)
            # timed as a user runs a model, with all the threads; the comparison's sessions go first
            del ref_runner, cand_runner
            report.reference.samples_per_second, report.candidate.samples_per_second = _measure_speed(
                BatchRunner(reference, batch_size=batch_size, threads=threads),
                BatchRunner(candidate, batch_size=batch_size, threads=threads), full, speed_repeats, rows=timed_rows)
            report.speed_repeats = speed_repeats
        if localize:
            from onnxpress.runtime.localize import localize as localize_nodes  # imports onnx-ir (0.6 s)

            # localization runs bare sessions: a fixed batch size gets full batches (the last one padded)
            batches = (pad_rows(source.read(lo, hi, inputs), batch_size if fixed else None)
                       for lo, hi in iter_slices(rows, batch_size))
            try:
                report.localization = localize_nodes(reference, candidate, batches, value_map=value_map,
                                                     max_batches=localize_batches)
            except InputError as exc:  # NoSharedValuesError, or models localization cannot run alike
                # the end-to-end comparison still stands; only the per-node table is missing
                report.localization = []
                report.warnings.append(f"no localization: {exc}")
    finally:
        if isinstance(data, (str, os.PathLike)):
            source.close()
    if tolerances.min_top1_agreement is not None and not any(m.class_scores for m in report.outputs.values()):
        report.warnings.append(
            "the top-1 agreement check is not applied: no output holds class scores (floating [samples, classes >= 2], "
            "not named as features); integer and bool outputs are checked by min_equal_values")
    report.checks = _verdict(report)
    report.seconds = time.perf_counter() - began
    logger.info("validated %s against %s on %d samples: %s", candidate, reference, rows,
                "pass" if report.passed else "fail")
    return report
