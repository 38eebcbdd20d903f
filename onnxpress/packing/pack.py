"""Packing an ONNX model into one ``.onnxz`` file.

The model is read as a protobuf ``ModelProto`` (the serialization edge; see
:mod:`onnxpress.packing.format` for why not onnx_ir). Every tensor whose ``raw_data`` is at
least ``min_bytes`` long, and every tensor kept in external data, is cut out of the graph
and coded on its own by :func:`onnxpress.packing.codecs.encode`, which tries the codecs and
keeps the smallest. Identical tensors (same bytes, by sha256) are stored once. Tensors are
coded in a thread pool: zstd and numpy release the GIL, so the threads run in parallel.

External data is read through a memory map, one tensor at a time, so a model larger than
memory is never loaded whole. Before packing, the model is re-serialized once and compared
with the file; when they match (any model written by onnx, onnx_ir or torch), ``unpack``
gives back the file byte for byte, and the manifest records ``byte_exact: true``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import zstandard

from onnxpress import __version__
from onnxpress.atomic import publish
from onnxpress.errors import InputError
from onnxpress.packing import codecs
from onnxpress.packing.format import (
    GRAPH_MEMBER,
    MANIFEST_MEMBER,
    MARKER_KEY,
    MAX_LOCATION_DEPTH,
    ZIP_DATE_TIME,
    Chunk,
    ExternalFile,
    ExternalRef,
    Manifest,
    TensorEntry,
    add_marker,
    dtype_bits,
    dtype_name,
    expected_raw_size,
    external_info,
    is_safe_location,
    iter_tensor_protos,
    temp_prefix,
    tensor_member,
)
from onnxpress.packing.parallel import bounded_map, worker_count

logger = logging.getLogger(__name__)

#: Tensors with fewer raw bytes stay in the graph (which is zstd coded as a whole): a
#: member of its own costs a manifest entry, a ZIP header and a decoding task each.
DEFAULT_MIN_TENSOR_BYTES = 4096

#: Tensors are coded in independent chunks of this many bytes (4 MiB): large enough that
#: zstd's tables and the sparse mask lose nothing, small enough to decode in parallel.
DEFAULT_CHUNK_BYTES = 1 << 22

#: Members this large are written with ZIP64 headers from the start.
ZIP64_MEMBER_BYTES = 1 << 31

#: ``progress(done, total, name)`` after each coded chunk.
ProgressCallback = Callable[[int, int, str], None]


@dataclass
class PackReport:
    """What :func:`pack` did: sizes, codecs chosen, time."""

    source: Path
    output: Path
    source_bytes: int
    packed_bytes: int
    tensors: int
    streams: int
    raw_bytes: int
    coded_bytes: int
    graph_bytes: int
    byte_exact: bool
    seconds: float
    codecs: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Source bytes (model file plus external data) per packed byte."""
        return self.source_bytes / max(self.packed_bytes, 1)


@dataclass
class _Candidate:
    tensor: onnx.TensorProto
    data: memoryview | bytes
    width: int
    external: ExternalRef | None
    sha256: str = ""


