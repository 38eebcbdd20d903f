"""The ``.onnxz`` container: a ZIP of stored members with a JSON manifest.

Layout (specified fully in ``docs/onnxz-format.md``)::

    manifest.json      JSON, UTF-8: format version, the graph entry, one entry per tensor
    graph.pb.zst       the ModelProto without its large constants, one zstd frame
    t/000000.bin ...   one coded stream per distinct large tensor

Every member is *stored* (ZIP method 0): the streams are already entropy coded, and stored
members can be read with any ZIP tool. A large tensor is cut out of the graph by clearing
its ``raw_data`` and appending one entry ``{key: "onnxz.tensor", value: "<index>"}`` to its
``external_data`` list; ``<index>`` is its position in the manifest's ``tensors`` list.
A reader fills the bytes back and pops that entry, which restores the TensorProto field
for field, so the model serializes to the very bytes it was read from.

Why the protobuf edge: the container must give back the original ``.onnx`` bit for bit,
which only the protobuf message itself can promise. onnx_ir would re-create the proto.

Names inside the container are never used as filesystem paths: members are looked up by
name inside the ZIP, and the one name that can reach the disk (the external-data file of a
model saved with external data) must be a safe relative path (:func:`is_safe_location`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from onnxpress.errors import InputError

FORMAT_NAME = "onnxz"
FORMAT_VERSION = 1
SUFFIX = ".onnxz"
MANIFEST_MEMBER = "manifest.json"
GRAPH_MEMBER = "graph.pb.zst"
MARKER_KEY = "onnxz.tensor"
ZIP_MAGIC = b"PK\x03\x04"
#: Fixed timestamp for every member, so packing the same model twice gives the same bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)

_MEMBER_RE = re.compile(r"^t/[0-9]{6,12}\.bin$")
#: Characters a file-name part may not hold: path separators, NUL and control characters,
#: and the ones Windows reserves (a drive letter or stream after ``:``).
_UNSAFE_CHARS_RE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
#: Most folder levels an external-data location may have (``weights/w.bin`` has 2).
MAX_LOCATION_DEPTH = 8



def tensor_member(index: int) -> str:
    """The member name of the coded stream first stored for tensor ``index``."""
    return f"t/{index:06d}.bin"


def is_safe_file_name(name: str) -> bool:
    """True for one file-name part: not empty, ``.`` or ``..``, no separator, no control or
    Windows-reserved character, at most 255 bytes in UTF-8. Unicode and spaces are fine
    (onnx names external files after their tensors)."""
    return (
        name not in ("", ".", "..")
        and not _UNSAFE_CHARS_RE.search(name)
        and len(name.encode("utf-8", "surrogatepass")) <= 255
    )


def temp_prefix(name: str) -> str:
    """``.NAME.`` for a temporary file beside ``NAME``, with NAME cut to 64 UTF-8 bytes so the
    temporary name stays within the 255-byte limit however long NAME is."""
    return "." + name.encode("utf-8", "surrogatepass")[:64].decode("utf-8", "ignore") + "."


def is_safe_location(location: str) -> bool:
    """True for an external-data location that stays inside the model's folder.

    A relative path of safe parts joined by ``/`` (``w.bin``, ``weights/w.bin``): no
    absolute path, no ``..``, ``.`` or empty part, no backslash, at most
    :data:`MAX_LOCATION_DEPTH` parts. Symlinks are a matter for the code that touches the
    disk (see ``pack._ExternalData`` and ``unpack``).
    """
    parts = location.split("/")
    return 0 < len(parts) <= MAX_LOCATION_DEPTH and all(is_safe_file_name(p) for p in parts)


def dtype_name(data_type: int) -> str:
    """The ONNX name of a ``TensorProto.DataType`` value (``FLOAT16``, ``INT4``, ...)."""
    return onnx.TensorProto.DataType.Name(data_type)


#: Bits per element of every fixed-size ONNX element type, by name (types newer than the
#: installed onnx are skipped). A test checks it against onnx-ir, which readers do not
#: import: it costs 0.6 s, three times a small model's cold start.
_BITS_BY_NAME: dict[str, int] = {
    "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64,
    "BOOL": 8, "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64,
    "COMPLEX128": 128, "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8,
    "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4,
    "FLOAT8E8M0": 8, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6,
}
_DTYPE_BITS: dict[int, int] = {
    value: _BITS_BY_NAME[name] for name, value in onnx.TensorProto.DataType.items() if name in _BITS_BY_NAME
}


def dtype_bits(data_type: int) -> int | None:
    """Bits per element, or None for types without a fixed size (strings) or unknown ones."""
    return _DTYPE_BITS.get(data_type)


def expected_raw_size(data_type: int, shape: list[int]) -> int | None:
    """``ceil(numel * bits / 8)``: the size of ``raw_data`` for this dtype and shape."""
    bits = dtype_bits(data_type)
    if bits is None:
        return None
    numel = 1
    for dim in shape:
        numel *= dim
    return (numel * bits + 7) // 8


# ---------------------------------------------------------------------------------------
# the manifest


@dataclass
class ExternalRef:
    """Where an external tensor lived in the source model's external data."""

    location: str
    offset: int
    length: int


