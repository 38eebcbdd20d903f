"""Reading ``.onnxz`` containers: unpacking to ``.onnx`` and decoding in memory for sessions.

Reading is defensive, because a container may come from anywhere:

* the manifest is parsed and every field type-checked, and every declared size is checked
  against the dtype and shape and against :class:`~onnxpress.packing.limits.Limits` before
  a byte is decoded; each decoder is capped at the declared size (no decompression bombs);
* every decoded tensor's sha256 is compared with the manifest, and the whole unpacked file
  with the source's sha256 when the container says the round trip is byte-exact;
* member names are looked up inside the ZIP and never joined to a folder; the only name
  that reaches the disk, an external-data file name, must be a safe relative path (no
  ``..``, no absolute path), and unpack creates its folders only under the output's
  folder, never through a symlink;
* a truncated or corrupt container is reported with the tensor it breaks.

Models whose tensors fit in one protobuf (< 2 GB) are rebuilt in memory and handed to
onnxruntime as bytes, with no temporary file. Larger ones are streamed, one tensor at a
time, into an external-data file in a temporary folder that is removed once onnxruntime has
built its session.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import mmap
import os
import stat
import struct
import sys
import tempfile
import threading
import time
import weakref
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import google.protobuf.message
import numpy as np
import onnx
import onnxruntime as ort

from onnxpress.atomic import publish
from onnxpress.errors import InputError
from onnxpress.packing import codecs
from onnxpress.packing.format import (
    GRAPH_MEMBER,
    MANIFEST_MEMBER,
    SUFFIX,
    ZIP_MAGIC,
    Manifest,
    TensorEntry,
    dtype_name,
    external_info,
    has_marker,
    is_safe_location,
    iter_tensor_protos,
    marker_index,
    pop_marker,
    temp_prefix,
)
from onnxpress.packing.limits import DEFAULT_LIMITS, Limits
from onnxpress.packing.parallel import bounded_map, decoding_pool, worker_count

if TYPE_CHECKING:
    import onnx_ir as ir

logger = logging.getLogger(__name__)

#: Largest total of tensor bytes rebuilt as one in-memory protobuf (protobuf's 2 GB cap,
#: less room for the graph); above it, sessions stream to a temporary external-data file.
INLINE_LIMIT_BYTES = 2**31 - 2**27

#: Below this many tensor bytes a container is decoded on the calling thread.
SERIAL_DECODE_BYTES = 2 << 20

ProgressCallback = Callable[[int, int, str], None]


#: Member names are ASCII (the format's rule), so UTF-8 reads them as code page 437 would;
#: decoding them as cp437, zipfile's default, imports that codec first (about 1 ms of every
#: cold start). ``metadata_encoding`` exists from Python 3.11.
_UTF8_NAMES: dict[str, str] = {"metadata_encoding": "utf-8"} if sys.version_info >= (3, 11) else {}


def is_packed(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an ``.onnxz`` container (by suffix or by the ZIP magic)."""
    path = path if isinstance(path, Path) else Path(path)
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == ZIP_MAGIC
    except OSError:
        return False


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


