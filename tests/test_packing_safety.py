"""Reading hostile ``.onnxz`` files: corrupt, truncated, bombs, sha mismatches, unsafe names."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
import zstandard

import onnxpress
from onnxpress.cli import main
from onnxpress.errors import InputError
from onnxpress.packing import Limits, PackedModel, load_model_proto, pack, unpack
from onnxpress.packing.format import ZIP_DATE_TIME


@pytest.fixture
def packed(tmp_path: Path, rng: np.random.Generator) -> Path:
    """A packed two-layer model with fresh random weights."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 32] x) => (float[N, 16] y) {
        h = MatMul(x, w1)
        r = Relu(h)
        y = MatMul(r, w2)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend([
        onh.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
        onh.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w2"),
    ])
    onnx.checker.check_model(model)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    out = tmp_path / "m.onnxz"
    pack(src, out)
    return out


def _rewrite(
    src: Path,
    dst: Path,
    manifest: Callable[[dict], None] | None = None,
    members: Callable[[dict[str, bytes]], None] | None = None,
) -> Path:
    """Copies a container, letting the test edit the manifest and the members."""
    with zipfile.ZipFile(src) as archive:
        content = {name: archive.read(name) for name in archive.namelist()}
    if manifest is not None:
        doc = json.loads(content["manifest.json"])
        manifest(doc)
        content["manifest.json"] = json.dumps(doc).encode()
    if members is not None:
        members(content)
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, payload in content.items():
            archive.writestr(zipfile.ZipInfo(name, ZIP_DATE_TIME), payload)
    return dst


def _entry(doc: dict, name: str) -> dict:
    return next(t for t in doc["tensors"] if t["name"] == name)