@dataclass
class Chunk:
    """A run of a tensor's bytes coded on its own, so large tensors decode in parallel."""

    codec: str
    params: dict[str, int]
    raw_size: int
    coded_size: int
    sha256: str


@dataclass
class TensorEntry:
    """One large tensor: what it is, how it is coded, where its stream is."""

    name: str
    dtype: str
    shape: list[int]
    raw_size: int
    coded_size: int
    sha256: str
    member: str
    chunks: list[Chunk]
    external: ExternalRef | None = None

    @property
    def codec(self) -> str:
        """The chunks' codec, or ``mixed`` when they differ."""
        names = {chunk.codec for chunk in self.chunks}
        return names.pop() if len(names) == 1 else "mixed"


@dataclass
class ExternalFile:
    """An external-data file of the source model, rebuilt by ``unpack``."""

    location: str
    size: int
    sha256: str


@dataclass
class Manifest:
    """The manifest: everything a reader checks before decoding a byte."""

    graph_raw_size: int
    graph_coded_size: int
    graph_sha256: str
    source_size: int
    source_sha256: str
    byte_exact: bool
    tensors: list[TensorEntry] = field(default_factory=list)
    external_files: list[ExternalFile] = field(default_factory=list)
    producer: str = ""
    level: int = 0

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "producer": self.producer,
            "level": self.level,
            "graph": {
                "member": GRAPH_MEMBER,
                "codec": "zstd",
                "raw_size": self.graph_raw_size,
                "coded_size": self.graph_coded_size,
                "sha256": self.graph_sha256,
            },
            "source": {
                "size": self.source_size,
                "sha256": self.source_sha256,
                "byte_exact": self.byte_exact,
                "external_files": [asdict(f) for f in self.external_files],
            },
            "tensors": [_entry_json(t) for t in self.tensors],
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parses and validates a manifest; every error names ``where`` and the bad field."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{where}: the manifest is not valid JSON: {exc}") from exc
        check = _Checker(where)
        check.is_dict(doc, "manifest")
        if doc.get("format") != FORMAT_NAME:
            raise InputError(f"{where}: not an onnxz manifest (format is {doc.get('format')!r})")
        version = doc.get("version")
        if version != FORMAT_VERSION:
            raise InputError(
                f"{where}: onnxz format version {version!r}; this onnxpress reads version "
                f"{FORMAT_VERSION}; upgrade onnxpress"
            )
        graph = check.is_dict(doc.get("graph"), "graph")
        source = check.is_dict(doc.get("source"), "source")
        if graph.get("member") != GRAPH_MEMBER or graph.get("codec") != "zstd":
            raise InputError(f"{where}: the manifest's graph entry must be {GRAPH_MEMBER} coded with zstd")
        tensors = check.is_list(doc.get("tensors"), "tensors")
        externals = check.is_list(source.get("external_files", []), "source.external_files")
        manifest = cls(
            graph_raw_size=check.size(graph.get("raw_size"), "graph.raw_size"),
            graph_coded_size=check.size(graph.get("coded_size"), "graph.coded_size"),
            graph_sha256=check.sha(graph.get("sha256"), "graph.sha256"),
            source_size=check.size(source.get("size"), "source.size"),
            source_sha256=check.sha(source.get("sha256"), "source.sha256"),
            byte_exact=bool(source.get("byte_exact")),
            producer=str(doc.get("producer", "")),
            level=int(doc.get("level", 0)) if isinstance(doc.get("level", 0), int) else 0,
        )
        for i, item in enumerate(externals):
            what = f"source.external_files[{i}]"
            check.is_dict(item, what)
            location = check.text(item.get("location"), what + ".location")
            if not is_safe_location(location):
                raise InputError(
                    f"{where}: external data file name {location!r} is not a safe relative path "
                    f"(expected at most {MAX_LOCATION_DEPTH} names joined by '/', with no '..', '.', "
                    "absolute path or backslash)"
                )
            manifest.external_files.append(
                ExternalFile(location, check.size(item.get("size"), what + ".size"),
                             check.sha(item.get("sha256"), what + ".sha256"))
            )
        locations = {f.location: f.size for f in manifest.external_files}
        folders = {loc.rsplit("/", i)[0] for loc in locations for i in range(1, loc.count("/") + 1)}
        if len(locations) != len(manifest.external_files) or folders & set(locations):
            raise InputError(
                f"{where}: source.external_files names a file twice, or names a file that is "
                "also the folder of another"
            )
        for i, item in enumerate(tensors):
            manifest.tensors.append(check.tensor(item, i, locations))
        return manifest