class PackedModel:
    """An open ``.onnxz`` container whose manifest has been checked against the limits.

    Use as a context manager. Decoding methods are safe to call from several threads.
    """

    def __init__(self, path: str | os.PathLike[str], limits: Limits | None = None) -> None:
        self.path = path if isinstance(path, Path) else Path(path)
        self.limits = limits or DEFAULT_LIMITS
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
            self._handle = open(self.path, "rb", opener=_open_nonblocking)  # noqa: SIM115 - closed in close()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise InputError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read the file: {exc}") from exc
        try:
            status = os.fstat(self._handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise InputError(f"{self.path}: no such file")
            self.file_size = status.st_size
            if self.file_size == 0:
                raise InputError(f"{self.path}: the file is empty, expected an .onnxz container")
            try:  # reads the ZIP directory through the one open file
                self.zip = zipfile.ZipFile(self._handle, **_UTF8_NAMES)
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(_diagnose_broken_zip(self.path, exc)) from exc
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{self.path}: a ZIP member name is not ASCII or UTF-8 ({exc}); not an .onnxz"
                ) from exc
            self._spans: dict[str, tuple[int, int]] = {}
            self._closed = False
            self._close_lock = threading.Lock()
            self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._handle.close()
            raise
        try:
            self.manifest = self._read_manifest()
            self._check_members()
            self._check_limits()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PackedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the container; safe to call again, and from another thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.zip.close()
        with contextlib.suppress(BufferError):  # a caller still holds a view: GC closes it
            self._map.close()
        self._handle.close()

    def _member_view(self, name: str, what: str) -> memoryview:
        """The stored bytes of a member, as a view of the memory-mapped file (no copy).

        The ZIP CRC is not checked here: the sha256 of every decoded chunk is.
        """
        span = self._spans.get(name)
        if span is None:
            info = self._info(name, what)
            start = info.header_offset
            if start + _LOCAL_HEADER.size > len(self._map):
                raise InputError(f"{self.path}: {what} (member '{name}') lies past the end of the file")
            fields = _LOCAL_HEADER.unpack_from(self._map, start)
            if fields[0] != ZIP_MAGIC:
                raise InputError(f"{self.path}: {what} (member '{name}'): corrupt ZIP local header")
            begin = start + _LOCAL_HEADER.size + fields[9] + fields[10]
            end = begin + info.compress_size
            if end > len(self._map):
                raise InputError(
                    f"{self.path}: {what} (member '{name}') is truncated: "
                    f"{max(0, len(self._map) - begin)} of {info.compress_size} bytes present"
                )
            span = self._spans[name] = (begin, end)
        return memoryview(self._map)[span[0] : span[1]]

    def _info(self, name: str, what: str) -> zipfile.ZipInfo:
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise InputError(f"{self.path}: {what} is missing (no member '{name}')") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(
                f"{self.path}: member '{name}' ({what}) is compressed with ZIP method "
                f"{info.compress_type}; onnxz members must be stored"
            )
        return info

    def _read_manifest(self) -> Manifest:
        info = self._info(MANIFEST_MEMBER, "the manifest")
        if info.file_size > self.limits.max_manifest_bytes:
            raise InputError(
                f"{self.path}: the manifest is {info.file_size} bytes, over the limit of "
                f"{self.limits.max_manifest_bytes}"
            )
        return Manifest.from_json(self._read(MANIFEST_MEMBER, "the manifest"), str(self.path))

    def _check_members(self) -> None:
        graph = self._info(GRAPH_MEMBER, "the graph")
        if graph.file_size != self.manifest.graph_coded_size:
            raise InputError(
                f"{self.path}: the graph member holds {graph.file_size} bytes, the manifest "
                f"says {self.manifest.graph_coded_size}"
            )
        by_member: dict[str, TensorEntry] = {}
        for entry in self.manifest.tensors:
            info = self._info(entry.member, f"the stream of tensor '{entry.name}'")
            if info.file_size != entry.coded_size:
                raise InputError(
                    f"{self.path}: tensor '{entry.name}': member '{entry.member}' holds "
                    f"{info.file_size} bytes, the manifest says {entry.coded_size}"
                )
            other = by_member.setdefault(entry.member, entry)
            if (other.sha256, other.raw_size, other.chunks) != (
                entry.sha256, entry.raw_size, entry.chunks,
            ):
                raise InputError(
                    f"{self.path}: tensors '{other.name}' and '{entry.name}' share member "
                    f"'{entry.member}' but declare different contents"
                )

    def _check_limits(self) -> None:
        limits = self.limits
        if len(self.manifest.tensors) > limits.max_tensors:
            raise InputError(
                f"{self.path}: {len(self.manifest.tensors)} tensors, over the limit of "
                f"{limits.max_tensors}"
            )
        # unpack writes each external-data file at its declared size (its gaps are zeros)
        inline = sum(e.raw_size for e in self.manifest.tensors if e.external is None)
        external = sum(f.size for f in self.manifest.external_files)
        total = max(self.total_raw_bytes, inline + external) + self.manifest.graph_raw_size
        if total > limits.max_total_bytes:
            raise InputError(
                f"{self.path}: the container declares {total} decoded bytes, over the limit of "
                f"{limits.max_total_bytes}; raise the limit (--max-bytes) if you trust this file"
            )
        ratio = total / self.file_size
        if ratio > limits.max_ratio:
            raise InputError(
                f"{self.path}: the container declares {total} decoded bytes from a "
                f"{self.file_size}-byte file ({ratio:.0f}x, over the limit of "
                f"{limits.max_ratio:g}x); refused as a possible decompression bomb; raise "
                "the limit (--max-ratio) if you trust this file"
            )

    @functools.cached_property
    def streams(self) -> dict[str, list[int]]:
        """Manifest indices of the tensors stored in each member, in manifest order (identical
        tensors share one member, so each stream is decoded once and used by all of them)."""
        users: dict[str, list[int]] = {}
        for index, entry in enumerate(self.manifest.tensors):
            users.setdefault(entry.member, []).append(index)
        return users

    @functools.cached_property
    def total_raw_bytes(self) -> int:
        """Decoded bytes of every tensor (a tensor stored once but used twice counts twice)."""
        return sum(entry.raw_size for entry in self.manifest.tensors)

    # -- decoding -------------------------------------------------------------------------

    def _read(self, name: str, what: str) -> bytes:
        """A member's stored bytes, checked against the ZIP directory's CRC-32."""
        view = self._member_view(name, what)
        try:
            if zlib.crc32(view) != self.zip.getinfo(name).CRC:
                raise InputError(f"{self.path}: {what} is corrupt (member '{name}': its CRC-32 does not match)")
            return bytes(view)
        finally:
            view.release()

    def graph_proto(self) -> onnx.ModelProto:
        """The stripped ModelProto, sha-checked, with every marker checked against the manifest."""
        manifest = self.manifest
        coded = self._member_view(GRAPH_MEMBER, "the graph")  # its sha256 is checked below
        try:
            raw = codecs.decode_frame(coded, manifest.graph_raw_size)
        except codecs.CodecError as exc:
            raise InputError(f"{self.path}: the graph member is corrupt: {exc}") from exc
        finally:
            coded.release()
        if hashlib.sha256(raw).hexdigest() != manifest.graph_sha256:
            raise InputError(f"{self.path}: the graph's sha256 does not match the manifest (corrupt file)")
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(raw)
        except google.protobuf.message.DecodeError as exc:
            raise InputError(f"{self.path}: the graph member is not a ModelProto: {exc}") from exc
        seen = [0] * len(manifest.tensors)
        for tensor in iter_tensor_protos(proto):
            try:
                index = marker_index(tensor)
            except ValueError as exc:
                raise InputError(f"{self.path}: {exc}") from exc
            if index is None:
                self._check_not_external(tensor)
                continue
            if index >= len(manifest.tensors):
                raise InputError(
                    f"{self.path}: tensor '{tensor.name}' points at manifest entry {index}, "
                    f"but the manifest has {len(manifest.tensors)}"
                )
            entry = manifest.tensors[index]
            if (tensor.name, dtype_name(tensor.data_type), list(tensor.dims)) != (
                entry.name, entry.dtype, entry.shape,
            ):
                raise InputError(
                    f"{self.path}: graph tensor '{tensor.name}' does not match manifest entry "
                    f"{index} ('{entry.name}' {entry.dtype} {entry.shape})"
                )
            if not _same_external(tensor, entry):
                raise InputError(
                    f"{self.path}: graph tensor '{tensor.name}': its external-data reference "
                    f"{external_info(tensor) or None} does not match manifest entry {index} "
                    f"(expected {entry.external or 'no external data'})"
                )
            seen[index] += 1
        missing = [manifest.tensors[i].name for i, n in enumerate(seen) if n != 1]
        if missing:
            raise InputError(
                f"{self.path}: manifest tensors not referenced exactly once by the graph: "
                + ", ".join(f"'{m}'" for m in missing[:5])
            )
        # A tensor can name a file only through a "location" entry; when the graph holds
        # those bytes, look for one in every field of every attribute too (the walk above
        # reads an attribute through its type, as onnxruntime does).
        if b"location" in raw:
            for tensor in iter_tensor_protos(proto, every_field=True):
                if not has_marker(tensor):
                    self._check_not_external(tensor)
        return proto

    def _check_not_external(self, tensor: onnx.TensorProto) -> None:
        """Refuses an unmarked tensor that refers to a file (the reader's, not the container's)."""
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise InputError(
                f"{self.path}: graph tensor '{tensor.name}' refers to external data "
                f"{external_info(tensor).get('location', '')!r} that the container does "
                "not hold; an .onnxz must carry every tensor itself"
            )

    def _decode_chunk(
        self, index: int, chunk_index: int, out: np.ndarray | None, *, verify: bool = True
    ) -> np.ndarray | bytes:
        """Decodes one chunk of tensor ``index``, into ``out`` when given (its slice).

        With ``verify`` off the chunk's sha256 is not checked here; the caller must check it
        with :meth:`check_digests` before trusting the bytes.
        """
        entry = self.manifest.tensors[index]
        chunk = entry.chunks[chunk_index]
        view = self._member_view(entry.member, f"tensor '{entry.name}'")
        coded_start = sum(c.coded_size for c in entry.chunks[:chunk_index])
        raw_start = sum(c.raw_size for c in entry.chunks[:chunk_index])
        target = None if out is None else out[raw_start : raw_start + chunk.raw_size]
        try:
            coded = view[coded_start : coded_start + chunk.coded_size]
            if target is not None and chunk.codec == codecs.CODEC_ZSTD:
                codecs.decode_frame_into(coded, target)  # no intermediate bytes, no copy
                raw = target
            else:
                raw = codecs.decode_array(chunk.codec, coded, chunk.raw_size, chunk.params)
        except codecs.CodecError as exc:
            where = f", chunk {chunk_index}" if len(entry.chunks) > 1 else ""
            raise InputError(
                f"{self.path}: tensor '{entry.name}' (member '{entry.member}'{where}) is corrupt: {exc}"
            ) from exc
        finally:
            view.release()
        if verify:
            self._check_chunk(index, chunk_index, raw)
        if target is None:
            return raw
        if raw is not target:
            target[:] = np.frombuffer(raw, dtype=np.uint8)
        return out  # type: ignore[return-value]

    def _check_chunk(self, index: int, chunk_index: int, raw: np.ndarray | bytes | memoryview) -> None:
        """Compares one decoded chunk's sha256 with the manifest; the error names the tensor."""
        entry = self.manifest.tensors[index]
        if hashlib.sha256(raw).hexdigest() != entry.chunks[chunk_index].sha256:
            where = f", chunk {chunk_index}" if len(entry.chunks) > 1 else ""
            raise InputError(
                f"{self.path}: tensor '{entry.name}' (member '{entry.member}'{where}): sha256 mismatch, "
                "the decoded bytes differ from what was packed (corrupt file)"
            )

    def check_digests(
        self, data: list[bytes | np.ndarray], pool: ThreadPoolExecutor, workers: int
    ) -> list[Future[None]]:
        """Submits the sha256 check of every chunk of ``data`` (from ``decode_all(verify=False)``).

        Each stream is checked once (identical tensors share their decoded buffer). The chunks
        are dealt, largest first, into ``workers`` lists of about equal bytes, one task each:
        a task per chunk would cost more in thread hand-offs than small chunks take to hash.
        The returned futures raise :class:`InputError` naming the tensor whose bytes differ.
        """
        chunks: list[tuple[int, int, memoryview]] = []
        for index, *_ in self.streams.values():
            entry = self.manifest.tensors[index]
            buffer = memoryview(data[index]).cast("B")
            start = 0
            for j, chunk in enumerate(entry.chunks):
                chunks.append((index, j, buffer[start : start + chunk.raw_size]))
                start += chunk.raw_size
        lists: list[list[tuple[int, int, memoryview]]] = [[] for _ in range(max(1, workers))]
        loads = [0] * len(lists)
        for item in sorted(chunks, key=lambda c: -len(c[2])):
            lightest = loads.index(min(loads))
            lists[lightest].append(item)
            loads[lightest] += len(item[2])
        return [pool.submit(self._check_chunks, part) for part in lists if part]

    def _check_chunks(self, chunks: list[tuple[int, int, memoryview]]) -> None:
        for index, chunk_index, raw in chunks:
            self._check_chunk(index, chunk_index, raw)

    def _verify(self, index: int, raw: np.ndarray | bytes) -> np.ndarray | bytes:
        entry = self.manifest.tensors[index]
        if hashlib.sha256(raw).hexdigest() != entry.sha256:
            raise InputError(
                f"{self.path}: tensor '{entry.name}' (member '{entry.member}'): sha256 mismatch, "
                "the decoded bytes differ from what was packed (corrupt file)"
            )
        return raw

    def tensor_data(self, index: int, *, whole_digest: bool = True, verify: bool = True) -> np.ndarray | bytes:
        """Decodes tensor ``index`` (a fresh buffer) and checks its sha256; errors name it.

        Every chunk's sha256 is checked as it is decoded; with ``whole_digest`` the tensor's
        own sha256 is checked too (the chunk digests already cover every byte, so this is
        a second, independent check of the manifest's tensor digest). With ``verify`` off no
        digest is checked (see :meth:`check_digests`).
        """
        entry = self.manifest.tensors[index]
        if len(entry.chunks) == 1:  # its one chunk's sha256 is the tensor's (checked on read)
            return self._decode_chunk(index, 0, None, verify=verify)
        out = np.empty(entry.raw_size, dtype=np.uint8)
        for j in range(len(entry.chunks)):
            self._decode_chunk(index, j, out, verify=verify)
        return self._verify(index, out) if whole_digest and verify else out

    def tensor_bytes(self, index: int) -> bytes:
        """Tensor ``index`` as ``bytes`` (see :meth:`tensor_data`)."""
        raw = self.tensor_data(index)
        return raw if isinstance(raw, bytes) else raw.tobytes()

    def decode_all(
        self,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
        *,
        as_bytes: bool = True,
        verify: bool = True,
    ) -> list[bytes | np.ndarray]:
        """Every tensor's data, in manifest order; each stored stream is decoded once.

        Every chunk of every distinct stream is one task in a thread pool, so a single large
        tensor is decoded on all cores. Each chunk's sha256 is checked in its task; the
        chunk digests cover every byte, so the whole-tensor digest is not computed again here
        (it would be one core's work on the largest tensor); :meth:`tensor_data` checks both.

        Args:
            threads: Chunks decoded at once; all cores when None.
            progress: Called after each decoded tensor.
            as_bytes: Return ``bytes`` (for protobuf); otherwise bytes or uint8 arrays,
                whichever the codec produced, without a copy.
            verify: Check each chunk's sha256 while decoding. Off, the caller must check the
                result with :meth:`check_digests` before trusting it.
        """
        tensors = self.manifest.tensors
        first = {member: users[0] for member, users in self.streams.items()}
        unique = list(first.values())
        workers = worker_count(threads)
        decoded: dict[int, bytes | np.ndarray] = {}
        if workers == 1 or sum(tensors[i].raw_size for i in unique) < SERIAL_DECODE_BYTES:
            for done, index in enumerate(unique, start=1):  # starting threads would cost more
                raw = self.tensor_data(index, whole_digest=False, verify=verify)
                decoded[index] = raw.tobytes() if as_bytes and not isinstance(raw, bytes) else raw
                if progress is not None:
                    progress(done, len(unique), tensors[index].name)
            return [decoded[first[entry.member]] for entry in tensors]
        with decoding_pool(threads) as pool:
            single = [i for i in unique if len(tensors[i].chunks) == 1]
            multi = [i for i in unique if len(tensors[i].chunks) != 1]
            outs = {i: np.empty(tensors[i].raw_size, dtype=np.uint8) for i in multi}
            chunk_jobs = [
                pool.submit(self._decode_chunk, i, j, outs[i], verify=verify)
                for i in multi for j in range(len(tensors[i].chunks))
            ]
            singles = [(i, pool.submit(self.tensor_data, i, verify=verify)) for i in single]
            for job in chunk_jobs:
                job.result()
            for done, (index, job) in enumerate(singles + [(i, None) for i in multi], start=1):
                raw = outs[index] if job is None else job.result()
                decoded[index] = raw.tobytes() if as_bytes and not isinstance(raw, bytes) else raw
                if progress is not None:
                    progress(done, len(unique), tensors[index].name)
        return [decoded[first[entry.member]] for entry in tensors]