def _member_span(path: Path, name: str) -> tuple[int, int]:
    """Where a member's bytes lie in the file."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    data = path.read_bytes()
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    start += int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    return start, start + info.compress_size


def _member_of(path: Path, tensor: str) -> str:
    with PackedModel(path) as container:
        return next(t.member for t in container.manifest.tensors if t.name == tensor)


def _all_readers(path: Path, tmp_path: Path) -> list[Callable[[], object]]:
    return [
        lambda: load_model_proto(path),
        lambda: onnxpress.load_session(path),
        lambda: unpack(path, tmp_path / "out.onnx", force=True),
    ]


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("chunked", [False, True])
def test_corrupt_tensor_bytes_are_reported_with_the_tensor(
    packed: Path, tmp_path: Path, where: float, chunked: bool
) -> None:
    if chunked:
        packed = tmp_path / "chunked.onnxz"
        pack(tmp_path / "m.onnx", packed, chunk_bytes=1024)
        with PackedModel(packed) as container:
            assert len(container.manifest.tensors[0].chunks) == 8
    member = _member_of(packed, "w1")
    start, end = _member_span(packed, member)
    data = bytearray(packed.read_bytes())
    pos = start + int((end - start) * where)
    data[pos] ^= 0xFF
    bad = tmp_path / "corrupt.onnxz"
    bad.write_bytes(bytes(data))
    for read in _all_readers(bad, tmp_path):
        with pytest.raises(InputError, match="tensor 'w1'"):
            read()
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_file_names_the_tensor_it_cuts(packed: Path, tmp_path: Path) -> None:
    member = _member_of(packed, "w2")
    start, end = _member_span(packed, member)
    bad = tmp_path / "truncated.onnxz"
    bad.write_bytes(packed.read_bytes()[: (start + end) // 2])
    for read in _all_readers(bad, tmp_path):
        with pytest.raises(InputError, match=r"truncated inside tensor 'w2'"):
            read()


def test_corrupt_manifest_byte_is_caught_by_its_crc(packed: Path, tmp_path: Path) -> None:
    """A flipped digit in a size still parses as JSON; the ZIP CRC-32 is the manifest's check."""
    start, end = _member_span(packed, "manifest.json")
    data = bytearray(packed.read_bytes())
    pos = data.index(b'"raw_size":', start) + len(b'"raw_size":')
    assert pos < end  # a digit of the manifest's own bytes
    data[pos] = ord("9") if data[pos] != ord("9") else ord("8")
    bad = tmp_path / "manifest.onnxz"
    bad.write_bytes(bytes(data))
    for read in _all_readers(bad, tmp_path):
        with pytest.raises(InputError, match=r"the manifest is corrupt \(member 'manifest.json': its CRC-32"):
            read()


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_path_that_is_not_a_file_is_refused_without_waiting(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.onnxz"
    if kind == "folder":
        path.mkdir()
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        os.mkfifo(path)  # opening it without O_NONBLOCK would wait for a writer forever
    with pytest.raises(InputError, match="no such file"):
        PackedModel(path)


@pytest.mark.parametrize("keep", [0, 10, 100])
def test_truncated_header_or_empty_file_is_a_clear_error(packed: Path, tmp_path: Path, keep: int) -> None:
    bad = tmp_path / "cut.onnxz"
    bad.write_bytes(packed.read_bytes()[:keep])
    with pytest.raises(InputError, match="empty|truncated|not an .onnxz"):
        load_model_proto(bad)


def test_sha_mismatch_is_refused(packed: Path, tmp_path: Path) -> None:
    def wrong_sha(doc: dict) -> None:
        entry = _entry(doc, "w2")
        entry["sha256"] = entry["chunks"][0]["sha256"] = "0" * 64

    bad = _rewrite(packed, tmp_path / "sha.onnxz", manifest=wrong_sha)
    for read in _all_readers(bad, tmp_path):
        with pytest.raises(InputError, match="tensor 'w2'.*sha256 mismatch"):
            read()


def test_one_wrong_chunk_digest_is_refused_by_every_reader(packed: Path, tmp_path: Path) -> None:
    """A session checks digests while onnxruntime builds it; it must still refuse the file."""
    chunked = tmp_path / "chunked.onnxz"
    pack(tmp_path / "m.onnx", chunked, chunk_bytes=1024)

    def wrong_chunk(doc: dict) -> None:
        _entry(doc, "w1")["chunks"][5]["sha256"] = "0" * 64

    bad = _rewrite(chunked, tmp_path / "chunk-sha.onnxz", manifest=wrong_chunk)
    for read in _all_readers(bad, tmp_path):
        with pytest.raises(InputError, match=r"tensor 'w1' \(member '[^']+', chunk 5\): sha256 mismatch"):
            read()
    assert not (tmp_path / "out.onnx").exists()


def test_graph_sha_mismatch_is_refused(packed: Path, tmp_path: Path) -> None:
    def wrong_sha(doc: dict) -> None:
        doc["graph"]["sha256"] = "f" * 64

    bad = _rewrite(packed, tmp_path / "gsha.onnxz", manifest=wrong_sha)
    with pytest.raises(InputError, match="graph's sha256"):
        load_model_proto(bad)


def test_zeros_bomb_is_refused_until_the_limit_is_raised(tmp_path: Path) -> None:
    zeros = np.zeros((2048, 1024), dtype=np.float32)  # 8 MiB that codes to a few hundred bytes
    graph = oh.make_graph([], "g", [], [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, zeros.shape)],
                          initializer=[onh.from_array(zeros, "z")])
    src = tmp_path / "zeros.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), src)
    bomb = tmp_path / "zeros.onnxz"
    pack(src, bomb)
    assert bomb.stat().st_size * 1000 < zeros.nbytes
    with pytest.raises(InputError, match="decompression bomb.*--max-ratio"):
        load_model_proto(bomb)
    restored = load_model_proto(bomb, limits=Limits(max_ratio=1e6))
    assert restored.graph.initializer[0].raw_data == zeros.tobytes()
    out = tmp_path / "zeros.again.onnx"
    assert main(["unpack", str(bomb), "-o", str(out)]) == 2
    assert not out.exists()
    assert main(["unpack", str(bomb), "-o", str(out), "--max-ratio", "1e6"]) == 0
    assert out.read_bytes() == src.read_bytes()


def test_declared_size_over_the_limit_is_refused_before_decoding(packed: Path, tmp_path: Path) -> None:
    def huge(doc: dict) -> None:
        entry = _entry(doc, "w1")
        entry["shape"] = [1 << 20, 1 << 20]
        entry["raw_size"] = entry["chunks"][0]["raw_size"] = 4 << 40

    bad = _rewrite(packed, tmp_path / "huge.onnxz", manifest=huge)
    with pytest.raises(InputError, match="over the limit"):
        PackedModel(bad)
    with pytest.raises(InputError, match="over the limit"):
        PackedModel(packed, limits=Limits(max_total_bytes=1024))


def test_frame_larger_than_declared_is_refused(packed: Path, tmp_path: Path) -> None:
    member = _member_of(packed, "w2")
    frame = zstandard.ZstdCompressor().compress(bytes(64 * 16 * 4 * 100))

    def swap(members: dict[str, bytes]) -> None:
        members[member] = frame

    def declare(doc: dict) -> None:
        entry = _entry(doc, "w2")
        entry["coded_size"] = len(frame)
        entry["chunks"] = [{"codec": "zstd", "params": {}, "raw_size": 4096, "coded_size": len(frame),
                            "sha256": entry["sha256"]}]

    bad = _rewrite(packed, tmp_path / "frame.onnxz", manifest=declare, members=swap)
    with pytest.raises(InputError, match="tensor 'w2'.*declares 409600 bytes, expected 4096"):
        load_model_proto(bad)