def _entry_json(entry: TensorEntry) -> dict[str, Any]:
    doc = {"name": entry.name, "dtype": entry.dtype, "shape": entry.shape, "codec": entry.codec}
    doc |= {k: v for k, v in asdict(entry).items() if k not in doc and k != "external"}
    if entry.external is not None:
        doc["external"] = asdict(entry.external)
    return doc


class _Checker:
    """Type checks for manifest fields, with errors that name the field.

    Each check takes the field's name in two parts, ``what`` and ``field``, joined only in
    an error: a manifest is checked before every session starts, and formatting every
    field's name up front cost more than the checks.
    """

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str, expected: str, value: object) -> InputError:
        return InputError(f"{self.where}: manifest field {what} must be {expected}, got {value!r}")

    def is_dict(self, value: object, what: str, field: str = "") -> dict[str, Any]:
        if type(value) is not dict:
            raise self.fail(what + field, "an object", type(value).__name__)
        return value

    def is_list(self, value: object, what: str, field: str = "") -> list[Any]:
        if type(value) is not list:
            raise self.fail(what + field, "a list", type(value).__name__)
        return value

    def size(self, value: object, what: str, field: str = "") -> int:
        if type(value) is not int or value < 0:  # bool is not int here
            raise self.fail(what + field, "a non-negative integer", value)
        return value

    def sha(self, value: object, what: str, field: str = "") -> str:
        if type(value) is not str or not _SHA_RE.fullmatch(value):
            raise self.fail(what + field, "64 lower-case hex digits", value)
        return value

    def text(self, value: object, what: str, field: str = "") -> str:
        if type(value) is not str:
            raise self.fail(what + field, "a string", value)
        return value

    def tensor(self, item: object, i: int, locations: dict[str, int]) -> TensorEntry:
        item = self.is_dict(item, f"tensors[{i}]")
        name = self.text(item.get("name", ""), f"tensors[{i}]", ".name")
        what = f"tensors[{i}] ('{name}')"
        dtype = self.text(item.get("dtype"), what, ".dtype")
        data_type = _DATA_TYPES.get(dtype)
        if data_type is None:
            raise self.fail(what + ".dtype", "an ONNX data type name", dtype)
        shape = self.is_list(item.get("shape"), what, ".shape")
        for dim in shape:
            self.size(dim, what, ".shape")
        raw_size = self.size(item.get("raw_size"), what, ".raw_size")
        expected = expected_raw_size(data_type, shape)
        if expected is None or expected != raw_size:
            raise InputError(
                f"{self.where}: tensor '{name}' declares {raw_size} raw bytes, but {dtype} "
                f"{shape} holds {expected}"
            )
        member = self.text(item.get("member"), what, ".member")
        if not _MEMBER_RE.match(member):
            raise self.fail(what + ".member", "a member name like t/000001.bin", member)
        coded_size = self.size(item.get("coded_size"), what, ".coded_size")
        chunks = []
        for j, chunk in enumerate(self.is_list(item.get("chunks"), what, ".chunks")):
            where = f"{what}.chunks[{j}]"
            chunk = self.is_dict(chunk, where)
            params = self.is_dict(chunk.get("params", {}), where, ".params")
            for key, value in params.items():
                self.size(value, where, f".params.{key}")
            chunks.append(Chunk(
                codec=self.text(chunk.get("codec"), where, ".codec"),
                params=dict(params),
                raw_size=self.size(chunk.get("raw_size"), where, ".raw_size"),
                coded_size=self.size(chunk.get("coded_size"), where, ".coded_size"),
                sha256=self.sha(chunk.get("sha256"), where, ".sha256"),
            ))
        if sum(c.raw_size for c in chunks) != raw_size or sum(c.coded_size for c in chunks) != coded_size:
            raise InputError(
                f"{self.where}: tensor '{name}': its chunks do not add up to its raw_size "
                f"{raw_size} and coded_size {coded_size}"
            )
        tensor_sha = self.sha(item.get("sha256"), what, ".sha256")
        if len(chunks) == 1 and chunks[0].sha256 != tensor_sha:
            raise InputError(f"{self.where}: tensor '{name}': its one chunk's sha256 differs from its own")
        external = None
        if item.get("external") is not None:
            ext = self.is_dict(item["external"], what, ".external")
            location = self.text(ext.get("location"), what, ".external.location")
            if location not in locations:
                raise self.fail(what + ".external.location", "one of source.external_files", location)
            external = ExternalRef(
                location,
                self.size(ext.get("offset"), what, ".external.offset"),
                self.size(ext.get("length"), what, ".external.length"),
            )
            if external.length != raw_size or external.offset + external.length > locations[location]:
                raise InputError(
                    f"{self.where}: tensor '{name}': its external bytes {external.offset}.."
                    f"{external.offset + external.length} must be its {raw_size} raw bytes inside "
                    f"'{location}', a {locations[location]}-byte file"
                )
        return TensorEntry(
            name=name,
            dtype=dtype,
            shape=list(shape),
            raw_size=raw_size,
            coded_size=coded_size,
            sha256=tensor_sha,
            member=member,
            chunks=chunks,
            external=external,
        )