def _same_external(tensor: onnx.TensorProto, entry: TensorEntry) -> bool:
    """True when a marked graph tensor's external-data reference is the one its manifest
    entry records (or both have none): unpack writes the entry's bytes to the entry's file,
    so a graph pointing elsewhere would make the unpacked model read another file."""
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    if entry.external is None or not external:
        return entry.external is None and not external
    info = external_info(tensor)
    ref = entry.external
    try:  # read as pack reads them
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else ref.length
    except ValueError:
        return False
    return (info.get("location"), offset, length) == (ref.location, ref.offset, ref.length)


def _restore(
    proto: onnx.ModelProto, data: list[bytes] | list[bytes | np.ndarray], *, keep_external: bool
) -> None:
    """Puts tensor bytes back; external tensors become inline unless ``keep_external``."""
    for tensor in iter_tensor_protos(proto):
        index = marker_index(tensor)
        if index is None:
            continue
        pop_marker(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if keep_external:
                continue
            del tensor.external_data[:]
            tensor.ClearField("data_location")
        raw = data[index]
        tensor.raw_data = raw if isinstance(raw, bytes) else raw.tobytes()


def load_model_proto(
    path: str | os.PathLike[str], *, limits: Limits | None = None, threads: int | None = None
) -> onnx.ModelProto:
    """Decodes an ``.onnxz`` into one in-memory ModelProto with every tensor inline.

    Raises:
        InputError: The container is unsafe, corrupt or truncated, or its tensors exceed
            the 2 GB protobuf limit (use :func:`unpack` to write external data instead).
    """
    with PackedModel(path, limits) as packed:
        if packed.total_raw_bytes > INLINE_LIMIT_BYTES:
            raise InputError(
                f"{path}: {packed.total_raw_bytes} bytes of tensors do not fit one protobuf; "
                "unpack it (external data is written) or use onnxpress.load_session"
            )
        proto = packed.graph_proto()
        _restore(proto, packed.decode_all(threads), keep_external=False)
    return proto


def load_packed_model(
    path: str | os.PathLike[str], *, limits: Limits | None = None, threads: int | None = None
) -> ir.Model:
    """The model in an ``.onnxz`` as onnx_ir, decoded in memory (no temporary file)."""
    import onnx_ir as ir  # not at the top: sessions read containers without it (0.6 s)

    return ir.from_proto(load_model_proto(path, limits=limits, threads=threads))


#: ONNX element types onnxruntime can take as numpy-backed OrtValues without a copy.
_NUMPY_TYPES: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.INT8: np.dtype(np.int8),
    onnx.TensorProto.UINT8: np.dtype(np.uint8),
    onnx.TensorProto.INT16: np.dtype(np.int16),
    onnx.TensorProto.UINT16: np.dtype(np.uint16),
    onnx.TensorProto.INT32: np.dtype(np.int32),
    onnx.TensorProto.UINT32: np.dtype(np.uint32),
    onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.UINT64: np.dtype(np.uint64),
    onnx.TensorProto.BOOL: np.dtype(np.bool_),
}


