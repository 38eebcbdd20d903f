"""Input data for batch inference: ``.npy``, ``.npz``, folders of shards and Parquet, read in slices.

Every reader is an :class:`InputSource`: it knows how many rows (samples) it holds, the name,
dtype and per-row shape of each array, and returns rows ``[start, stop)`` on demand. Nothing is
read before it is asked for, so a file larger than memory runs in the memory of a few batches.

How each format is read without loading it whole:

* ``.npy``: the header gives dtype, shape and the data offset; the file is memory-mapped and
  a slice of rows is a read-only view that onnxruntime reads in place. Pages of rows already
  read are dropped from the process (``madvise``) and the next rows are read ahead, so the
  resident memory stays at a few batches (``numpy.load(mmap_mode="r")`` alone keeps every
  page it touched resident, growing to the whole file over a run).
* ``.npz`` whose members are *stored* (``numpy.savez``): a zip member that is stored is one
  contiguous run of bytes, so each member is read the same way at its offset inside the
  archive (the local file header gives the offset; the ``.npy`` header inside gives dtype,
  shape and order). ``numpy.load`` cannot do this: it copies every member it is asked for
  into memory.
* ``.npz`` whose members are *deflated* (``numpy.savez_compressed``): each member is a
  decompressing stream read forward; rows are read batch by batch and never kept. Reading
  backwards (which batch iteration never does) reopens the stream.
* A folder: every ``*.npz`` / ``*.npy`` file in it, in name order, concatenated along the
  first axis; a slice may span two files.
* Parquet (``pyarrow``, the ``parquet`` extra): one column per input; a cell is a scalar or a
  (nested) list; lists are reshaped to the per-row shape the first row shows. Row groups are
  read only when a slice needs them (the last one is cached).
"""

from __future__ import annotations

import logging
import mmap
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from onnxpress.errors import InputError

logger = logging.getLogger(__name__)

#: Memory-mapped inputs are read ahead, and dropped behind, in windows of this many bytes.
_WINDOW_BYTES = 16 * 1024**2
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class ArraySpec:
    """One array of a source: its dtype and the shape of one row (first axis removed)."""

    dtype: np.dtype
    row_shape: tuple[int, ...]