#: ONNX data type names (``FLOAT``, ``INT4``, ...) and their ``TensorProto.DataType`` values.
_DATA_TYPES: dict[str, int] = dict(onnx.TensorProto.DataType.items())
_SHA_RE = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------
# walking TensorProtos and the markers


def iter_tensor_protos(message: Any, *, every_field: bool = False) -> list[onnx.TensorProto]:
    """Every TensorProto anywhere inside a protobuf message, in field order.

    Covers initializers, sparse initializers, tensor attributes, subgraphs, functions and
    training info without naming them: the message types are walked through the fields that
    can lead to a TensorProto (worked out once per type from the descriptors), so value
    infos, type protos and the like are skipped.

    An attribute is read as ONNX defines it and onnxruntime reads it: through the one field
    its ``type`` names (every field when the type is unset), so an int or string attribute
    is not looked into. This is the walk that packing and every reader use, and it is cheap
    enough to run before each session starts (looking at all six tensor fields of every
    attribute cost 0.2 ms on the 9-node digits CNN, a tenth of its session start).
    ``every_field`` looks into every field of every attribute instead: the check that a
    graph refers to no file looks there too.
    """
    found: list[onnx.TensorProto] = []
    _collect(message, found, every_field)
    return found


_A = onnx.AttributeProto
#: Attribute types that hold no tensor.
_PLAIN_ATTRIBUTES = frozenset(
    (_A.INT, _A.INTS, _A.FLOAT, _A.FLOATS, _A.STRING, _A.STRINGS, _A.TYPE_PROTO, _A.TYPE_PROTOS)
)
#: The field each tensor-holding attribute type keeps its value in, and whether it repeats.
_ATTRIBUTE_FIELDS: dict[int, tuple[tuple[str, bool]]] = {
    _A.TENSOR: (("t", False),),
    _A.TENSORS: (("tensors", True),),
    _A.GRAPH: (("g", False),),
    _A.GRAPHS: (("graphs", True),),
    _A.SPARSE_TENSOR: (("sparse_tensor", False),),
    _A.SPARSE_TENSORS: (("sparse_tensors", True),),
}