def _tiny_model() -> bytes:
    """A one-node model (``y = Identity(x)``) that costs onnxruntime almost nothing to build."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "warm-up",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=7)
    return model.SerializeToString()


_ort_started = threading.Event()


def _start_onnxruntime(providers: list[str]) -> threading.Thread | None:
    """Starts onnxruntime's one-time process set-up on a side thread, the first time only.

    The first session a process builds pays for onnxruntime's environment and kernel
    registries (about 8 ms here, against 2 ms for the digits CNN's own session once they
    exist); building a one-node session on a side thread (onnxruntime releases the GIL)
    overlaps that with reading and decoding the container. Later calls return None.
    """
    if _ort_started.is_set():
        return None
    _ort_started.set()

    def build() -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        try:
            ort.InferenceSession(_tiny_model(), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - only a head start; the real session reports errors
            logger.debug("onnxruntime warm-up session failed: %s", exc)

    thread = threading.Thread(target=build, name="onnxz-ort-start", daemon=True)
    thread.start()
    return thread


def packed_session(
    path: str | os.PathLike[str],
    options: ort.SessionOptions,
    providers: list[str],
    *,
    limits: Limits | None = None,
    threads: int | None = None,
    inline_limit: int = INLINE_LIMIT_BYTES,
) -> ort.InferenceSession:
    """An onnxruntime session for an ``.onnxz``, decoded in memory.

    Main-graph initializers of numpy-representable types are handed to onnxruntime as
    OrtValues over the decoded buffers (``SessionOptions.add_external_initializers``), so
    their bytes are neither copied into a protobuf nor parsed again; every other large
    tensor is put back into the graph. The decoded buffers are kept alive on the session
    (attribute ``onnxz_buffers``), as onnxruntime requires. Those OrtValues are added to
    ``options``, which therefore serves one packed session only (a second use raises
    ``ValueError``).

    When the tensors total more than ``inline_limit`` bytes (2 GB protobuf cap), they are
    streamed tensor by tensor into an external-data file in a temporary folder, which is
    removed once the session is built.

    In memory, the tensors' sha256 digests are checked on the decoding pool, on every core
    but one, while onnxruntime builds its session on about one core (hashing runs at about
    the speed of decoding, so checking first would add its whole time to the start); the
    session is returned only once every digest matches, and a mismatch raises
    :class:`InputError` naming the tensor. The graph itself is checked before onnxruntime
    sees it, and every size was checked before decoding, so unchecked tensor bytes can only
    be wrong values, never a malformed model. Below ``SERIAL_DECODE_BYTES`` of tensors
    everything runs on the calling thread, each digest checked as its tensor decodes
    (starting and feeding threads would cost more than the work).
    """
    if options in _OPTIONS_WITH_INITIALIZERS:
        raise ValueError(
            "this onnxruntime SessionOptions already carries the in-memory weights of a "
            "packed session (they cannot be removed, and would replace the external "
            "initializers of the same names in any later model); pass a fresh "
            "SessionOptions per packed session"
        )
    warm_up = _start_onnxruntime(providers)

    def ort_ready() -> None:  # the head start is over before the real session is built
        if warm_up is not None:
            warm_up.join()

    with contextlib.ExitStack() as stack:
        stack.callback(ort_ready)  # also when reading the container fails
        packed = stack.enter_context(PackedModel(path, limits))
        if packed.total_raw_bytes > inline_limit:
            proto = packed.graph_proto()
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxz-"))
            model_path = Path(tmp) / "model.onnx"
            _stream_to_external(packed, proto, Path(tmp) / "model.onnx.data", threads)
            model_path.write_bytes(proto.SerializeToString())
            logger.info("Streamed %s to external data in %s", path, tmp)
            ort_ready()
            return ort.InferenceSession(str(model_path), options, providers=providers)
        if packed.total_raw_bytes < SERIAL_DECODE_BYTES:
            # All on the calling thread, each digest checked as its tensor decodes: handing
            # 0.1 ms of hashing to a pool thread cost more than it saved (the thread waits
            # for the GIL, which onnxruntime holds through most of a small model's build).
            proto = packed.graph_proto()
            data = packed.decode_all(threads, as_bytes=False, verify=True)
            packed.close()
            ort_ready()
            return _session_from_decoded(proto, data, options, providers)
        # The graph is decoded and checked on another thread while the tensors decode.
        with ThreadPoolExecutor(max_workers=1) as side:
            graph = side.submit(packed.graph_proto)
            data = packed.decode_all(threads, as_bytes=False, verify=False)
            proto = graph.result()
        # onnxruntime builds a session on about one core: the check takes the others (at
        # least one); spread over every core it slowed the build by as much as it hashed
        # in parallel
        check_tasks = max(1, worker_count(threads) - 1)
        pool = stack.enter_context(decoding_pool(threads))
        checks = packed.check_digests(data, pool, check_tasks)
        # Everything is read: unmapping the container (1.5 ms for MiniLM int8's 19 MB, 3 ms
        # for fp32's 71 MB) overlaps the session build instead of following it.
        pool.submit(packed.close)
        ort_ready()
        try:
            session = _session_from_decoded(proto, data, options, providers)
        except Exception:
            _wait_all(checks)  # a corrupt tensor is the better explanation of a failure
            raise
        _wait_all(checks)
        return session


def _wait_all(jobs: list[Future[None]]) -> None:
    """Waits for every job, then raises the first one's error (none is left running)."""
    errors = [exc for job in jobs if (exc := job.exception()) is not None]
    if errors:
        raise errors[0]


