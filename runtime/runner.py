"""Batch inference over a data source with onnxruntime: checked inputs, padded fixed batches, resumable shards.

:class:`BatchRunner` opens a model through :func:`onnxpress.sessions.load_session`, checks a
data source against the model's inputs before the first batch (names, dtypes, per-row shapes,
named dimensions that must agree across inputs), and runs it batch by batch. A model whose
batch dimension is a fixed number ``B`` (on any input) runs in batches of ``B``; the last batch
is padded by repeating its last row and the outputs are trimmed back.

What cannot be written as rows is refused with an :class:`~onnxpress.errors.InputError` rather
than written wrong: before the first batch, scalar inputs, outputs that are not numeric tensors
(strings, sequences, optionals) and outputs declared with a fixed first size that is not the
batch; at every batch, an output without one row per input row or whose per-row shape or
dtype changed (NonZero, TopK with a computed k); and a failing onnxruntime run, named by its
rows. Arrays of the data that the model does not take are never opened, and an input of no
rows is refused before anything is written.

:meth:`BatchRunner.run` writes the outputs with :class:`onnxpress.runtime.shards.ShardWriter`:
shards of whole batches, each written atomically, and a manifest that lists them, rewritten
atomically (at most once a second, and at the end). Because the shard boundaries depend only on the batch size and the rows per shard
(both kept in the manifest), a resumed run recomputes exactly the rows that no committed shard
holds and writes the same files an uninterrupted run writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxpress.errors import InputError
from onnxpress.runtime.data import InputSource, open_source
from onnxpress.runtime.shards import (
    MANIFEST,
    ShardWriter,
    assemble_parquet,
    parquet_run_fingerprint,
    read_manifest,
    run_fingerprint,
)
from onnxpress.sessions import load_session

logger = logging.getLogger(__name__)

#: onnxruntime's type strings to numpy dtypes.
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}

#: ``progress(rows_done, rows_total)``, called after every batch.
ProgressCallback = Callable[[int, int], None]

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and dimensions (an int, a symbolic name, or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size when the first dimension is a fixed number."""
        return self.dims[0] if self.dims and isinstance(self.dims[0], int) else None

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.dtype}[{dims}]"


def input_specs(session: ort.InferenceSession) -> list[InputSpec]:
    """The session's inputs as :class:`InputSpec` (a dimension of -1 or unnamed is None)."""
    specs = []
    for arg in session.get_inputs():
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise InputError(f"input {arg.name!r} has type {arg.type}, which batch inference does not feed")
        dims = tuple(d if isinstance(d, str) or (isinstance(d, int) and d >= 0) else None for d in arg.shape)
        specs.append(InputSpec(arg.name, dtype, dims))
    return specs


def output_specs(session: ort.InferenceSession) -> list[InputSpec]:
    """The session's outputs as :class:`InputSpec`, refusing any that is not a numeric tensor.

    Raises:
        InputError: An output is a string tensor, a sequence, a map or an optional, which the
            shard formats cannot hold; or it is declared as a scalar (no axis of samples).
    """
    specs = []
    for arg in session.get_outputs():
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise InputError(
                f"output {arg.name!r} has type {arg.type}; batch inference writes numeric tensors "
                f"({', '.join(t[7:-1] for t in ORT_DTYPES)})"
            )
        dims = tuple(d if isinstance(d, str) or (isinstance(d, int) and d >= 0) else None for d in arg.shape)
        if arg.shape is not None and len(arg.shape) == 0:
            raise InputError(
                f"output {arg.name!r} is a scalar (rank 0); batch inference needs every output to have "
                "a first axis of samples"
            )
        specs.append(InputSpec(arg.name, dtype, dims))
    return specs