def _collect(message: Any, found: list[onnx.TensorProto], every_field: bool) -> None:
    paths = None
    if type(message) is onnx.AttributeProto and not every_field:
        kind = message.type
        if kind in _PLAIN_ATTRIBUTES:
            return
        paths = _ATTRIBUTE_FIELDS.get(kind)
        every_field = paths is None  # unset (or a type newer than this reader): every field
    for name, repeated in paths or _tensor_paths(message.DESCRIPTOR):
        if repeated:
            items = getattr(message, name)
            if not items:  # far cheaper than iterating an empty repeated field
                continue
        elif message.HasField(name):
            items = (getattr(message, name),)
        else:
            continue
        for item in items:
            if type(item) is onnx.TensorProto:
                found.append(item)
            else:
                _collect(item, found, every_field)


_PATHS: dict[str, tuple[tuple[str, bool], ...]] = {}


def _tensor_paths(descriptor: Any) -> tuple[tuple[str, bool], ...]:
    """The message fields of ``descriptor`` that hold or can lead to a TensorProto.

    Worked out once per process for every type reachable from the first message walked
    (one pass over the type graph, not one per type: this runs before each session starts).
    """
    cached = _PATHS.get(descriptor.full_name)
    if cached is not None:
        return cached
    children: dict[str, list[Any]] = {}  # type name -> its message-typed fields
    stack = [descriptor]
    while stack:
        current = stack.pop()
        if current.full_name in children:
            continue
        children[current.full_name] = [f for f in current.fields if f.type == f.TYPE_MESSAGE]
        stack.extend(f.message_type for f in children[current.full_name])
    good = {onnx.TensorProto.DESCRIPTOR.full_name}  # the types that can hold a TensorProto
    changed = True
    while changed:
        changed = False
        for name, fields in children.items():
            if name not in good and any(f.message_type.full_name in good for f in fields):
                good.add(name)
                changed = True
    for name, fields in children.items():
        _PATHS.setdefault(
            name, tuple((f.name, f.is_repeated) for f in fields if f.message_type.full_name in good)
        )
    return _PATHS[descriptor.full_name]


def has_marker(tensor: onnx.TensorProto) -> bool:
    """True when a tensor's last ``external_data`` entry is a marker (its index unchecked)."""
    return bool(tensor.external_data) and tensor.external_data[-1].key == MARKER_KEY


def marker_index(tensor: onnx.TensorProto) -> int | None:
    """The manifest index a stripped tensor points at, or None for an ordinary tensor."""
    if has_marker(tensor):
        value = tensor.external_data[-1].value
        if value.isdigit():
            return int(value)
        raise ValueError(f"tensor '{tensor.name}' has a malformed {MARKER_KEY} entry {value!r}")
    return None


def add_marker(tensor: onnx.TensorProto, index: int) -> None:
    entry = tensor.external_data.add()
    entry.key = MARKER_KEY
    entry.value = str(index)


def pop_marker(tensor: onnx.TensorProto) -> None:
    del tensor.external_data[-1]


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """The ``external_data`` entries of a tensor as a dict (marker excluded)."""
    return {e.key: e.value for e in tensor.external_data if e.key != MARKER_KEY}