def test_raw_size_must_match_dtype_and_shape(packed: Path, tmp_path: Path) -> None:
    def lie(doc: dict) -> None:
        _entry(doc, "w1")["raw_size"] += 4

    bad = _rewrite(packed, tmp_path / "lie.onnxz", manifest=lie)
    with pytest.raises(InputError, match="tensor 'w1' declares .* raw bytes"):
        PackedModel(bad)


@pytest.mark.parametrize("member", ["../../evil.bin", "/etc/passwd", "t/../../x.bin", "C:\\x.bin"])
def test_member_names_that_look_like_paths_are_refused(packed: Path, tmp_path: Path, member: str) -> None:
    def evil(doc: dict) -> None:
        _entry(doc, "w1")["member"] = member

    bad = _rewrite(packed, tmp_path / "evil.onnxz", manifest=evil)
    with pytest.raises(InputError, match="member"):
        PackedModel(bad)


@pytest.mark.parametrize(
    "location", ["../weights.data", "/tmp/weights.data", "sub/../w.data", "sub\\w.data", "C:w.data", "..", "a//b"]
)
def test_unsafe_external_file_names_are_refused(packed: Path, tmp_path: Path, location: str) -> None:
    def evil(doc: dict) -> None:
        doc["source"]["external_files"] = [{"location": location, "size": 10, "sha256": "0" * 64}]

    bad = _rewrite(packed, tmp_path / "evil.onnxz", manifest=evil)
    with pytest.raises(InputError, match="not a safe relative path"):
        unpack(bad, tmp_path / "out.onnx")
    assert list(tmp_path.glob("out*")) == []


def test_chunks_must_add_up(packed: Path, tmp_path: Path) -> None:
    def split(doc: dict) -> None:
        chunk = _entry(doc, "w1")["chunks"][0]
        chunk["raw_size"] -= 8

    bad = _rewrite(packed, tmp_path / "chunks.onnxz", manifest=split)
    with pytest.raises(InputError, match="tensor 'w1': its chunks do not add up"):
        PackedModel(bad)


def test_unknown_codec_and_version_are_named(packed: Path, tmp_path: Path) -> None:
    def codec(doc: dict) -> None:
        _entry(doc, "w2")["chunks"][0]["codec"] = "brotli"

    bad = _rewrite(packed, tmp_path / "codec.onnxz", manifest=codec)
    with pytest.raises(InputError, match="tensor 'w2'.*unknown codec 'brotli'"):
        load_model_proto(bad)

    def version(doc: dict) -> None:
        doc["version"] = 99

    bad = _rewrite(packed, tmp_path / "version.onnxz", manifest=version)
    with pytest.raises(InputError, match="format version 99"):
        PackedModel(bad)


def test_existing_outputs_are_not_overwritten(packed: Path, tmp_path: Path) -> None:
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists"):
        unpack(packed, out)
    assert out.read_bytes() == b"precious"
    with pytest.raises(InputError, match="already exists"):
        pack(tmp_path / "m.onnx", packed)
    with pytest.raises(InputError, match="already a packed"):
        pack(packed, tmp_path / "again.onnxz")


def test_member_names_read_as_utf8_and_undecodable_names_are_refused(packed: Path, tmp_path: Path) -> None:
    """Member names are decoded as UTF-8 (the format's names are ASCII, which cp437 reads alike);
    a name whose bytes are not UTF-8 gives an error naming the file, not a UnicodeDecodeError."""
    with PackedModel(packed) as container:  # the reference writer's names, without the UTF-8 flag
        assert not any(info.flag_bits & 0x800 for info in container.zip.infolist())
        assert container.zip.getinfo("manifest.json").filename == "manifest.json"
    data = bytearray(packed.read_bytes())
    name = b"graph.pb.zst"
    inside_manifest = range(*_member_span(packed, "manifest.json"))
    at = [i for i in range(len(data)) if data.startswith(name, i) and i not in inside_manifest]
    assert len(at) == 2  # the local header and the central directory
    for i in at:
        data[i] = 0x81  # not a UTF-8 start byte (cp437 reads it as "ü")
    bad = tmp_path / "bad-name.onnxz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="bad-name.onnxz: a ZIP member name is not ASCII or UTF-8"):
        PackedModel(bad)
    with pytest.raises(InputError, match="bad-name.onnxz"):
        onnxpress.load_session(bad)


def test_element_sizes_agree_with_onnx_ir() -> None:
    """Declared sizes are checked with format's own table of element widths (readers do not
    import onnx-ir); it must give what onnx-ir gives for every type onnx defines."""
    import onnx_ir as ir

    from onnxpress.packing.format import dtype_bits

    for name, value in onnx.TensorProto.DataType.items():
        try:
            expected = ir.DataType(value).bitwidth
        except (TypeError, ValueError):
            expected = None
        assert dtype_bits(value) == expected, name
