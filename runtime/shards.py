"""Resumable output shards: each shard written atomically, a manifest that says what is done.

An output folder holds ``part-00000.npz`` (or ``.parquet``), ``part-00001.npz``, ... and
``manifest.json``. Every shard holds ``shard_rows`` consecutive rows (the last one fewer), for
each model output an array whose first axis is the rows; when the shard size was chosen for the
run (not given), the last ``shard_rows`` rows or fewer are cut into shards of ``tail_rows``
(a quarter), because the shard after the last batch is written with nothing left to
overlap. A shard is written to a temporary file and renamed into place; only then can the
manifest list it: the manifest lists the committed shards with their row ranges, sizes and
checksums, and is rewritten the same way and flushed to disk, after a shard when the last
rewrite is :data:`MANIFEST_SECONDS` old, after the last shard, and when the run stops early
(Ctrl-C, an error). So at any instant -- a crash, a SIGKILL, Ctrl-C -- the manifest names only
whole shards, and a resumed run starts after the last of them: shard files the manifest does
not name (written just before the kill) are rewritten, never trusted.

A resumed run also checks every committed shard before it trusts it (reading the outputs
back costs far less than computing them): its size, and for ``.npz`` shards the CRC-32 of
every member, which the manifest lists and ``zipfile`` computes while writing (they cover
every byte of every array; damage to the ZIP's own records is found when it stops the arrays
from being read back as written, not in a byte that no reader uses, such as a timestamp); for
Parquet shards, the SHA-256 of the file. From the first
shard that is missing or damaged (a disk error, a file changed by hand) on, the rows are
computed again, and the shards before it are kept. That check is also what survives a power
cut: shard files are not fsynced (the kernel writes them back in its own time), so a power cut
can lose the newest shards' bytes behind a durable manifest, and the resumed run recomputes
them. Syncing each shard cost the runner about 3 % on 50,000 digits rows (+7.6 % against
+5.1 % over a bare loop, 80 shuffled pairs); syncing the manifest made no difference there.
Until format 2 the manifest kept a SHA-256 for ``.npz`` shards too: hashing cost 0.65 ms of
CPU per MB here, about a quarter of writing a shard, and the CRC-32s come free.

Shards are byte-for-byte reproducible: ``.npz`` shards are written with a fixed zip timestamp
(``numpy.savez`` stamps the current time), and shard boundaries depend only on ``batch_size``
and ``shard_rows`` (and ``tail_rows``), which the manifest keeps. A resumed run therefore writes the same files
as an uninterrupted one.

The manifest also records a fingerprint of the model and the input (path, size, modification
time, and a hash of the model file's first MiB; the size and modification time of each
external-data file the model names); resuming with a different model or input is
refused instead of mixing outputs of two runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from onnxpress.atomic import atomic_open, publish
from onnxpress.errors import InputError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "onnxpress-run/2"
#: Manifests a resumed run still reads: format 1 kept a SHA-256 for every shard, ``.npz`` ones included.
READABLE_FORMATS = ("onnxpress-run/1", MANIFEST_FORMAT)
#: When the caller does not choose ``shard_rows``, a run's output is cut into about this many
#: shards, each between the two sizes below. The last shard is written after the last batch,
#: with nothing left to overlap it, so it should be a small part of the run; the others are
#: written while the next batches compute. Each shard costs file creations and (at most once
#: per :data:`MANIFEST_SECONDS`) a synced manifest rewrite besides its bytes, which a model doing
#: little work per output byte notices: 4 MiB shards cut the runner's overhead on a 1 GB
#: input with 16 MiB of outputs from +33 % to +20 % against 1 MiB ones (each shard then
#: rewrote the manifest).
SHARDS_PER_RUN = 64
MIN_SHARD_BYTES = 4 * 1024**2
#: The final stretch of a run (the last ``shard_rows`` rows or fewer) is cut into this many
#: shards when the shard size is the default, so the shard written after the last batch holds
#: a quarter of them (on the digits CNN that tail was ~20 ms of a 1.1 s run). Sixteenths made
#: that last write shorter but cost more in the extra shards: on 50,000 digits rows (0.2 s,
#: 80 shuffled pairs) the overhead went from +5.1 % to +13.1 %.
TAIL_PIECES = 4
MAX_SHARD_BYTES = 64 * 1024**2
#: The manifest is rewritten after a shard only when the last rewrite is this old (and always
#: after the last shard, and on :meth:`ShardWriter.close`): a kill loses at most this much
#: written work, which the resumed run recomputes. A shard is 1/64 of a run, so only runs
#: shorter than about a minute write shards faster than this. A rewrite costs about 0.6 ms of
#: CPU and 1.2 ms of waiting for the disk here, which a short run paid after every shard.
MANIFEST_SECONDS = 1.0


def default_shard_rows(row_bytes: int, total_rows: int, batch_size: int) -> int:
    """Rows per shard: about ``1/SHARDS_PER_RUN`` of the output, whole batches, 4 to 64 MiB."""
    target = min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, row_bytes * total_rows // SHARDS_PER_RUN))
    return batch_size * max(1, target // max(1, row_bytes * batch_size))
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _file_fingerprint(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"path": str(path)}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return {"path": str(path.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_first_mib": head}


#: Models up to this size are parsed (without their weights) to find their external-data files.
_EXTERNAL_SCAN_BYTES = 256 * 1024**2


def _external_data_fingerprint(model: Path) -> list[list[Any]]:
    """``[name, bytes, mtime_ns]`` of each external-data file an ``.onnx`` model names.

    The weights of such a model live beside it, so a resumed run must check them too: the
    model file alone can stay the same while its ``.onnx.data`` is replaced. The graph is
    parsed without its weights; very large model files are not scanned.
    """
    if not model.is_file() or model.stat().st_size > _EXTERNAL_SCAN_BYTES:
        return []
    from onnxpress.external_data import external_data_files

    out = []
    for location in external_data_files(model):
        path = model.parent / location
        stat = path.stat() if path.is_file() else None
        out.append([location, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    return out


def run_fingerprint(model: Path, data: Path, rows: int, batch_size: int) -> dict[str, Any]:
    """What a resumed run must match: the model file (and its external data), the input, its rows and the batch size."""
    model_print = _file_fingerprint(model)
    external = _external_data_fingerprint(model)
    if external:
        model_print["external_data"] = external
    return {"model": model_print, "input": _file_fingerprint(data), "rows": rows, "batch_size": batch_size}


class _StreamWriter:
    """A write-only, unseekable file view that counts what passes through it, and can hash it.

    Writers that would seek back (``zipfile`` patches each member's local header) write a
    data descriptor after the member instead, so the file is written in one pass and its
    size (and, for Parquet shards, its SHA-256) comes without reading the file back.
    """

    def __init__(self, f: IO[bytes], *, sha256: bool = False) -> None:
        self._f = f
        self._hasher = hashlib.sha256() if sha256 else None
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self._f.write(view)
        if self._hasher is not None:
            self._hasher.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        assert self._hasher is not None
        return self._hasher.hexdigest()


#: Small row blocks (one per batch) are gathered into a reused buffer of this size and written
#: a MiB at a time: one CRC-32 update and system call per MiB rather than per batch, and no
#: array of the whole shard (whose fresh pages cost about as much as copying into them).
GATHER_BYTES = 1 << 20


def write_npz(
    f: IO[bytes], arrays: Mapping[str, np.ndarray | Sequence[np.ndarray]], *, scratch: bytearray | None = None
) -> dict[str, int]:
    """An uncompressed ``.npz`` (loadable by ``numpy.load``) with a fixed timestamp, so it is reproducible.

    Args:
        f: Where to write (written in one pass; no seek).
        arrays: ``{name: array}``, or ``{name: [block, ...]}``: blocks of rows alike in dtype
            and row shape, stored as their concatenation along the first axis.
        scratch: A buffer to gather small blocks in (:data:`GATHER_BYTES` are allocated when
            None); a caller writing many files passes the same one, whose pages are warm.

    Returns:
        ``{member name: CRC-32}``, the checksums ``zipfile`` computed while writing.

    Numeric arrays are written from their own memory (``numpy.lib.format.write_array`` would
    copy them in 16 MiB pieces when the target is not a real file).
    """
    gather = memoryview(scratch if scratch is not None else bytearray(GATHER_BYTES))
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            blocks = [np.asarray(b, order="C") for b in (value if isinstance(value, (list, tuple)) else [value])]
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            with archive.open(info, "w", force_zip64=True) as member:
                first = blocks[0]
                if first.dtype.hasobject:  # refused with numpy's own message
                    np.lib.format.write_array(member, np.concatenate(blocks), allow_pickle=False)
                    continue
                shape = (sum(len(b) for b in blocks), *first.shape[1:]) if first.ndim else ()
                header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False, "shape": shape}
                try:
                    np.lib.format.write_array_header_1_0(member, header)
                except ValueError:  # a header over 64 KiB (very many dimensions)
                    np.lib.format.write_array_header_2_0(member, header)
                _write_blocks(member, blocks, gather)
        return {info.filename: info.CRC for info in archive.infolist()}


def _write_blocks(out: IO[bytes], blocks: Sequence[np.ndarray], gather: memoryview) -> None:
    """Writes C-contiguous arrays' bytes back to back, in order; those under half of ``gather`` are gathered there first."""
    fill = 0
    for block in blocks:
        data = memoryview(block.reshape(-1).view(np.uint8))
        size = data.nbytes
        if fill and (fill + size > len(gather) or 2 * size > len(gather)):  # what is gathered goes first
            out.write(gather[:fill])
            fill = 0
        if 2 * size > len(gather):
            out.write(data)
        elif size:
            gather[fill:fill + size] = data
            fill += size
    if fill:
        out.write(gather[:fill])


def write_parquet(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """A Parquet file, one column per output; rows of more than one element become fixed-size lists.

    Rows of no elements (an output of shape ``[N, 0]``) become empty lists, which Arrow's
    fixed-size lists cannot be.

    Each column's per-row shape is kept in the schema metadata (``onnxpress.shapes``) so
    :func:`read_outputs` can restore the arrays.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    shapes = {}
    for name, array in arrays.items():
        shapes[name] = list(array.shape[1:])
        flat = np.ascontiguousarray(array).reshape(len(array), -1)
        if array.ndim == 1:
            columns[name] = pa.array(array)
        elif flat.shape[1] == 0:  # Arrow has no fixed-size list of size 0: empty variable lists
            columns[name] = pa.ListArray.from_arrays(pa.array(np.zeros(len(array) + 1, np.int32)),
                                                     pa.array(flat.reshape(-1)))
        else:
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    table = pa.table(columns).replace_schema_metadata({"onnxpress.shapes": json.dumps(shapes)})
    pq.write_table(table, f)


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    shapes = json.loads((table.schema.metadata or {}).get(b"onnxpress.shapes", b"{}"))
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        shape = shapes.get(name, [])
        if shape:
            values = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = values.reshape((len(column), *shape))
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as JSON, one top-level key and one shard per line.

    Each piece goes through json's C encoder: with ``indent`` json falls back to its pure-Python
    encoder, which took about 1 ms per rewrite of a 60-shard manifest (a rewrite follows every
    shard, so a run of n shards paid O(n^2)).
    """
    lines = []
    for key, value in manifest.items():
        if key == "shards" and value:
            value_text = "[\n  " + ",\n  ".join(json.dumps(shard) for shard in value) + "\n ]"
        else:
            value_text = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {value_text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


@dataclass
class ShardWriter:
    """Buffers whole batches and commits them as shards; see the module docstring.

    Use :meth:`open`, then :meth:`add` per batch and :meth:`finish` at the end (or
    :meth:`close` when stopping early). Shards are written by one background thread, in order.
    """

    folder: Path
    manifest: dict[str, Any]
    #: Per output, the batches not yet handed to the writer thread (set up by the first :meth:`add`).
    buffer: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _parts: list[list[np.ndarray]] = field(default_factory=list)
    buffered_rows: int = 0
    _queued_rows: int | None = None
    #: Rows of the next shard to commit (worked out once per shard, not per batch; none before the first batch).
    _next_commit: float = math.inf
    _queued_shards: int | None = None
    _executor: ThreadPoolExecutor | None = None
    _pending: Future[None] | None = None
    _last_submitted: Future[None] | None = None
    #: The writer thread's buffer for :func:`write_npz` (allocated on its first shard).
    _gather: bytearray | None = None
    #: When the manifest was last rewritten (``time.monotonic``), and whether shards were written since.
    _manifest_time: float = -math.inf
    _manifest_stale: bool = False
    #: With ``force``: where the earlier run's outputs wait until this run completes.
    replaced: Path | None = None

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def rows_done(self) -> int:
        return self.shards[-1]["stop"] if self.shards else 0

    @classmethod
    def open(
        cls,
        folder: Path,
        *,
        fingerprint: dict[str, Any],
        resume: bool,
        force: bool,
        output_format: str,
        batch_size: int,
        shard_rows: int | None,
        total_rows: int,
    ) -> ShardWriter:
        """Starts a new output folder or, with ``resume``, continues the one there.

        Raises:
            InputError: The folder holds other files and neither ``resume`` nor ``force`` was
                given; or the run there was started with another model, input or batch size.
        """
        if output_format not in ("npz", "parquet"):
            raise InputError(f"output format {output_format!r}: expected 'npz' or 'parquet'")
        if shard_rows is not None:
            if shard_rows < 1:
                raise InputError(f"shard rows must be at least 1, got {shard_rows}")
            shard_rows = -(-shard_rows // batch_size) * batch_size
        manifest_path = folder / MANIFEST
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder; outputs go to a folder of shards")
        if not folder.parent.is_dir():
            raise InputError(f"{folder}: the parent folder {folder.parent} does not exist")
        existing = manifest_path.is_file()
        if existing and resume:
            manifest = json.loads(manifest_path.read_text())
            writer = cls(folder, manifest)
            writer._check_resume(fingerprint, shard_rows)
            return writer
        if resume and folder.is_dir() and not existing:
            # killed before the first manifest was written: only our temporary files can be there
            for path in folder.iterdir():
                if path.name.startswith((".manifest", ".part-", "part-")):
                    path.unlink()
        replaced = None
        if folder.exists() and any(folder.iterdir()):
            if force:
                replaced = cls._set_aside(folder)
            elif existing:
                raise InputError(
                    f"{folder}: holds the outputs of an earlier run; pass --resume to continue it "
                    "or --force to replace it"
                )
            else:
                raise InputError(f"{folder}: the folder is not empty; choose an empty or new folder (or --force)")
        folder.mkdir(exist_ok=True)
        manifest = {
            "format": MANIFEST_FORMAT,
            "fingerprint": fingerprint,
            "output_format": output_format,
            "batch_size": batch_size,
            "shard_rows": shard_rows,
            "tail_rows": None,
            "total_rows": total_rows,
            "outputs": {},
            "shards": [],
            "complete": False,
        }
        writer = cls(folder, manifest, replaced=replaced)
        writer._write_manifest(sync=False)  # commits nothing yet: no need to wait for the disk
        return writer

    @staticmethod
    def _ours(folder: Path) -> list[Path]:
        """What a run writes in ``folder`` (manifest, shards, temporaries); anything else is refused."""
        ours = [p for p in folder.iterdir() if p.name == MANIFEST or p.name.startswith(("part-", ".part-", ".manifest"))]
        others = [p.name for p in folder.iterdir() if p not in ours]
        if others:
            raise InputError(f"{folder}: holds files no run wrote ({', '.join(sorted(others)[:3])}); not replacing it")
        return ours

    @classmethod
    def _set_aside(cls, folder: Path) -> Path | None:
        """``--force``: moves an earlier run's outputs beside the folder until the new run completes.

        Nothing is lost when the new run fails: :meth:`restore` puts them back, and after a
        kill they are still in ``.NAME.replaced`` (removed when a run in the folder completes).
        A folder set aside by an earlier forced run that never completed is kept as it is (it
        holds the last complete outputs); the partial outputs in ``folder`` are removed.
        """
        ours = cls._ours(folder)
        aside = replaced_path(folder)
        if aside.exists():
            for path in ours:
                path.unlink()
            return None
        folder.rename(aside)
        folder.mkdir()
        logger.info("the earlier outputs in %s wait in %s until this run completes", folder, aside)
        return aside

    def restore(self) -> None:
        """Undoes a forced replacement after a failure: this run's files go, the earlier outputs come back."""
        if self.replaced is None or not self.replaced.is_dir():
            return
        for path in self._ours(self.folder):
            path.unlink()
        self.folder.rmdir()
        self.replaced.rename(self.folder)
        logger.info("put the earlier outputs back in %s", self.folder)
        self.replaced = None

    def _check_resume(self, fingerprint: dict[str, Any], shard_rows: int | None) -> None:
        m = self.manifest
        if m.get("format") not in READABLE_FORMATS:
            raise InputError(f"{self.folder / MANIFEST}: not an onnxpress run manifest")
        m["format"] = MANIFEST_FORMAT  # the shards added now are listed with their CRC-32
        old = m["fingerprint"]
        for key, what in (("model", "model"), ("input", "input data"), ("rows", "number of input rows"),
                          ("batch_size", "batch size")):
            if old.get(key) != fingerprint.get(key):
                raise InputError(
                    f"{self.folder}: the run there used another {what} ({old.get(key)} vs now {fingerprint.get(key)}); "
                    "resume with the same model, data and --batch-size, or use --force to start over"
                )
        if shard_rows is not None and m["shard_rows"] is not None and shard_rows != m["shard_rows"]:
            logger.warning("resuming with the run's %d rows per shard (not %d)", m["shard_rows"], shard_rows)
        if m["shards"]:
            logger.info("checking the checksums of %d committed shards (%.1f MB) before resuming",
                        len(m["shards"]), sum(s["bytes"] for s in m["shards"]) / 1e6)
        for kept, shard in enumerate(m["shards"]):
            problem = _shard_problem(self.folder / shard["file"], shard)
            if problem is not None:
                logger.warning(
                    "%s: %s; recomputing from row %d (%d of %d committed shards are intact)",
                    self.folder / shard["file"], problem, shard["start"], kept, len(m["shards"]),
                )
                del m["shards"][kept:]
                m["complete"] = False
                break
        named = {s["file"] for s in m["shards"]} | {MANIFEST}
        for path in self.folder.iterdir():
            if path.name not in named and path.name.startswith(("part-", ".part-", ".manifest")):
                logger.info("removing %s, written after the last committed shard", path.name)
                path.unlink()

    def _write_manifest(self, *, sync: bool = True) -> None:
        with atomic_open(self.folder / MANIFEST, "wb", sync=sync) as f:
            f.write(manifest_text(self.manifest).encode())
        self._manifest_stale = False
        self._manifest_time = time.monotonic()

    def add(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Adds one batch of outputs (each array's first axis = rows); commits full shards.

        Raises:
            ValueError: The outputs are named otherwise than the first batch's.
        """
        if not self.buffer:
            self._start(outputs)
        elif outputs.keys() != self.buffer.keys():
            raise ValueError(f"outputs {sorted(outputs)} differ from the first batch's {sorted(self.buffer)}")
        self.add_values([outputs[name] for name in self.buffer], len(next(iter(outputs.values()))))

    def add_values(self, values: Sequence[np.ndarray], rows: int) -> None:
        """:meth:`add` for every batch after the first, without names: ``values`` in the first batch's order.

        The runner's loop calls this once per batch, so it does only what must be done per batch.
        """
        for parts, value in zip(self._parts, values, strict=True):
            parts.append(value)
        self.buffered_rows += rows
        while self.buffered_rows >= self._next_commit:
            self._commit(self._next_commit)
            self._next_commit = self._shard_size(self._next_start())

    def _start(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Sets up for the run's outputs at its first batch: shard sizes, the outputs' rows, the buffers."""
        if self.manifest["shard_rows"] is None:
            row_bytes = sum(a.nbytes // max(1, len(a)) for a in outputs.values())
            batch = self.manifest["batch_size"]
            self.manifest["shard_rows"] = default_shard_rows(row_bytes, self.manifest["total_rows"], batch)
            self.manifest["tail_rows"] = max(batch, self.manifest["shard_rows"] // TAIL_PIECES // batch * batch)
        if not self.manifest["outputs"]:
            self.manifest["outputs"] = {n: {"dtype": str(a.dtype), "row_shape": list(a.shape[1:])} for n, a in outputs.items()}
        self.buffer = {name: [] for name in outputs}
        self._parts = list(self.buffer.values())
        self._next_commit = self._shard_size(self._next_start())

    def _next_start(self) -> int:
        """The first row of the next shard to commit."""
        return self._queued_rows if self._queued_rows is not None else self.rows_done

    def _shard_size(self, start: int) -> int:
        """Rows of the shard that starts at ``start``: ``shard_rows``, or ``tail_rows`` in the final stretch."""
        rows = self.manifest["shard_rows"]
        tail = self.manifest.get("tail_rows") or rows  # manifests written before tail_rows existed
        return tail if self.manifest["total_rows"] - start <= rows else rows

    def _commit(self, rows: int) -> None:
        """Hands the first ``rows`` buffered rows to the writer thread as the next shard.

        One shard is written while the next one fills: the thread's work (copying, CRC-32,
        the disk) releases the GIL, so onnxruntime keeps running meanwhile. At most
        one shard waits, which bounds memory at two shards.
        """
        shard: dict[str, list[np.ndarray]] = {}
        for name, parts in self.buffer.items():  # the lists stay (add_values holds them), emptied in place
            taken, need = [], rows
            for i, part in enumerate(parts):
                if need >= len(part):
                    taken.append(part)
                    need -= len(part)
                    if need == 0:
                        del parts[:i + 1]
                        break
                else:
                    taken.append(part[:need])
                    parts[:i + 1] = [part[need:]]
                    break
            else:
                parts.clear()
            shard[name] = taken
        self.buffered_rows -= rows
        start = self._next_start()
        self._queued_rows = start + rows
        index = self._queued_shards if self._queued_shards is not None else len(self.shards)
        self._queued_shards = index + 1
        self._wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxpress-shards")
        self._pending = self._last_submitted = self._executor.submit(self._write_shard, shard, index, start, rows)

    def _write_shard(self, parts: dict[str, list[np.ndarray]], index: int, start: int, rows: int) -> None:
        fmt = self.manifest["output_format"]
        name = f"part-{index:05d}.{fmt}"
        entry: dict[str, Any] = {"file": name, "start": start, "stop": start + rows}
        # not synced: the manifest is, and a resumed run checks every shard it lists (module docstring)
        with atomic_open(self.folder / name, "wb") as f:
            out = _StreamWriter(f, sha256=fmt != "npz")
            if fmt == "npz":  # the batches' blocks are written one after the other, not joined first
                if self._gather is None:
                    self._gather = bytearray(GATHER_BYTES)
                crcs = write_npz(out, parts, scratch=self._gather)  # type: ignore[arg-type]
            else:
                write_parquet(out, {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in parts.items()})  # type: ignore[arg-type]
            out.flush()
        entry["bytes"] = out.size
        if fmt == "npz":
            entry["crc32"] = crcs
        else:
            entry["sha256"] = out.hexdigest()
        self.shards.append(entry)
        if start + rows == self.manifest["total_rows"]:
            self.manifest["complete"] = True
        if self.manifest["complete"] or time.monotonic() - self._manifest_time >= MANIFEST_SECONDS:
            self._write_manifest()
            logger.debug("committed %s (rows %d-%d)", name, start, start + rows)
        else:  # listed by the next rewrite (close() makes one)
            self._manifest_stale = True

    def _wait(self) -> None:
        """Waits for the shard being written; its error, if any, is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Waits for the shard in flight, lists every written shard in the manifest and stops the writer thread."""
        try:
            self._wait()
            if self._manifest_stale:
                try:
                    self._write_manifest()
                except OSError as exc:  # a full disk, say: the manifest is only behind, which is safe
                    logger.warning("%s: could not list the last shards written (%s); a resumed run computes "
                                   "them again", self.folder / MANIFEST, exc)
        finally:
            if self._executor is not None:
                # Once the last shard is written the idle thread exits on its own: no need to join it.
                last = self._last_submitted
                self._executor.shutdown(wait=last is None or not last.done())
                self._executor = None

    def finish(self) -> None:
        """Commits the last partial shard and marks the run complete (one manifest write)."""
        if self.buffered_rows:
            self._commit(self.buffered_rows)
        self.close()
        if self.rows_done != self.manifest["total_rows"]:
            raise InputError(
                f"{self.folder}: {self.rows_done} rows written but the input has {self.manifest['total_rows']}"
            )
        if not self.manifest["complete"]:
            self.manifest["complete"] = True
            self._write_manifest()
        aside = replaced_path(self.folder)  # also after a forced run that was killed, then resumed
        if aside.is_dir():
            shutil.rmtree(aside)
        self.replaced = None


def _shard_problem(path: Path, shard: dict[str, Any]) -> str | None:
    """What is wrong with a committed shard file, or None.

    Missing; another size; for ``.npz`` shards, members other than those the manifest lists
    with their CRC-32, or member data that does not match its CRC-32 (every byte is read);
    for Parquet shards (and ``.npz`` shards of manifests before format 2), another SHA-256.
    """
    if not path.is_file():
        return "the committed shard is missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"the committed shard has {size} bytes, the manifest says {shard['bytes']}"
    if "crc32" in shard:
        try:
            with zipfile.ZipFile(path) as archive:
                members = {info.filename: info.CRC for info in archive.infolist()}
                if members != shard["crc32"]:
                    return "the committed shard's members or their CRC-32 differ from the manifest"
                bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            return f"the committed shard is not a readable .npz ({exc})"
        return None if bad is None else f"the committed shard's member {bad!r} does not match its CRC-32"
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != shard["sha256"]:
            return "the committed shard does not match its SHA-256 in the manifest"
    return None


def replaced_path(folder: Path) -> Path:
    """Where ``--force`` keeps the earlier outputs of ``folder`` while it replaces them."""
    return folder.with_name(f".{folder.name}.replaced")


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an output folder.

    Raises:
        InputError: The folder has no manifest.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder}: no {MANIFEST}; not an onnxpress run output")
    return json.loads(path.read_text())


def iter_shards(folder: str | os.PathLike[str], *, verify: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yields each committed shard's outputs in row order (``verify`` checks each against the manifest first)."""
    folder = Path(folder)
    for shard in read_manifest(folder)["shards"]:
        path = folder / shard["file"]
        problem = _shard_problem(path, shard) if verify else None
        if problem is not None:
            raise InputError(f"{path}: {problem}")
        if path.suffix == ".parquet":
            yield _read_parquet(path)
        else:
            with np.load(path, allow_pickle=False) as npz:
                yield {n: npz[n] for n in npz.files}


def read_outputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All outputs of a run (a shard folder or one ``.parquet`` file), concatenated in input order."""
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return _read_parquet(path)
    parts: dict[str, list[np.ndarray]] = {}
    for shard in iter_shards(path):
        for name, array in shard.items():
            parts.setdefault(name, []).append(array)
    return {n: np.concatenate(p) for n, p in parts.items()}


#: Schema metadata key of an assembled Parquet output: the run's fingerprint (JSON), so that
#: ``--resume`` on a finished output can tell it is the same run.
PARQUET_RUN_KEY = b"onnxpress.run"


def parquet_run_fingerprint(path: Path) -> dict[str, Any] | None:
    """The fingerprint :func:`assemble_parquet` stored in a Parquet output (None when there is none)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[PARQUET_RUN_KEY]) if PARQUET_RUN_KEY in metadata else None
    except Exception:  # noqa: BLE001 - not a Parquet file we wrote: no fingerprint
        return None


def assemble_parquet(folder: Path, output: Path, *, force: bool = False) -> None:
    """Joins a complete folder of Parquet shards into one Parquet file (atomically), then removes the folder.

    The run's fingerprint goes into the file's schema metadata (:data:`PARQUET_RUN_KEY`).
    """
    import pyarrow.parquet as pq

    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise InputError(f"{folder}: the run is not complete; resume it first")
    if output.exists() and not force:
        raise InputError(f"{output}: the output already exists; pass --force to replace it")
    for stale in output.parent.glob(f".{output.name}.*.tmp"):  # left by a run killed while assembling
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        writer = None
        for shard in manifest["shards"]:
            table = pq.read_table(folder / shard["file"])
            if writer is None:
                metadata = {**(table.schema.metadata or {}), PARQUET_RUN_KEY: json.dumps(manifest["fingerprint"])}
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(metadata))
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
        if writer is not None:
            writer.close()
        publish(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    shutil.rmtree(folder)