def check_source(
    specs: Sequence[InputSpec], source_specs: Mapping[str, Any], where: str, *, casting: str = "safe"
) -> dict[str, int]:
    """Checks data arrays against the model's inputs and binds the symbolic dimensions.

    Args:
        specs: The model's inputs.
        source_specs: ``{name: ArraySpec}`` of the data (``dtype`` and ``row_shape``).
        where: What the data is, for messages (a path).
        casting: Which dtype conversions are accepted (numpy's ``can_cast`` rule): ``"safe"``
            (int32 into int64) for running; ``"same_kind"`` lets a float16 model validate
            on the float32 data of its reference.

    Returns:
        ``{dim_name: value}`` for the named dimensions after the first.

    Raises:
        InputError: An input is missing, or its dtype, rank or a dimension differs from what
            the model expects; the message names the input and the expectation.
    """
    missing = [s.name for s in specs if s.name not in source_specs]
    if missing:
        raise InputError(
            f"{where}: the model needs input {missing[0]!r} ({_spec_of(specs, missing[0]).describe()}), "
            f"but the data holds only {sorted(source_specs)}"
        )
    bound: dict[str, tuple[int, str]] = {}
    for spec in specs:
        data = source_specs[spec.name]
        if not spec.dims:
            raise InputError(
                f"{where}: the model's input {spec.name!r} is a scalar ({spec.describe()}), which cannot be "
                "fed a batch of rows; batch inference needs every input to have a first axis of samples"
            )
        if data.dtype != spec.dtype and not np.can_cast(data.dtype, spec.dtype, casting):
            raise InputError(
                f"{where}: input {spec.name!r} is {data.dtype}, but the model expects {spec.dtype} "
                f"({spec.describe()}); convert it (e.g. array.astype(np.{spec.dtype.name}))"
            )
        row_dims = spec.dims[1:]
        if len(data.row_shape) != len(row_dims):
            raise InputError(
                f"{where}: input {spec.name!r} has rows of shape {list(data.row_shape)} (rank {len(data.row_shape) + 1} "
                f"with the sample axis), but the model expects {spec.describe()} (rank {len(spec.dims)})"
            )
        for axis, (want, got) in enumerate(zip(row_dims, data.row_shape, strict=True), start=1):
            if isinstance(want, int) and want != got:
                raise InputError(
                    f"{where}: input {spec.name!r} has size {got} on axis {axis}, but the model expects "
                    f"{want} ({spec.describe()})"
                )
            if isinstance(want, str):
                if want in bound and bound[want][0] != got:
                    other_value, other = bound[want]
                    raise InputError(
                        f"{where}: dimension {want!r} is {other_value} in input {other!r} but {got} in "
                        f"input {spec.name!r}; the model needs them equal"
                    )
                bound.setdefault(want, (got, spec.name))
    return {k: v for k, (v, _) in bound.items()}


def pad_rows(feeds: Mapping[str, np.ndarray], rows: int | None) -> dict[str, np.ndarray]:
    """Pads a short batch to ``rows`` rows by repeating its last row (a fixed-batch model's last batch)."""
    have = len(next(iter(feeds.values()))) if feeds else 0
    if rows is None or not feeds or have >= rows:
        return dict(feeds)
    return {k: np.pad(v, [(0, rows - have)] + [(0, 0)] * (v.ndim - 1), mode="edge") for k, v in feeds.items()}