class InputSource(Protocol):
    """Rows of named arrays, read a slice at a time."""

    path: Path
    num_rows: int
    specs: dict[str, ArraySpec]

    def read(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of the named arrays (all when ``names`` is None).

        The arrays may be read-only views of the file (``.npy`` and stored ``.npz``): copy
        one before changing it in place.
        """
        ...

    def close(self) -> None:
        """Releases open files."""
        ...


def _check_rows(path: Path, arrays: dict[str, tuple[int, ...]]) -> int:
    """The common number of rows of arrays given by shape; an error names those that differ."""
    if not arrays:
        raise InputError(f"{path}: holds no arrays")
    counts = {name: (shape[0] if shape else None) for name, shape in arrays.items()}
    scalars = [n for n, c in counts.items() if c is None]
    if scalars:
        raise InputError(f"{path}: array {scalars[0]!r} is a scalar; every array needs a first axis of samples")
    distinct = sorted(set(counts.values()))
    if len(distinct) > 1:
        listing = ", ".join(f"{n!r}: {c}" for n, c in counts.items())
        raise InputError(f"{path}: arrays have different numbers of samples ({listing}); the first axis must agree")
    return int(distinct[0])


class _RowFile:
    """A C-ordered array stored contiguously in a file at ``offset``, read by rows without copying.

    The file is memory-mapped (``MADV_SEQUENTIAL``: the kernel reads ahead) and a slice of rows
    is a read-only view of the mapping, which onnxruntime reads in place (no copy). As reads go
    forward, the pages of rows already read are dropped from the process in windows of 16 MiB
    (``MADV_DONTNEED``; the page cache keeps them, and a view still held faults them back in),
    so the process's resident memory stays at a window plus a batch however large the file
    is. Dropping costs about what faulting the pages in did (~0.15 s per GB here), which only
    a model that does almost no work per input byte notices. A plain ``numpy.load(mmap_mode="r")`` would leave every page it has
    touched resident. Fortran-ordered arrays, whose rows are not contiguous, are copied.
    """

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> None:
        self.path = path
        self.offset = offset
        self.dtype = dtype
        self.shape = shape
        self.row_elements = int(np.prod(shape[1:], dtype=np.int64))
        self.row_bytes = self.row_elements * dtype.itemsize
        self.row_shape = tuple(shape[1:])
        self.fortran = fortran and len(shape) > 1
        self._mmap: mmap.mmap | None = None
        self._released = 0  # pages before this offset were dropped from the process
        self._array: np.ndarray | None = None
        if int(np.prod(shape, dtype=np.int64)) > 0:
            with open(path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._mmap.madvise(mmap.MADV_SEQUENTIAL)  # aggressive kernel read-ahead
            # One view of the whole array, sliced per batch (a slice costs ~0.2 us, a new view ~3 us).
            self._array = np.ndarray(shape, dtype=dtype, buffer=self._mmap, offset=offset,
                                     order="F" if self.fortran else "C")

    def read(self, start: int, stop: int) -> np.ndarray:
        array = self._array
        if array is None or stop <= start or start >= self.shape[0]:
            return np.empty((max(0, min(stop, self.shape[0]) - start), *self.shape[1:]), dtype=self.dtype)
        if self.fortran:
            return np.ascontiguousarray(array[start:stop])
        # Dropping pages costs about as much as faulting them in: once per window, not per batch.
        begin = self.offset + start * self.row_bytes
        if begin < self._released:  # reading backwards: start the window over
            self._released = begin - begin % _PAGE
        elif begin - self._released >= _WINDOW_BYTES:  # then the floor is a window on too (page multiples)
            floor = begin - begin % _PAGE
            self._mmap.madvise(mmap.MADV_DONTNEED, self._released, floor - self._released)  # type: ignore[union-attr]
            self._released = floor
        return array[start:stop]

    def close(self) -> None:
        if self._mmap is not None:
            self._array = None
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds rows; the mapping closes when they go
                pass
            self._mmap = None


def _check_size(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], limit: int, what: str) -> None:
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need > limit:
        raise InputError(f"{path}: {what} needs {need} bytes but has {limit} (truncated?)")


class NpySource:
    """A single ``.npy`` file read by rows; its one array is named by ``name``."""

    def __init__(self, path: Path, name: str = "") -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = _read_header(f, version)
                offset = f.tell()
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not a readable .npy file: {exc}") from exc
        if dtype.hasobject:
            raise InputError(f"{path}: holds Python objects; only numeric arrays are read")
        _check_size(path, offset, dtype, tuple(shape), path.stat().st_size, "the array")
        self._rows = _RowFile(path, offset, dtype, tuple(shape), fortran)
        self.name = name
        self.num_rows = _check_rows(path, {name: tuple(shape)})
        self.specs = {name: ArraySpec(dtype, tuple(shape[1:]))}

    def rename(self, name: str) -> None:
        """Names the single array (a ``.npy`` file carries no name; the model's input gives it)."""
        self.specs = {name: self.specs.pop(self.name)}
        self.name = name

    def read(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {self.name: self._rows.read(start, stop)}

    def close(self) -> None:
        self._rows.close()


class _StreamedMember:
    """A deflated ``.npy`` member of an ``.npz``, read forward row by row."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        self._archive = archive
        self._info = info
        self._stream: IO[bytes] | None = None
        self._position = 0
        self._open()
        assert self.dtype is not None

    def _open(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = self._archive.open(self._info)
        version = np.lib.format.read_magic(self._stream)
        shape, fortran, dtype = _read_header(self._stream, version)
        if fortran and len(shape) > 1:
            raise InputError(
                f"member {self._info.filename!r} is a Fortran-ordered array in a compressed .npz, "
                "which cannot be streamed by rows; save it C-ordered (np.ascontiguousarray)"
            )
        if dtype.hasobject:
            raise InputError(f"member {self._info.filename!r} holds Python objects; only numeric arrays are read")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._position = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        if start < self._position:
            self._open()
        assert self._stream is not None
        skip = (start - self._position) * self._row_bytes
        while skip > 0:
            chunk = self._stream.read(min(skip, 1 << 24))
            if not chunk:
                raise InputError(f"member {self._info.filename!r} ends early (truncated archive?)")
            skip -= len(chunk)
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(bytearray())
        done = 0
        while done < len(view):
            count = self._stream.readinto(view[done:])  # type: ignore[attr-defined]
            if not count:
                raise InputError(f"member {self._info.filename!r} ends early (truncated archive?)")
            done += count
        self._position = stop
        return out

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _read_header(stream: IO[bytes], version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The ``.npy`` header after the magic: shape, Fortran order, dtype."""
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _stored_member(path: Path, handle: IO[bytes], info: zipfile.ZipInfo) -> _RowFile:
    """Locates a stored (uncompressed) ``.npy`` member of a zip archive, to be read by rows."""
    handle.seek(info.header_offset)
    header = handle.read(30)
    if header[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: member {info.filename!r} has a corrupt zip header")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    data_offset = info.header_offset + 30 + name_len + extra_len
    handle.seek(data_offset)
    version = np.lib.format.read_magic(handle)
    shape, fortran, dtype = _read_header(handle, version)
    if dtype.hasobject:
        raise InputError(f"{path}: member {info.filename!r} holds Python objects; only numeric arrays are read")
    offset = handle.tell()
    _check_size(path, offset, dtype, tuple(shape), data_offset + info.file_size, f"member {info.filename!r}")
    return _RowFile(path, offset, dtype, tuple(shape), fortran)


class NpzSource:
    """An ``.npz`` archive: stored members read in place by rows, deflated members streamed.

    Args:
        path: The archive.
        only: The arrays that will be read (a model's inputs); the others are ignored even
            when they are not readable as rows (a scalar, Python objects, another length).
            None reads every array.
    """

    def __init__(self, path: Path, only: Sequence[str] | None = None) -> None:
        self.path = path
        try:
            self._archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path}: not a readable .npz archive: {exc}") from exc
        self._handle = open(path, "rb")  # noqa: SIM115 - kept open for the source's life
        self._mapped: dict[str, _RowFile] = {}
        self._streamed: dict[str, _StreamedMember] = {}
        #: Arrays left unread because ``only`` does not name them (for messages).
        self.ignored: list[str] = []
        for info in self._archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            if only is not None and name not in only:
                self.ignored.append(name)
                continue  # an array the model does not take (labels, metadata): never read
            try:
                if info.compress_type == zipfile.ZIP_STORED:
                    self._mapped[name] = _stored_member(path, self._handle, info)
                else:
                    self._streamed[name] = _StreamedMember(self._archive, info)
            except ValueError as exc:
                raise InputError(f"{path}: member {info.filename!r} is not a .npy array: {exc}") from exc
            except InputError as exc:
                if str(exc).startswith(str(path)):
                    raise
                raise InputError(f"{path}: {exc}") from exc
        shapes = {n: tuple(a.shape) for n, a in self._mapped.items()}
        shapes |= {n: m.shape for n, m in self._streamed.items()}
        if not shapes and only is not None:
            names = sorted(i.filename[: -len(".npy")] for i in self._archive.infolist() if i.filename.endswith(".npy"))
            raise InputError(f"{path}: holds no array named like the model's inputs ({', '.join(only)}); it holds {names}")
        self.num_rows = _check_rows(path, shapes)
        self.specs = {n: ArraySpec(a.dtype, tuple(a.shape[1:])) for n, a in self._mapped.items()}
        self.specs |= {n: ArraySpec(m.dtype, m.shape[1:]) for n, m in self._streamed.items()}
        if self._streamed:
            logger.info("%s: members %s are compressed and are streamed", path, sorted(self._streamed))

    def read(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        out = {}
        for name in names if names is not None else self.specs:
            if name in self._mapped:
                out[name] = self._mapped[name].read(start, stop)
            else:
                out[name] = self._streamed[name].read(start, stop)
        return out

    def close(self) -> None:
        for member in self._streamed.values():
            member.close()
        for rows in self._mapped.values():
            rows.close()
        self._mapped.clear()
        self._archive.close()
        self._handle.close()


class ParquetSource:
    """A Parquet file; each column is one input, a cell one row (a scalar or nested list).

    Args:
        path: The file.
        only: The columns that will be read (a model's inputs); the others (ids, text) are
            never read. None reads every column.
    """

    def __init__(self, path: Path, only: Sequence[str] | None = None) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise InputError(
                f"{path}: reading Parquet needs pyarrow; install onnxpress[parquet]"
            ) from exc
        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid and OSError
            raise InputError(f"{path}: not a readable Parquet file: {exc}") from exc
        meta = self._file.metadata
        self.num_rows = meta.num_rows
        self._group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        names = self._file.schema_arrow.names
        self._columns = [n for n in names if only is None or n in only]
        self.ignored = [n for n in names if n not in self._columns]
        if self.num_rows == 0:
            raise InputError(f"{path}: the Parquet file has no rows")
        if not self._columns:
            raise InputError(f"{path}: holds no column named like the model's inputs ({', '.join(only or ())}); "
                             f"it holds {names}")
        self.specs: dict[str, ArraySpec] = {}
        first = self._group(next(i for i in range(meta.num_row_groups) if meta.row_group(i).num_rows))
        self.specs = {n: ArraySpec(first[n].dtype, tuple(first[n].shape[1:])) for n in self._columns}

    def _group(self, index: int) -> dict[str, np.ndarray]:
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        table = self._file.read_row_group(index, columns=self._columns)
        arrays = {name: _column_to_numpy(self.path, name, table.column(name)) for name in table.column_names}
        for name, array in arrays.items():  # the first row group fixed the specs; later ones must agree
            spec = self.specs.get(name)
            if spec is not None and len(array) and (array.dtype != spec.dtype or array.shape[1:] != spec.row_shape):
                raise InputError(
                    f"{self.path}: column {name!r} has rows of {array.dtype}{list(array.shape[1:])} in row group "
                    f"{index} but {spec.dtype}{list(spec.row_shape)} in the first; every row must have the same shape"
                )
        self._cache = (index, arrays)
        return arrays

    def read(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(names if names is not None else self.specs)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        group = int(np.searchsorted(self._group_starts, start, side="right") - 1)
        position = start
        while position < stop:
            g_start, g_stop = int(self._group_starts[group]), int(self._group_starts[group + 1])
            if g_stop == g_start:  # an empty row group: its lists have no length to give a row shape
                group += 1
                continue
            arrays = self._group(group)
            lo, hi = position - g_start, min(stop, g_stop) - g_start
            for n in names:
                parts[n].append(arrays[n][lo:hi])
            position = g_start + hi
            group += 1
        return {n: np.concatenate(p) if len(p) > 1 else np.ascontiguousarray(p[0]) for n, p in parts.items()}

    def close(self) -> None:
        self._cache = None
        self._file.close()


def _column_to_numpy(path: Path, name: str, column: Any) -> np.ndarray:
    """A Parquet column as an array of rows; nested lists become trailing dimensions."""
    import pyarrow as pa

    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    rows = len(array)
    row_shape: list[int] = []
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            raise InputError(f"{path}: column {name!r} has empty (null) cells; every row needs a value")
        offsets = np.asarray(array.offsets) if not pa.types.is_fixed_size_list(array.type) else None
        if offsets is not None:
            lengths = np.diff(offsets)
            if len(lengths) and (lengths != lengths[0]).any():
                bad = int(np.argmax(lengths != lengths[0]))
                raise InputError(
                    f"{path}: column {name!r} has lists of different lengths ({lengths[0]} and "
                    f"{lengths[bad]} in a later row); every row must have the same shape"
                )
            row_shape.append(int(lengths[0]) if len(lengths) else 0)
        else:
            row_shape.append(array.type.list_size)
        array = array.flatten()
    if array.null_count:
        raise InputError(f"{path}: column {name!r} has empty (null) values; every row needs a value")
    values = array.to_numpy(zero_copy_only=False)
    if values.dtype == object:
        raise InputError(f"{path}: column {name!r} is not numeric (type {array.type})")
    # Arrow buffers are read-only; a writable copy per row group lets callers treat every source alike.
    return np.array(values, copy=True).reshape((rows, *row_shape))


class FolderSource:
    """Every ``.npz``/``.npy``/``.parquet``/``.pq`` file of a folder, in name order, one after another."""

    def __init__(self, path: Path, only: Sequence[str] | None = None) -> None:
        self.path = path
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy", ".parquet", ".pq") and p.is_file())
        if not files:
            raise InputError(f"{path}: the folder holds no .npz, .npy or .parquet shards")
        self._parts = [open_file(f, only) for f in files]
        first = self._parts[0]
        for part in self._parts[1:]:
            if set(part.specs) != set(first.specs):
                raise InputError(
                    f"{part.path}: holds arrays {sorted(part.specs)}, but {first.path.name} holds "
                    f"{sorted(first.specs)}; every shard of a folder must hold the same arrays"
                )
            for name, spec in part.specs.items():
                if spec != first.specs[name]:
                    raise InputError(
                        f"{part.path}: array {name!r} is {spec.dtype}{list(spec.row_shape)} per row, but in "
                        f"{first.path.name} it is {first.specs[name].dtype}{list(first.specs[name].row_shape)}"
                    )
        self.specs = dict(first.specs)
        self.ignored: list[str] = list(getattr(first, "ignored", []))
        self._starts = np.cumsum([0] + [p.num_rows for p in self._parts])
        self.num_rows = int(self._starts[-1])

    def rename(self, name: str) -> None:
        for part in self._parts:
            if isinstance(part, NpySource):
                part.rename(name)
        self.specs = dict(self._parts[0].specs)

    def read(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(names if names is not None else self.specs)
        pieces: dict[str, list[np.ndarray]] = {n: [] for n in names}
        index = int(np.searchsorted(self._starts, start, side="right") - 1)
        position = start
        while position < stop:
            p_start = int(self._starts[index])
            p_stop = int(self._starts[index + 1])
            hi = min(stop, p_stop)
            if hi > position:
                for n, a in self._parts[index].read(position - p_start, hi - p_start, names).items():
                    pieces[n].append(a)
            position = hi
            index += 1
        return {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in pieces.items()}

    def close(self) -> None:
        for part in self._parts:
            part.close()


def open_file(path: Path, only: Sequence[str] | None = None) -> InputSource:
    """A source for one file, chosen by its suffix (``only``: the arrays to read; see :class:`NpzSource`)."""
    if path.suffix == ".npy":
        return NpySource(path)
    if path.suffix == ".npz":
        return NpzSource(path, only)
    if path.suffix in (".parquet", ".pq"):
        return ParquetSource(path, only)
    raise InputError(f"{path}: unknown data format {path.suffix!r}; expected .npz, .npy, .parquet or a folder of them")


def open_source(
    path: str | os.PathLike[str], input_names: Sequence[str] = (), *, only: Sequence[str] | None = None
) -> InputSource:
    """Opens input data for reading in slices.

    Args:
        path: An ``.npz``, ``.npy`` or ``.parquet`` file, or a folder of them.
        input_names: The model's input names; a ``.npy`` file (which has no names) takes the
            single one.
        only: Read only these arrays or columns (a model's inputs): the others are never
            opened, so a label array of another length, a scalar, or a text column does not
            stop a run. None (the default) opens all of them (a validation also reads labels).

    Raises:
        InputError: The path is missing, unreadable, of an unknown format, or its arrays
            disagree on the number of samples.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such data file or folder")
    only = list(only) if only is not None else None
    source = FolderSource(path, only) if path.is_dir() else open_file(path, only)
    if isinstance(source, (NpySource, FolderSource)) and "" in source.specs:
        if len(input_names) != 1:
            raise InputError(
                f"{path}: a .npy file holds one unnamed array, but the model has {len(input_names)} inputs "
                f"({', '.join(input_names)}); use an .npz with one array per input name"
            )
        source.rename(input_names[0])
    return source


def iter_slices(num_rows: int, batch_size: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each batch from row ``start`` on."""
    for lo in range(start, num_rows, batch_size):
        yield lo, min(lo + batch_size, num_rows)


class ArraySource:
    """Arrays already in memory (``{name: array}``, first axis = samples), read like a file."""

    def __init__(self, arrays: dict[str, np.ndarray], path: str | os.PathLike[str] = "<arrays>") -> None:
        self.path = Path(path)
        self._arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.num_rows = _check_rows(self.path, {n: a.shape for n, a in self._arrays.items()})
        self.specs = {n: ArraySpec(a.dtype, tuple(a.shape[1:])) for n, a in self._arrays.items()}

    def read(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {n: self._arrays[n][start:stop] for n in (names if names is not None else self.specs)}

    def close(self) -> None:
        pass