def pack(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    level: int = codecs.DEFAULT_LEVEL,
    threads: int | None = None,
    min_bytes: int = DEFAULT_MIN_TENSOR_BYTES,
    force: bool = False,
    progress: ProgressCallback | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PackReport:
    """Packs an ``.onnx`` model (and its external data) into one ``.onnxz`` file.

    Args:
        source: The ``.onnx`` file; external data beside it is read, never changed.
        output: The ``.onnxz`` to write (atomically: a failure leaves nothing behind).
        level: zstd level, 1 (fast) to 22 (smallest).
        threads: Tensors coded at once; all cores when None.
        min_bytes: Tensors smaller than this stay inside the graph member.
        force: Replace an existing output.
        progress: Called after each coded chunk: ``(done, total, tensor name)``.
        chunk_bytes: Tensors are coded in runs of this many bytes (a multiple of 16, at least 1024), each
            on its own, so a large tensor is coded and decoded on all cores at once.

    Returns:
        A :class:`PackReport`.

    Raises:
        InputError: A missing, truncated or non-ONNX input, unsafe external data, an
            existing output without ``force``, or a bad level.
    """
    start = time.perf_counter()
    source, output = Path(source), Path(output)
    if not codecs.MIN_LEVEL <= level <= codecs.MAX_LEVEL:
        raise InputError(f"zstd level {level} is outside {codecs.MIN_LEVEL}..{codecs.MAX_LEVEL}")
    if min_bytes < 0:
        raise InputError(f"min_bytes must be >= 0, got {min_bytes}")
    if chunk_bytes < 1024 or chunk_bytes % 16:
        raise InputError(f"chunk_bytes must be a multiple of 16 and at least 1024, got {chunk_bytes}")
    _check_output(source, output, force)
    data = _read_source(source)
    source_sha = hashlib.sha256(data).hexdigest()
    proto = _parse(source, data)
    byte_exact = proto.SerializeToString() == data
    if not byte_exact:
        logger.warning(
            "%s is not in canonical protobuf form; unpack will restore every tensor, the graph "
            "and the metadata exactly, but not the same byte layout", source
        )
    source_size = len(data)
    del data

    with _ExternalData(source) as external, contextlib.ExitStack() as stack:
        candidates = _collect(source, proto, external, min_bytes)
        for location in external.maps:
            if output.exists() and output.resolve() == (external.base_dir / location).resolve():
                raise InputError(
                    f"{output}: the output is '{location}', external data of the input model "
                    f"{source}; choose another output path"
                )
        external_files = external.describe()
        if any(not f[1] for f in external_files.values()):
            byte_exact = False
        source_size += sum(size for (size, _, _) in external_files.values())
        spool = _Spool(output.parent)
        stack.callback(spool.close)
        entries, streams = _code_all(candidates, level, threads, progress, chunk_bytes, spool)
        for cand in candidates:
            if isinstance(cand.data, memoryview):
                cand.data.release()
        for index, cand in enumerate(candidates):
            if cand.external is None:
                cand.tensor.ClearField("raw_data")
            add_marker(cand.tensor, index)
        graph_raw = proto.SerializeToString()
        graph_coded = zstandard.ZstdCompressor(level=level).compress(graph_raw)
        manifest = Manifest(
            graph_raw_size=len(graph_raw),
            graph_coded_size=len(graph_coded),
            graph_sha256=hashlib.sha256(graph_raw).hexdigest(),
            source_size=source.stat().st_size,
            source_sha256=source_sha,
            byte_exact=byte_exact,
            tensors=entries,
            external_files=[
                ExternalFile(location, size, sha)
                for location, (size, _, sha) in sorted(external_files.items())
            ],
            producer=f"onnxpress {__version__}",
            level=level,
        )
        _write(output, manifest, graph_coded, streams, spool)
    packed_bytes = output.stat().st_size
    report = PackReport(
        source=source,
        output=output,
        source_bytes=source_size,
        packed_bytes=packed_bytes,
        tensors=len(entries),
        streams=len(streams),
        raw_bytes=sum(e.raw_size for e in entries),
        coded_bytes=sum(length for spans in streams.values() for _, length in spans),
        graph_bytes=len(graph_coded),
        byte_exact=byte_exact,
        seconds=time.perf_counter() - start,
        codecs=dict(Counter(e.codec for e in entries)),
    )
    logger.info(
        "Packed %s into %s: %d tensors (%d streams), %d -> %d bytes (%.2fx) in %.2fs",
        source, output, report.tensors, report.streams, report.source_bytes,
        report.packed_bytes, report.ratio, report.seconds,
    )
    return report


def _check_output(source: Path, output: Path, force: bool) -> None:
    if not source.is_file():
        raise InputError(f"{source}: no such file")
    if output.exists() and output.resolve() == source.resolve():
        raise InputError(f"{output}: the output is the input model; choose another output path")
    if output.is_dir():
        raise InputError(f"{output}: the output is a folder; expected the path of an .onnxz file")
    if output.exists() and not force:
        raise InputError(f"{output}: the output already exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise InputError(f"{output}: the output folder {output.parent} does not exist")


def _read_source(source: Path) -> bytes:
    data = source.read_bytes()
    if not data:
        raise InputError(f"{source}: the file is empty, expected an ONNX model")
    if data[:4] == b"PK\x03\x04":
        raise InputError(f"{source}: this is already a packed .onnxz container; unpack it first")
    return data


def _parse(source: Path, data: bytes) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except google.protobuf.message.DecodeError as exc:
        raise InputError(f"{source}: not a readable ONNX model (truncated or not ONNX): {exc}") from exc
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InputError(f"{source}: not an ONNX model (it has no graph or no IR version)")
    return proto


class _ExternalData:
    """Memory-maps the external-data files a model names, after checking each is safe."""

    def __init__(self, source: Path) -> None:
        self.source = source
        # the folder the path names, as onnx and onnxruntime use (not a symlinked file's target folder)
        self.base_dir = source.absolute().parent
        self.maps: dict[str, mmap.mmap | bytes] = {}
        self.spans: dict[str, list[tuple[int, int]]] = {}

    def __enter__(self) -> _ExternalData:
        return self

    def __exit__(self, *exc: object) -> None:
        for view in self.maps.values():
            if isinstance(view, mmap.mmap):
                with contextlib.suppress(BufferError):  # a view is still alive: GC closes it
                    view.close()
        self.maps.clear()

    def read(self, tensor: onnx.TensorProto, location: str, offset: int, length: int) -> memoryview:
        if not is_safe_location(location):
            raise InputError(
                f"{self.source}: tensor '{tensor.name}' names external data at {location!r}; "
                "onnxz packs only external data inside the model's folder: a relative path "
                f"of at most {MAX_LOCATION_DEPTH} names joined by '/', with no '..', '.', "
                "absolute path or backslash"
            )
        path = self.base_dir / location
        if location not in self.maps:
            parts = location.split("/")
            for depth in range(1, len(parts) + 1):  # no symlink may lead out of the folder
                if (self.base_dir.joinpath(*parts[:depth])).is_symlink():
                    raise InputError(
                        f"{self.source}: tensor '{tensor.name}' needs external data file "
                        f"'{location}', but '{'/'.join(parts[:depth])}' is a symlink; onnxz "
                        "reads external data only from regular files inside the model's folder"
                    )
            if not path.is_file():
                raise InputError(
                    f"{self.source}: tensor '{tensor.name}' needs external data file "
                    f"'{location}', which is not a regular file in {self.base_dir}"
                )
            try:
                self.maps[location] = _map_file(path)
            except OSError as exc:
                limit = ""
                if exc.errno == errno.EMFILE:
                    limit = f" (the limit on open files is {_open_file_limit()}; raise it with ulimit -n)"
                raise InputError(
                    f"{self.source}: tensor '{tensor.name}' needs external data file "
                    f"'{location}', which cannot be opened: {exc.strerror}{limit}"
                ) from exc
            self.spans[location] = []
        view = self.maps[location]
        if offset + length > len(view):
            raise InputError(
                f"{self.source}: tensor '{tensor.name}' needs bytes up to {offset + length} of "
                f"'{location}', but that file has only {len(view)} bytes (truncated?)"
            )
        self.spans[location].append((offset, offset + length))
        return memoryview(view)[offset : offset + length]

    def describe(self) -> dict[str, tuple[int, bool, str]]:
        """Per file: size, whether every byte outside the tensors is zero, sha256."""
        out = {}
        for location, view in self.maps.items():
            digest = hashlib.sha256()
            mv = memoryview(view)
            for pos in range(0, len(mv), 1 << 24):
                digest.update(mv[pos : pos + (1 << 24)])
            gaps_zero = True
            cursor = 0
            for begin, end in sorted(self.spans[location]):
                if begin > cursor and np.frombuffer(mv[cursor:begin], np.uint8).any():
                    gaps_zero = False
                cursor = max(cursor, end)
            if cursor < len(mv) and np.frombuffer(mv[cursor:], np.uint8).any():
                gaps_zero = False
            del mv
            out[location] = (len(view), gaps_zero, digest.hexdigest())
        return out


def _map_file(path: Path) -> mmap.mmap | bytes:
    """The file memory-mapped (its own file handle is closed at once: a map holds one file
    descriptor, not two). When the process runs out of file descriptors (a model saved
    with one file per tensor has thousands), the soft limit is raised to the hard one and
    the file tried again."""
    for attempt in range(2):
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as exc:
            if exc.errno != errno.EMFILE or attempt or not _raise_open_file_limit():
                raise
    raise AssertionError("unreachable")


def _open_file_limit() -> int | str:
    try:
        import resource
    except ImportError:  # not on Windows
        return "unknown"
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _raise_open_file_limit() -> bool:
    """Raises this process's soft limit on open files to its hard limit; True if it grew."""
    try:
        import resource
    except ImportError:
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target <= soft:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return False
    logger.info("Raised the limit on open files from %d to %d (external data in many files)", soft, target)
    return True


def _collect(
    source: Path, proto: onnx.ModelProto, external: _ExternalData, min_bytes: int
) -> list[_Candidate]:
    """The tensors to cut out of the graph: large inline ones and every external one."""
    candidates = []
    for tensor in iter_tensor_protos(proto):
        if any(e.key == MARKER_KEY for e in tensor.external_data):
            raise InputError(
                f"{source}: tensor '{tensor.name}' already carries an '{MARKER_KEY}' entry; "
                "this model was not written by onnx"
            )
        shape = list(tensor.dims)
        expected = expected_raw_size(tensor.data_type, shape)
        bits = dtype_bits(tensor.data_type) or 8
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = external_info(tensor)
            if expected is None:
                raise InputError(
                    f"{source}: tensor '{tensor.name}' of type {dtype_name(tensor.data_type)} "
                    "is in external data; onnxz cannot pack that type externally"
                )
            try:
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else expected
            except ValueError as exc:
                raise InputError(f"{source}: tensor '{tensor.name}' has a bad external offset or length") from exc
            if length != expected:
                raise InputError(
                    f"{source}: tensor '{tensor.name}' declares {length} external bytes, but "
                    f"{dtype_name(tensor.data_type)} {shape} holds {expected}"
                )
            location = info.get("location", "")
            data = external.read(tensor, location, offset, length)
            ref = ExternalRef(location, offset, length)
            candidates.append(_Candidate(tensor, data, codecs.group_width(bits), ref))
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= max(min_bytes, 1):
            if len(tensor.raw_data) != expected:
                logger.warning(
                    "Tensor '%s' has %d raw bytes where %s %s needs %s; left in the graph",
                    tensor.name, len(tensor.raw_data), dtype_name(tensor.data_type), shape, expected,
                )
                continue
            candidates.append(_Candidate(tensor, tensor.raw_data, codecs.group_width(bits), None))
    return candidates


class _Spool:
    """Coded chunks parked in a temporary file, so packing a model larger than memory holds
    only the chunks being coded, never every coded stream at once."""

    def __init__(self, folder: Path) -> None:
        self.handle = tempfile.TemporaryFile(prefix=".onnxz-spool-", dir=folder)  # noqa: SIM115
        self.size = 0

    def put(self, data: bytes) -> tuple[int, int]:
        self.handle.seek(self.size)
        self.handle.write(data)
        span = (self.size, len(data))
        self.size += len(data)
        return span

    def copy(self, spans: list[tuple[int, int]], out: object) -> None:
        for offset, length in spans:
            self.handle.seek(offset)
            remaining = length
            while remaining:
                block = self.handle.read(min(remaining, 1 << 24))
                out.write(block)  # type: ignore[attr-defined]
                remaining -= len(block)

    def close(self) -> None:
        self.handle.close()


def _code_all(
    candidates: list[_Candidate],
    level: int,
    threads: int | None,
    progress: ProgressCallback | None,
    chunk_bytes: int,
    spool: _Spool,
) -> tuple[list[TensorEntry], dict[str, list[tuple[int, int]]]]:
    """Hashes and codes every distinct tensor, chunk by chunk, in a thread pool.

    Each chunk of ``chunk_bytes`` (the last one shorter) is coded on its own with the best
    codec for it, so one large tensor keeps every core busy when it is packed and unpacked.
    At most a few chunks per thread are in flight; finished ones go to ``spool``.

    Returns:
        The manifest entries, and per member the spool spans of its chunks, in order.
    """
    workers = worker_count(threads)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda c: hashlib.sha256(c.data).hexdigest(), candidates))
        first: dict[tuple[str, int], int] = {}
        for index, (cand, digest) in enumerate(zip(candidates, digests, strict=True)):
            cand.sha256 = digest
            first.setdefault((digest, len(cand.data)), index)
        unique = sorted(set(first.values()))
        jobs = [
            (i, start)
            for i in unique
            for start in range(0, len(candidates[i].data), chunk_bytes)
        ]

        def code(job: tuple[int, int]) -> tuple[codecs.Encoded, str]:
            i, start = job
            data = memoryview(candidates[i].data).cast("B")[start : start + chunk_bytes]
            return _encode_chunk(data, candidates[i].width, level)

        coded: dict[tuple[int, int], tuple[Chunk, tuple[int, int]]] = {}
        for done, (job, (encoded, digest)) in enumerate(
            zip(jobs, bounded_map(pool, code, jobs, 4 * workers), strict=True), start=1
        ):
            i, start = job
            size = min(chunk_bytes, len(candidates[i].data) - start)
            chunk = Chunk(encoded.codec, encoded.params, size, len(encoded.data), digest)
            coded[job] = (chunk, spool.put(encoded.data))
            if progress is not None:
                progress(done, len(jobs), candidates[i].tensor.name)
    entries = []
    streams: dict[str, list[tuple[int, int]]] = {}
    for index, cand in enumerate(candidates):
        owner = first[(cand.sha256, len(cand.data))]
        parts = [coded[(owner, start)] for start in range(0, len(cand.data), chunk_bytes)]
        member = tensor_member(owner)
        streams[member] = [span for _, span in parts]
        entries.append(
            TensorEntry(
                name=cand.tensor.name,
                dtype=dtype_name(cand.tensor.data_type),
                shape=list(cand.tensor.dims),
                raw_size=len(cand.data),
                coded_size=sum(chunk.coded_size for chunk, _ in parts),
                sha256=cand.sha256,
                member=member,
                chunks=[chunk for chunk, _ in parts],
                external=cand.external,
            )
        )
    return entries, streams


def _encode_chunk(data: memoryview, width: int, level: int) -> tuple[codecs.Encoded, str]:
    """One chunk coded with its best codec, and the sha256 of its raw bytes."""
    return codecs.encode(data, width, level), hashlib.sha256(data).hexdigest()


def _write(
    output: Path,
    manifest: Manifest,
    graph: bytes,
    streams: dict[str, list[tuple[int, int]]],
    spool: _Spool,
) -> None:
    """Writes the ZIP of stored members into a temporary file and renames it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(output.name), dir=output.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(
            handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True
        ) as archive:
            for name, payload in [(MANIFEST_MEMBER, manifest.to_json()), (GRAPH_MEMBER, graph)]:
                archive.writestr(zipfile.ZipInfo(name, ZIP_DATE_TIME), payload)
            for name in sorted(streams):
                size = sum(length for _, length in streams[name])
                info = zipfile.ZipInfo(name, ZIP_DATE_TIME)
                info.file_size = size
                with archive.open(info, "w", force_zip64=size >= ZIP64_MEMBER_BYTES) as member:
                    spool.copy(streams[name], member)
        publish(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