#: SessionOptions that ``add_external_initializers`` has been called on (never reusable).
_OPTIONS_WITH_INITIALIZERS: weakref.WeakSet[ort.SessionOptions] = weakref.WeakSet()


def _session_from_decoded(
    proto: onnx.ModelProto, data: list[bytes | np.ndarray], options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """Builds the session: main-graph initializers as OrtValues over ``data``, the rest inline."""
    names: list[str] = []
    values: list[ort.OrtValue] = []
    arrays: list[np.ndarray] = []
    for tensor in proto.graph.initializer:
        index = marker_index(tensor)
        np_type = _NUMPY_TYPES.get(tensor.data_type)
        if index is None or np_type is None or not tensor.name:
            continue
        pop_marker(tensor)
        del tensor.external_data[:]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        item = tensor.external_data.add()
        item.key, item.value = "location", "onnxz-in-memory"
        array = np.frombuffer(data[index], dtype=np_type).reshape(tuple(tensor.dims))
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        arrays.append(array)
    if len(names) < len(data):  # tensors elsewhere (attributes, subgraphs, other types)
        _restore(proto, data, keep_external=False)
    if names:
        options.add_external_initializers(names, values)
        _OPTIONS_WITH_INITIALIZERS.add(options)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    session.onnxz_buffers = (values, arrays)  # type: ignore[attr-defined]
    return session


def _stream_to_external(
    packed: PackedModel, proto: onnx.ModelProto, data_path: Path, threads: int | None
) -> None:
    """Writes every stored stream once into ``data_path`` (4 KiB aligned) and points the
    graph at it; identical tensors (one member) share their bytes, as in the container."""
    tensors = packed.manifest.tensors
    offsets = [0] * len(tensors)
    offset = 0
    for users in packed.streams.values():
        for index in users:  # identical tensors share their bytes
            offsets[index] = offset
        offset += -(-tensors[users[0]].raw_size // 4096) * 4096
    with open(data_path, "wb") as handle:
        handle.truncate(offset)
        workers = worker_count(threads)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            indices = [users[0] for users in packed.streams.values()]
            for index, raw in zip(indices, bounded_map(pool, packed.tensor_bytes, indices, 2 * workers), strict=True):
                os.pwrite(handle.fileno(), raw, offsets[index])
    for tensor in iter_tensor_protos(proto):
        index = marker_index(tensor)
        if index is None:
            continue
        pop_marker(tensor)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", data_path.name),
            ("offset", str(offsets[index])),
            ("length", str(tensors[index].raw_size)),
        ):
            item = tensor.external_data.add()
            item.key, item.value = key, value


@dataclass
class UnpackReport:
    """What :func:`unpack` wrote."""

    source: Path
    output: Path
    external_files: list[Path]
    tensors: int
    bytes_written: int
    byte_exact: bool
    seconds: float


def unpack(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    limits: Limits | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> UnpackReport:
    """Unpacks an ``.onnxz`` into the ``.onnx`` (and external-data files) it was packed from.

    When the manifest says ``byte_exact``, the written model (and each external-data file)
    is checked against the source's sha256, so success means a bit-exact round trip.
    External-data files keep the names the source model gave them and are written beside
    ``output``. Everything is written to temporary files first and renamed at the end.

    Raises:
        InputError: The container is unsafe, corrupt or truncated, or an output exists
            without ``force``.
    """
    start = time.perf_counter()
    source, output = Path(source), Path(output)
    with PackedModel(source, limits) as packed:
        manifest = packed.manifest
        targets = [output] + [output.parent / f.location for f in manifest.external_files]
        if not output.parent.is_dir():
            raise InputError(f"{output}: the output folder {output.parent} does not exist")
        folders = _subfolders(output.parent, [f.location for f in manifest.external_files])
        for target in targets:
            if target.is_dir() or target in folders:
                raise InputError(
                    f"{target}: the output {'is' if target.is_dir() else 'would be'} a folder; "
                    f"expected a file path (the container holds {len(targets) - 1} external-data "
                    "files, written beside the output)"
                )
            if target.exists() and target.resolve() == source.resolve():
                raise InputError(f"{target}: that is the input container; choose another output")
            if target.exists() and not force:
                raise InputError(f"{target}: the output already exists; pass --force to replace it")
        if len(set(targets)) != len(targets):
            raise InputError(f"{output}: the output name collides with an external-data file name")
        proto = packed.graph_proto()
        tmp_files: dict[Path, Path] = {}
        created: list[Path] = []
        published = False
        try:
            for folder in folders:
                if not folder.exists():
                    folder.mkdir()
                    created.append(folder)
            for ext in manifest.external_files:
                assert is_safe_location(ext.location)  # checked when the manifest was read
                target = output.parent / ext.location
                fd, name = tempfile.mkstemp(prefix=temp_prefix(target.name), dir=target.parent)
                os.close(fd)
                tmp_files[output.parent / ext.location] = Path(name)
                with open(name, "r+b") as handle:
                    handle.truncate(ext.size)
            inline = _write_tensors(packed, tmp_files, output.parent, threads, progress)
            if not manifest.byte_exact:  # (byte-exact files are checked whole below)
                _check_overlaps(packed, tmp_files, output.parent)
            _restore(proto, inline, keep_external=True)
            data = proto.SerializeToString()
            if manifest.byte_exact and hashlib.sha256(data).hexdigest() != manifest.source_sha256:
                raise InputError(f"{source}: the unpacked model's sha256 differs from the packed source")
            for ext in manifest.external_files:
                tmp = tmp_files[output.parent / ext.location]
                if manifest.byte_exact and _file_sha256(tmp) != ext.sha256:
                    raise InputError(
                        f"{source}: the unpacked external data '{ext.location}' differs from the source"
                    )
            fd, name = tempfile.mkstemp(prefix=temp_prefix(output.name), dir=output.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            tmp_files[output] = Path(name)
            for target, tmp in tmp_files.items():
                publish(tmp, target)
            published = True
        finally:
            for tmp in tmp_files.values():
                tmp.unlink(missing_ok=True)
            for folder in reversed(created if not published else []):
                with contextlib.suppress(OSError):
                    folder.rmdir()
    report = UnpackReport(
        source=source,
        output=output,
        external_files=[output.parent / f.location for f in manifest.external_files],
        tensors=len(manifest.tensors),
        bytes_written=len(data) + sum(f.size for f in manifest.external_files),
        byte_exact=manifest.byte_exact,
        seconds=time.perf_counter() - start,
    )
    logger.info("Unpacked %s into %s in %.2fs", source, output, report.seconds)
    return report


def _subfolders(folder: Path, locations: list[str]) -> list[Path]:
    """The folders under ``folder`` that external-data ``locations`` need, parents first.

    Raises:
        InputError: One of them exists as a symlink or as something other than a folder
            (writing through it could land outside ``folder``).
    """
    needed: list[Path] = []
    for location in locations:
        parts = location.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            path = folder.joinpath(*parts[:depth])
            if path in needed:
                continue
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise InputError(
                    f"{path}: external data '{location}' goes into this folder, but it is a "
                    "symlink or not a folder; unpack writes only into real folders under "
                    f"{folder}"
                )
            needed.append(path)
    return needed


def _write_tensors(
    packed: PackedModel,
    tmp_files: dict[Path, Path],
    folder: Path,
    threads: int | None,
    progress: ProgressCallback | None,
) -> list[bytes]:
    """Decodes each stored stream once; every tensor using it goes to its external file or,
    inline, is returned (identical tensors share one ``bytes``)."""
    tensors = packed.manifest.tensors
    inline: list[bytes] = [b""] * len(tensors)
    workers = worker_count(threads)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        streams = list(packed.streams.values())
        firsts = [users[0] for users in streams]
        for users, raw in zip(streams, bounded_map(pool, packed.tensor_bytes, firsts, 2 * workers), strict=True):
            for index in users:
                entry = tensors[index]
                if entry.external is None:
                    inline[index] = raw
                else:
                    # opened per tensor: a model with one file per tensor has more files
                    # than a process may hold open at once
                    with open(tmp_files[folder / entry.external.location], "r+b") as handle:
                        os.pwrite(handle.fileno(), raw, entry.external.offset)
                done += 1
                if progress is not None:
                    progress(done, len(tensors), entry.name)
    return inline


def _check_overlaps(packed: PackedModel, tmp_files: dict[Path, Path], folder: Path) -> None:
    """Re-reads every external tensor whose bytes overlap another tensor's in the same file
    and checks its sha256: a packer only overlaps identical bytes, but a crafted container
    could overlap different ones, and the later write would corrupt the earlier tensor."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for index, entry in enumerate(packed.manifest.tensors):
        if entry.external is not None and entry.raw_size:
            ref = entry.external
            spans.setdefault(ref.location, []).append((ref.offset, ref.offset + ref.length, index))
    for location, items in spans.items():
        items.sort()
        overlapping: set[int] = set()
        reach, holder = -1, -1
        for begin, end, index in items:
            if begin < reach:
                overlapping.update((index, holder))
            if end > reach:
                reach, holder = end, index
        if not overlapping:
            continue
        with open(tmp_files[folder / location], "rb") as handle:
            for index in sorted(overlapping):
                entry = packed.manifest.tensors[index]
                raw = os.pread(handle.fileno(), entry.raw_size, entry.external.offset)  # type: ignore[union-attr]
                if hashlib.sha256(raw).hexdigest() != entry.sha256:
                    raise InputError(
                        f"{packed.path}: tensor '{entry.name}' overlaps another tensor in "
                        f"'{location}' with different bytes (corrupt or crafted container)"
                    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# explaining a file that is not a readable ZIP

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def _diagnose_broken_zip(path: Path, exc: BaseException) -> str:
    """Names what a truncated container lost, by walking its local file headers."""
    try:
        data = path.read_bytes()
    except OSError:
        return f"{path}: cannot read the file: {exc}"
    if not data.startswith(ZIP_MAGIC):
        return f"{path}: not an .onnxz container (it does not start with a ZIP header): {exc}"
    names: dict[str, str] = {}
    pos = 0
    last = None
    while pos + _LOCAL_HEADER.size <= len(data) and data[pos : pos + 4] == ZIP_MAGIC:
        fields = _LOCAL_HEADER.unpack_from(data, pos)
        size, name_len, extra_len = fields[7], fields[9], fields[10]
        name = data[pos + 30 : pos + 30 + name_len].decode("utf-8", "replace")
        body = pos + 30 + name_len + extra_len
        if size == 0xFFFFFFFF:  # zip64 sizes live in the extra field
            size = struct.unpack_from("<Q", data, pos + 30 + name_len + 12)[0]
        if name == MANIFEST_MEMBER and body + size <= len(data):
            with contextlib.suppress(Exception):
                manifest = Manifest.from_json(data[body : body + size], str(path))
                names = {t.member: t.name for t in manifest.tensors}
        what = f"tensor '{names[name]}' (member '{name}')" if name in names else f"member '{name}'"
        if body + size > len(data):
            have = max(0, len(data) - body)
            return f"{path}: the file is truncated inside {what}: {have} of {size} bytes present"
        last = what
        pos = body + size
    after = f" after {last}" if last else ""
    return f"{path}: the file is truncated or corrupt{after} (its ZIP directory is missing): {exc}"