def _row_signatures(declared: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """``{name: (dtype, row shape)}`` from the manifest's ``outputs``, in the form a batch is compared with."""
    return {name: (np.dtype(d["dtype"]), tuple(d["row_shape"])) for name, d in declared.items()}


def _check_outputs(
    outputs: Mapping[str, Any], lo: int, hi: int, expected: Mapping[str, tuple[np.dtype, tuple[int, ...]]] | None = None
) -> None:
    """Every output must be an array with one row per input row, and rows alike in every batch.

    Args:
        outputs: One batch's outputs.
        lo: The batch's first row.
        hi: One past its last row.
        expected: ``{name: (dtype, row shape)}`` of the batches before (:func:`_row_signatures`
            of the manifest's ``outputs``); None for the first batch.

    Raises:
        InputError: An output is not a tensor, has no first axis of ``hi - lo`` rows, or its
            per-row shape or dtype differs from the batches before (a data-dependent shape,
            e.g. NonZero or TopK with a computed k), which no shard can hold.
    """
    rows = hi - lo
    for name, value in outputs.items():
        shape = getattr(value, "shape", None)
        if shape is None:
            raise InputError(f"output {name!r} is a {type(value).__name__}, not a tensor; batch inference writes tensors")
        if not shape or shape[0] != rows:
            raise InputError(
                f"output {name!r} has shape {list(shape)} for a batch of {rows} rows (rows {lo}-{hi}); batch "
                "inference needs every output to have a first axis of samples"
            )
        want = expected.get(name) if expected else None
        if want is not None and (shape[1:] != want[1] or value.dtype != want[0]):
            raise InputError(
                f"output {name!r} has rows of {value.dtype}{list(shape[1:])} in rows {lo}-{hi} but "
                f"{want[0]}{list(want[1])} before; batch inference needs outputs whose "
                "per-row shape does not depend on the data"
            )


def _spec_of(specs: Sequence[InputSpec], name: str) -> InputSpec:
    return next(s for s in specs if s.name == name)


@dataclass
class RunResult:
    """What :meth:`BatchRunner.run` did."""

    output: Path
    rows: int
    rows_computed: int
    shards: int
    seconds: float
    resumed_from: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else float("nan")


class BatchRunner:
    """Runs one model over batches of named arrays.

    Example::

        runner = BatchRunner("model.onnx", batch_size=64)
        result = runner.run("inputs.npz", "outputs/", resume=True)

    Args:
        model: The model file (opened with :func:`onnxpress.sessions.load_session`).
        batch_size: Rows per batch; a model with a fixed batch dimension uses its own.
        threads: onnxruntime intra-op threads (its default when None).
        session: An already open session to use instead of opening ``model``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        batch_size: int = 32,
        threads: int | None = None,
        session: ort.InferenceSession | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.model_path = Path(model)
        self.session = session if session is not None else load_session(self.model_path, threads=threads)
        self.inputs = input_specs(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_names = tuple(s.name for s in self.inputs)
        self._input_dtypes = tuple((s.name, s.dtype) for s in self.inputs)
        fixed = {s.fixed_batch for s in self.inputs} - {None}
        if len(fixed) > 1:
            listing = ", ".join(f"{s.name!r}: {s.describe()}" for s in self.inputs if s.fixed_batch is not None)
            raise InputError(
                f"{self.model_path}: the model's inputs fix different batch sizes ({listing}); batch inference "
                "needs one first axis of samples"
            )
        self.fixed_batch: int | None = None
        if fixed:
            # One input with a fixed first axis fixes the batch for all (the rows are fed together).
            f = next(iter(fixed))
            self.fixed_batch = f
            if batch_size != f:
                logger.warning("the model's batch size is fixed at %d; running batches of %d (not %d)", f, f, batch_size)
            batch_size = f
        self.batch_size = batch_size
        # Errors are raised (and reported once, by the caller); onnxruntime's own log line would repeat them.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    def check(self, source: InputSource, *, casting: str = "safe") -> dict[str, int]:
        """Checks a source against the model's inputs; see :func:`check_source`."""
        missing = [s for s in self.inputs if s.name not in source.specs]
        if missing:  # name every array, also those a source left unread (``only``)
            held = sorted(set(source.specs) | set(getattr(source, "ignored", ())))
            raise InputError(
                f"{source.path}: the model needs input {missing[0].name!r} ({missing[0].describe()}), "
                f"but the data holds only {held}"
            )
        return check_source(self.inputs, source.specs, str(source.path), casting=casting)

    def run_batch(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch, padding it to a fixed batch size and trimming the outputs back."""
        outputs = self._run_values({name: feeds[name] for name in self._input_names})
        return dict(zip(self.output_names, outputs, strict=True))

    def _run_values(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """:meth:`run_batch` on a dict of exactly the model's inputs (cast in place), the outputs as a list."""
        for name, dtype in self._input_dtypes:
            if feeds[name].dtype != dtype:
                feeds[name] = feeds[name].astype(dtype)
        rows = len(feeds[self._input_names[0]]) if self._input_names else 0
        pad = self.fixed_batch is not None and rows < self.fixed_batch
        if pad:
            feeds = pad_rows(feeds, self.fixed_batch)
        try:
            outputs = self.session.run(self.output_names, feeds, self._run_options)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidArgument...)
            message = " ".join(str(exc).split())
            raise InputError(f"onnxruntime cannot run the model on a batch of {rows} rows: {message}") from exc
        if pad:  # trims the outputs that have a row per padded sample; a scalar has none
            outputs = [o[:rows] if getattr(o, "ndim", 0) and len(o) == self.fixed_batch else o for o in outputs]
        return outputs

    def _check_declared_outputs(self) -> list[InputSpec]:
        """Refuses outputs the shards cannot hold, and outputs declared without an axis of samples.

        An output declared with a fixed first size other than the batch (``float[3, N]``, a
        NonZero's ``int64[2, K]``) would be cut into rows that are not samples; an output whose
        first axis has a name no input's batch axis has (``Range``'s ``int64[R]``) may be one
        too, which only a warning can say.
        """
        specs = output_specs(self.session)
        batch_names = {s.dims[0] for s in self.inputs if s.dims and isinstance(s.dims[0], str)}
        for spec in specs:
            first = spec.dims[0] if spec.dims else None
            if isinstance(first, int) and first != self.fixed_batch:
                batch = f"fixed at {self.fixed_batch}" if self.fixed_batch is not None else "dynamic"
                raise InputError(
                    f"{self.model_path}: output {spec.name!r} is declared {spec.describe()}, whose first axis is "
                    f"not the samples (the batch is {batch}); batch inference needs every output to have a "
                    "first axis of samples"
                )
            if isinstance(first, str) and batch_names and first not in batch_names:
                logger.warning(
                    "output %r is declared %s: its first axis %r is not the inputs' batch axis (%s); its rows are "
                    "written as samples", spec.name, spec.describe(), first, ", ".join(sorted(batch_names)))
        return specs

    @staticmethod
    def _finished_parquet(output: Path, folder: Path, fingerprint: dict[str, Any]) -> bool:
        """Whether ``output`` is the finished result of this run (for ``--resume`` after it completed).

        A kill between publishing the file and removing the shard folder leaves both: the
        folder is removed now.
        """
        if parquet_run_fingerprint(output) != json.loads(json.dumps(fingerprint)):
            return False
        if (folder / MANIFEST).is_file() and read_manifest(folder).get("complete"):
            shutil.rmtree(folder)
        return True

    def iter_outputs(
        self, source: InputSource, *, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Yields ``(start, stop, outputs)`` for each batch from row ``start`` on."""
        names = self.output_names
        for lo, hi, values in self._iter_values(source, start, stop):
            yield lo, hi, dict(zip(names, values, strict=True))

    def _iter_values(
        self, source: InputSource, start: int, stop: int | None
    ) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """:meth:`iter_outputs` with each batch's outputs as a list in ``output_names`` order."""
        stop = source.num_rows if stop is None else min(stop, source.num_rows)
        read, run_values, names, batch = source.read, self._run_values, self._input_names, self.batch_size
        for lo in range(start, stop, batch):
            hi = min(lo + batch, stop)
            try:
                values = run_values(read(lo, hi, names))
            except InputError as exc:
                raise InputError(f"{source.path}: rows {lo}-{hi}: {exc}") from exc
            yield lo, hi, values

    def run(
        self,
        data: str | os.PathLike[str] | InputSource,
        output: str | os.PathLike[str],
        *,
        resume: bool = False,
        force: bool = False,
        output_format: str = "npz",
        shard_rows: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> RunResult:
        """Runs the model over every row of ``data`` and writes the outputs to ``output``.

        Args:
            data: A path (see :func:`onnxpress.runtime.data.open_source`) or an open source.
            output: A folder of shards plus ``manifest.json``; a path ending in ``.parquet``
                gets one Parquet file, assembled from the shards once all are written.
            resume: Continue a run that stopped (crash, kill, Ctrl-C) in ``output``.
            force: Replace an existing output instead of refusing.
            output_format: ``"npz"`` or ``"parquet"`` shards (a ``.parquet`` output implies it).
            shard_rows: Rows per shard, a multiple of the batch size (chosen from the output
                size when None: about 1/64 of the output, 4 to 64 MiB a shard).
            progress: Called with ``(rows_done, rows_total)`` after each batch.

        Raises:
            InputError: The data does not fit the model, or the output exists without
                ``resume``/``force``, or a resumed output was started with other data or another model.
        """
        source = (data if not isinstance(data, (str, os.PathLike))
                  else open_source(data, self.input_names, only=self.input_names))
        try:
            self.check(source)
            self._check_declared_outputs()
            if source.num_rows == 0:
                raise InputError(f"{source.path}: holds no rows (0 samples); there is nothing to run")
            output = Path(output)
            single_parquet = output.suffix == ".parquet"
            folder = output.with_name(output.name + ".parts") if single_parquet else output
            fmt = "parquet" if single_parquet else output_format
            if single_parquet and output.is_dir():
                raise InputError(f"{output}: is a folder; an output ending in .parquet is one file (choose another name)")
            fingerprint = run_fingerprint(self.model_path, source.path, source.num_rows, self.batch_size)
            if single_parquet and output.exists() and not force:
                if resume and self._finished_parquet(output, folder, fingerprint):
                    logger.info("%s: the run is already complete", output)
                    return RunResult(output=output, rows=source.num_rows, rows_computed=0, shards=0, seconds=0.0,
                                     resumed_from=source.num_rows)
                raise InputError(f"{output}: the output already exists; pass --force to replace it")
            writer = ShardWriter.open(
                folder, fingerprint=fingerprint, resume=resume, force=force, output_format=fmt,
                batch_size=self.batch_size, shard_rows=shard_rows, total_rows=source.num_rows,
            )
            start_row = writer.rows_done
            if start_row:
                logger.info("resuming at row %d of %d (%d shards done)", start_row, source.num_rows, len(writer.shards))
            began = time.perf_counter()
            if progress is not None:
                progress(start_row, source.num_rows)
            try:
                expected = _row_signatures(writer.manifest["outputs"]) if writer.manifest["outputs"] else None
                signatures: list[tuple[np.dtype, tuple[int, ...]]] = []
                names, add_values = self.output_names, writer.add_values
                # Python right after an onnxruntime run is several times slower than in a tight loop
                # (the run evicted its caches), so every batch after the first does as little as it can.
                for lo, hi, values in self._iter_values(source, start_row, None):
                    if signatures:
                        rows = hi - lo
                        try:
                            for value, (dtype, row_shape) in zip(values, signatures):
                                shape = value.shape
                                if shape[0] != rows or shape[1:] != row_shape or value.dtype != dtype:
                                    raise ValueError
                        except (AttributeError, IndexError, ValueError):
                            _check_outputs(dict(zip(names, values, strict=True)), lo, hi, expected)  # raises
                        add_values(values, rows)
                    else:
                        outputs = dict(zip(names, values, strict=True))
                        _check_outputs(outputs, lo, hi, expected)
                        writer.add(outputs)
                        expected = _row_signatures(writer.manifest["outputs"])
                        signatures = [expected[name] for name in names]
                    if progress is not None:
                        progress(hi, source.num_rows)
                writer.finish()  # closes the writer
            except BaseException:
                writer.close()  # on Ctrl-C too: the shard being written is finished and kept
                writer.restore()  # a forced replacement that failed gives the earlier outputs back
                raise
            seconds = time.perf_counter() - began
            if single_parquet:
                assemble_parquet(folder, output, force=force)
            return RunResult(
                output=output, rows=source.num_rows, rows_computed=source.num_rows - start_row,
                shards=len(writer.shards), seconds=seconds, resumed_from=start_row,
            )
        finally:
            if isinstance(data, (str, os.PathLike)):
                source.close()
