"""Calibration data for the quantizers: batches of real inputs read from a file a slice at a time.

A quantizer that calibrates (``quantize-int8-static``, ``auto_exclude``) takes an iterable of
``{input_name: array}`` batches. :class:`CalibrationData` is that iterable over an ``.npz``
(``.npy``, Parquet, or a folder of them) file: it reads through
:mod:`onnxpress.runtime.data`, so only one batch is ever in memory, however large the file, and
it can be iterated more than once (static calibration reads the data once per pass over it).

Before any work the data is checked against the model's inputs (names, dtypes, ranks and fixed
dimensions); a mismatch raises :class:`~onnxpress.errors.InputError` naming the input and what
the model expects. Arrays of a narrower type than the model's (``int32`` token ids for an
``int64`` input) are widened batch by batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxpress.errors import InputError

logger = logging.getLogger(__name__)

#: Default number of samples per calibration batch.
DEFAULT_BATCH_SIZE = 16


def model_input_specs(model: ir.Model) -> list:
    """The model's graph inputs (initializers excluded) as runtime ``InputSpec`` records."""
    from onnxpress.runtime.runner import InputSpec

    specs = []
    for value in model.graph.inputs:
        if value.is_initializer() or value.dtype is None:
            continue
        try:
            dtype = np.dtype(value.dtype.numpy())
        except (TypeError, ValueError) as exc:
            raise InputError(f"input {value.name!r} has type {value.dtype}, which calibration cannot feed") from exc
        dims: tuple = ()
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape)
        specs.append(InputSpec(value.name or "", dtype, dims))
    return specs


class CalibrationData:
    """Batches of ``{input_name: array}`` read from a data file, one batch in memory at a time.

    Args:
        path: An ``.npz`` (one array per input name, first axis = samples), ``.npy`` (a
            single-input model), ``.parquet`` file, or a folder of them.
        model: When given, the data is checked against its inputs now.
        batch_size: Samples per batch (the last batch may be smaller).
        max_samples: Use at most this many samples (all when None).

    Raises:
        InputError: The file is missing or unreadable, or does not fit the model.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: ir.Model | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_samples: int | None = None,
    ) -> None:
        from onnxpress.runtime.data import open_source

        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        self.path = Path(path)
        names = [s.name for s in model_input_specs(model)] if model is not None else []
        self.source = open_source(self.path, names)
        self.batch_size = batch_size
        self.num_samples = self.source.num_rows if max_samples is None else min(max_samples, self.source.num_rows)
        if self.num_samples == 0:
            raise InputError(f"{self.path}: holds no samples; calibration needs at least one")
        self._dtypes: dict[str, np.dtype] = {}
        self._names: list[str] | None = None
        if model is not None:
            self.check(model)

    def check(self, model: ir.Model) -> None:
        """Checks the data against the model's inputs.

        Raises:
            InputError: An input is missing, or its dtype, rank or a fixed dimension differs;
                the message names the input and what the model expects.
        """
        from onnxpress.runtime.runner import check_source

        specs = model_input_specs(model)
        fixed = next((s for s in specs if s.fixed_batch is not None), None)
        if fixed is not None and fixed.fixed_batch != self.batch_size and self.num_samples >= fixed.fixed_batch:
            logger.info("calibration: the model's batch is fixed at %d; using batches of that size", fixed.fixed_batch)
            self.batch_size = int(fixed.fixed_batch)
            self.num_samples -= self.num_samples % self.batch_size  # no short last batch
        check_source(specs, self.source.specs, str(self.path))
        self._names = [s.name for s in specs]
        self._dtypes = {s.name: s.dtype for s in specs}

    def __len__(self) -> int:
        """The number of batches."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        names = self._names
        for lo in range(0, self.num_samples, self.batch_size):
            hi = min(lo + self.batch_size, self.num_samples)
            batch = self.source.read(lo, hi, names)
            yield {k: v.astype(self._dtypes[k], copy=False) if k in self._dtypes else v for k, v in batch.items()}

    def close(self) -> None:
        """Releases the open file."""
        self.source.close()


def check_batch(model: ir.Model, batch: Mapping[str, np.ndarray], where: str = "calibration batch") -> None:
    """Checks one in-memory batch against the model's inputs (for the Python API's lists of dicts).

    Raises:
        InputError: An input is missing or does not have the model's dtype, rank or fixed sizes.
    """
    from onnxpress.runtime.data import ArraySpec
    from onnxpress.runtime.runner import check_source

    if not isinstance(batch, Mapping):
        raise InputError(f"{where}: expected a mapping of input name to array, got {type(batch).__name__}")
    specs = {}
    for name, array in batch.items():
        array = np.asarray(array)
        if array.ndim == 0:
            raise InputError(f"{where}: input {name!r} is a scalar; every array needs a first axis of samples")
        specs[name] = ArraySpec(array.dtype, tuple(array.shape[1:]))
    check_source(model_input_specs(model), specs, where)


def checked_batches(model: ir.Model, batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches, each checked against the model and cast to the model's input dtypes."""
    dtypes = {s.name: s.dtype for s in model_input_specs(model)}
    count = 0
    for i, batch in enumerate(batches):
        check_batch(model, batch, f"calibration batch {i}")
        count += 1
        yield {k: np.asarray(batch[k]).astype(dtypes[k], copy=False) for k in dtypes}
    if count == 0:
        raise InputError("the calibration data holds no batch")
