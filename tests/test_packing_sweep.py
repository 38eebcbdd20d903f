"""A bug sweep of ``.onnxz`` on models nobody wrote it for, and hostile containers.

Every model of a small corpus of unusual graphs (tensors in subgraphs, node attributes and
functions, sparse initializers, every odd dtype, metadata, unicode names, external-data
layouts) goes through ``pack`` -> ``unpack`` (bit-exact files) and ``load_session`` (bit-exact
outputs, in memory and on the streaming path). The regression tests below each failed
before the fix they name.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort
import pytest
import zstandard
from onnx import TensorProto as TP
from onnx.external_data_helper import set_external_data

import onnxpress
from onnxpress.cli import main
from onnxpress.errors import InputError
from onnxpress.packing import PackedModel, load_model_proto, pack, packed_session, unpack
from onnxpress.packing.format import ZIP_DATE_TIME
from onnxpress.sessions import session_options
from conftest import assert_bit_identical

OPSET = [oh.make_opsetid("", 21)]


def _f32(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return onh.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _vi(name: str, shape: list[int], dtype: int = TP.FLOAT) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, dtype, shape)


# ---------------------------------------------------------------------------------------
# the corpus: each builder returns a model whose only input (if any) is float "x"


def _if_same_names(rng: np.random.Generator) -> onnx.ModelProto:
    """``w`` in the main graph and a different ``w`` in each If branch."""
    then = oh.make_graph([oh.make_node("Add", ["x", "w"], ["y"])], "then", [], [_vi("y", [32, 32])], [_f32(rng, "w", 32, 32)])
    other = oh.make_graph([oh.make_node("Sub", ["x", "w"], ["y"])], "else", [], [_vi("y", [32, 32])], [_f32(rng, "w", 32, 32)])
    graph = oh.make_graph(
        [
            oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            oh.make_node("Greater", ["s", "zero"], ["c"]),
            oh.make_node("If", ["c"], ["y0"], then_branch=then, else_branch=other),
            oh.make_node("Add", ["y0", "w"], ["y"]),
        ],
        "g", [_vi("x", [32, 32])], [_vi("y", [32, 32])],
        [_f32(rng, "w", 32, 32), onh.from_array(np.array(0, np.float32), "zero")],
    )
    return oh.make_model(graph, opset_imports=OPSET)


def _loop_body_tensor(rng: np.random.Generator) -> onnx.ModelProto:
    body = oh.make_graph(
        [oh.make_node("Add", ["acc", "lw"], ["acc2"]), oh.make_node("Identity", ["cond"], ["cond2"])],
        "body", [_vi("i", [], TP.INT64), _vi("cond", [], TP.BOOL), _vi("acc", [16, 16])],
        [_vi("cond2", [], TP.BOOL), _vi("acc2", [16, 16])], [_f32(rng, "lw", 16, 16)],
    )
    graph = oh.make_graph(
        [oh.make_node("Loop", ["n", "t", "x"], ["y"], body=body)], "g", [_vi("x", [16, 16])], [_vi("y", [16, 16])],
        [onh.from_array(np.array(3, np.int64), "n"), onh.from_array(np.array(True), "t")],
    )
    return oh.make_model(graph, opset_imports=OPSET)


def _constant_in_function(rng: np.random.Generator) -> onnx.ModelProto:
    """A Constant node's tensor attribute, once in the main graph and once in a local function."""
    fn = oh.make_function(
        "local", "AddC", ["a"], ["b"],
        [oh.make_node("Constant", [], ["c"], value=_f32(rng, "fc", 24, 24)), oh.make_node("Add", ["a", "c"], ["b"])],
        OPSET,
    )
    graph = oh.make_graph(
        [
            oh.make_node("Constant", [], ["k"], value=_f32(rng, "kc", 24, 24)),
            oh.make_node("Add", ["x", "k"], ["t"]),
            oh.make_node("AddC", ["t"], ["y"], domain="local"),
        ],
        "g", [_vi("x", [24, 24])], [_vi("y", [24, 24])],
    )
    return oh.make_model(graph, opset_imports=[*OPSET, oh.make_opsetid("local", 1)], functions=[fn])


def _sparse_and_duplicates(rng: np.random.Generator) -> onnx.ModelProto:
    """A sparse initializer, two identical tensors, and an overridable initializer."""
    values = onh.from_array(rng.standard_normal(600).astype(np.float32), "sp")
    indices = onh.from_array(np.sort(rng.choice(40 * 40, 600, replace=False)).astype(np.int64), "sp_idx")
    same = rng.standard_normal((40, 40)).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("Add", ["x", "sp"], ["t"]),
            oh.make_node("Add", ["t", "a"], ["t2"]),
            oh.make_node("Add", ["t2", "b"], ["t3"]),
            oh.make_node("Add", ["t3", "w"], ["y"]),
        ],
        "g", [_vi("x", [40, 40]), _vi("w", [40, 40])], [_vi("y", [40, 40])],
        [onh.from_array(same, "a"), onh.from_array(same, "b"), _f32(rng, "w", 40, 40)],
        sparse_initializer=[oh.make_sparse_tensor(values, indices, [40, 40])],
    )
    return oh.make_model(graph, opset_imports=OPSET)


def _metadata_and_names(rng: np.random.Generator) -> onnx.ModelProto:
    """Doc strings, metadata_props, training_info, and a long unicode name with a slash."""
    name = "ü" * 300 + "/../weird name"
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", name], ["y"])], "g", [_vi("x", [32, 32])], [_vi("y", [32, 32])],
        [_f32(rng, name, 32, 32)], doc_string="graph doc",
    )
    model = oh.make_model(graph, opset_imports=OPSET, doc_string="model doc ✓")
    oh.set_model_props(model, {"a": "1", "ü": "é"})
    info = model.training_info.add()
    info.initialization.CopyFrom(oh.make_graph([], "init", [], [], [_f32(rng, "train_w", 32, 32)]))
    return model


def _pack4(values: np.ndarray) -> bytes:
    nibbles = values.astype(np.int8).view(np.uint8) & 0xF
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, 0)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def _odd_dtypes(rng: np.random.Generator) -> onnx.ModelProto:
    """bfloat16, float8 (two kinds), int4/uint4 (odd count), bool, scalar, zero-size, string.

    Each is cast to float (or passed through) so onnxruntime can return it.
    """
    raw = [
        ("bf", TP.BFLOAT16, rng.standard_normal(3000).astype(ml_dtypes.bfloat16).tobytes(), [3000]),
        ("f8", TP.FLOAT8E4M3FN, rng.standard_normal(5000).astype(ml_dtypes.float8_e4m3fn).tobytes(), [5000]),
        ("f8b", TP.FLOAT8E5M2, rng.standard_normal(5000).astype(ml_dtypes.float8_e5m2).tobytes(), [5000]),
        ("i4", TP.INT4, _pack4(rng.integers(-8, 8, 9001)), [9001]),
        ("u4", TP.UINT4, _pack4(rng.integers(0, 16, 9001)), [9001]),
    ]
    inits = [oh.make_tensor(n, dt, shape, data, raw=True) for n, dt, data, shape in raw]
    inits += [
        onh.from_array(rng.random(5000) > 0.5, "b"),
        onh.from_array(np.array(3.5, np.float32), "s"),
        onh.from_array(np.zeros((0, 5), np.float32), "z"),
        onh.from_array(rng.standard_normal(4000).astype(np.float16), "h"),
        oh.make_tensor("str", TP.STRING, [3], [b"a", b"bb", "ü".encode()]),
    ]
    nodes = [oh.make_node("Cast", [n], [n + "_o"], to=TP.FLOAT) for n in ("bf", "f8", "f8b", "i4", "u4", "b", "h")]
    nodes += [oh.make_node("Identity", [n], [n + "_o"]) for n in ("s", "z", "str")]
    outputs = [_vi(n + "_o", [t.dims[0]]) for n, t in zip(("bf", "f8", "f8b", "i4", "u4", "b", "h"), [*inits[:6], inits[8]])]
    outputs += [_vi("s_o", []), _vi("z_o", [0, 5]), _vi("str_o", [3], TP.STRING)]
    graph = oh.make_graph(nodes, "g", [], outputs, inits)
    return oh.make_model(graph, opset_imports=OPSET)


def _scan_and_sparse_constant(rng: np.random.Generator) -> onnx.ModelProto:
    """A Constant with a ``sparse_value`` attribute, and a tensor in a Scan body."""
    values = onh.from_array(rng.standard_normal(500).astype(np.float32), "v")
    indices = onh.from_array(np.sort(rng.choice(2500, 500, replace=False)).astype(np.int64), "i")
    body = oh.make_graph(
        [oh.make_node("Add", ["s_in", "x_t"], ["s_out"]), oh.make_node("Add", ["x_t", "sw"], ["y_t"])],
        "body", [_vi("s_in", [50]), _vi("x_t", [50])], [_vi("s_out", [50]), _vi("y_t", [50])],
        [_f32(rng, "sw", 50)],
    )
    graph = oh.make_graph(
        [
            oh.make_node("Constant", [], ["c"], sparse_value=oh.make_sparse_tensor(values, indices, [50, 50])),
            oh.make_node("Add", ["x", "c"], ["t"]),
            oh.make_node("Scan", ["s0", "t"], ["sf", "ys"], body=body, num_scan_inputs=1),
        ],
        "g", [_vi("x", [50, 50])], [_vi("sf", [50]), _vi("ys", [50, 50])],
        [onh.from_array(np.zeros(50, np.float32), "s0")],
    )
    return oh.make_model(graph, opset_imports=OPSET)


CORPUS: dict[str, Callable[[np.random.Generator], onnx.ModelProto]] = {
    "scan_and_sparse_constant": _scan_and_sparse_constant,
    "if_same_names": _if_same_names,
    "loop_body": _loop_body_tensor,
    "constant_in_function": _constant_in_function,
    "sparse_and_duplicates": _sparse_and_duplicates,
    "metadata_and_names": _metadata_and_names,
    "odd_dtypes": _odd_dtypes,
}


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in model.graph.input
    }


def _assert_same(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    strings = [e.dtype == object for e in expected]
    assert_bit_identical([e for e, s in zip(expected, strings) if not s], [a for a, s in zip(actual, strings) if not s])
    for e, a, s in zip(expected, actual, strings):
        if s:
            assert e.tolist() == a.tolist()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_round_trips_and_runs_bit_exact(name: str, tmp_path: Path, rng: np.random.Generator) -> None:
    model = CORPUS[name](rng)
    onnx.checker.check_model(model)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    packed = tmp_path / "m.onnxz"
    report = pack(src, packed, min_bytes=16, chunk_bytes=1024)
    assert report.byte_exact and report.tensors >= 1
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    unpack(packed, out)
    assert out.read_bytes() == src.read_bytes()
    assert load_model_proto(packed) == model
    feeds = _feeds(model, rng)
    expected = onnxpress.load_session(src).run(None, feeds)
    _assert_same(expected, onnxpress.load_session(packed).run(None, feeds))
    streamed = packed_session(packed, session_options(), ["CPUExecutionProvider"], inline_limit=0)
    _assert_same(expected, streamed.run(None, feeds))


def test_overridable_initializer_can_still_be_fed(tmp_path: Path, rng: np.random.Generator) -> None:
    model = _sparse_and_duplicates(rng)
    src, packed = tmp_path / "m.onnx", tmp_path / "m.onnxz"
    onnx.save(model, src)
    pack(src, packed, min_bytes=16)
    feeds = _feeds(model, rng)  # feeds "w", overriding the initializer
    expected = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert_bit_identical(expected, onnxpress.load_session(packed).run(None, feeds))


def test_cli_run_and_validate_take_a_corpus_onnxz(tmp_path: Path, rng: np.random.Generator) -> None:
    src, packed = tmp_path / "m.onnx", tmp_path / "m.onnxz"
    onnx.save(_constant_in_function(rng), src)
    assert main(["pack", str(src), "-o", str(packed), "--min-bytes", "16", "--no-progress"]) == 0
    assert main(["validate", str(src), str(packed), "--no-speed", "--no-progress", "--samples", "4"]) == 0


# ---------------------------------------------------------------------------------------
# external-data layouts


def _external_model(
    folder: Path, layout: list[tuple[str, str, int]], rng: np.random.Generator, trailer: bytes = b""
) -> Path:
    """A chain of Adds whose weights live in external data at the given (name, location,
    offset); the files are written by hand, so locations and offsets are exactly as given."""
    files: dict[str, bytearray] = {}
    inits, nodes, prev = [], [], "x"
    for name, location, offset in layout:
        tensor = _f32(rng, name, 16, 16)
        raw = tensor.raw_data
        set_external_data(tensor, location, offset, len(raw))
        tensor.ClearField("raw_data")
        buf = files.setdefault(location, bytearray())
        buf.extend(b"\0" * max(0, offset + len(raw) - len(buf)))
        buf[offset : offset + len(raw)] = raw
        inits.append(tensor)
        nodes.append(oh.make_node("Add", [prev, name], [name + "_o"]))
        prev = name + "_o"
    graph = oh.make_graph(nodes, "g", [_vi("x", [16, 16])], [_vi(prev, [16, 16])], inits)
    for location, buf in files.items():
        path = folder / location
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(buf) + trailer)
    src = folder / "m.onnx"
    src.write_bytes(oh.make_model(graph, opset_imports=OPSET).SerializeToString())
    return src


LAYOUTS = {
    "two_files": [("a", "a.bin", 0), ("b", "b.bin", 0)],
    "offsets_reversed": [("a", "w.bin", 4096), ("b", "w.bin", 0)],
    "shared_bytes": [("a", "w.bin", 0), ("b", "w.bin", 0)],
    "overlapping": [("a", "w.bin", 0), ("b", "w.bin", 512)],
    "unicode_and_space": [("a", "wü.bin", 0), ("b", "a b", 0)],
    "subfolder": [("a", "weights/w.bin", 0), ("b", "weights/deeper/b.bin", 64), ("c", "c.bin", 0)],
    # 252 UTF-8 bytes: unpack's temporary name once went past the 255-byte limit
    "long_unicode_name": [("a", "ü" * 124 + ".bin", 0)],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_external_layouts_round_trip_bit_exact(layout: str, tmp_path: Path, rng: np.random.Generator) -> None:
    src_dir = tmp_path / "src"
    src = _external_model(src_dir, LAYOUTS[layout], rng)
    packed = tmp_path / "m.onnxz"
    assert pack(src, packed).byte_exact
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    unpack(packed, out)
    sources = sorted(p.relative_to(src_dir) for p in src_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out.parent) for p in out.parent.rglob("*") if p.is_file()) == sources
    for rel in sources:
        assert (out.parent / rel).read_bytes() == (src_dir / rel).read_bytes(), rel
    feeds = {"x": rng.standard_normal((16, 16)).astype(np.float32)}
    expected = onnxpress.load_session(src).run(None, feeds)
    assert_bit_identical(expected, onnxpress.load_session(packed).run(None, feeds))
    assert_bit_identical(expected, onnxpress.load_session(out).run(None, feeds))


def test_model_saved_by_onnx_one_file_per_tensor_packs(tmp_path: Path, rng: np.random.Generator) -> None:
    """onnx names each file after its tensor: unicode and spaces are ordinary file names.

    Regression: the bare-name rule allowed only ASCII letters, digits, ``._-``.
    """
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "wü"], ["t"]), oh.make_node("Add", ["t", "a b"], ["y"])],
        "g", [_vi("x", [8, 8])], [_vi("y", [8, 8])], [_f32(rng, "wü", 8, 8), _f32(rng, "a b", 8, 8)],
    )
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save(oh.make_model(graph, opset_imports=OPSET), src, save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    packed = tmp_path / "m.onnxz"
    pack(src, packed)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    unpack(packed, out)
    for name in ("m.onnx", "wü", "a b"):
        assert (out.parent / name).read_bytes() == (src.parent / name).read_bytes()


def test_non_zero_bytes_between_tensors_are_not_claimed_byte_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    src = _external_model(tmp_path / "src", [("a", "w.bin", 0)], rng, trailer=b"not a tensor")
    packed = tmp_path / "m.onnxz"
    assert not pack(src, packed).byte_exact
    feeds = {"x": rng.standard_normal((16, 16)).astype(np.float32)}
    assert_bit_identical(onnxpress.load_session(src).run(None, feeds), onnxpress.load_session(packed).run(None, feeds))


@pytest.mark.parametrize("location", ["../w.bin", "/tmp/w.bin", "weights/../w.bin", "weights//w.bin", "./w.bin", "w\\x.bin"])
def test_unsafe_external_locations_are_refused_when_packing(location: str, tmp_path: Path, rng: np.random.Generator) -> None:
    src = _external_model(tmp_path / "a" / "src", [("a", "w.bin", 0)], rng)
    model = onnx.load(src, load_external_data=False)
    model.graph.initializer[0].external_data[0].value = location
    src.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"tensor 'a'.*external data"):
        pack(src, tmp_path / "m.onnxz")


def test_subfolder_symlink_out_of_the_model_folder_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    outside = tmp_path / "outside"
    _external_model(outside, [("a", "w.bin", 0)], rng)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "weights").symlink_to(outside)
    src = src_dir / "m.onnx"
    model = onnx.load(outside / "m.onnx", load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "weights/w.bin"
    src.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"tensor 'a'.*weights/w.bin.*symlink"):
        pack(src, tmp_path / "m.onnxz")


def test_unpack_into_a_symlinked_subfolder_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    src = _external_model(tmp_path / "src", [("a", "weights/w.bin", 0)], rng)
    packed = tmp_path / "m.onnxz"
    pack(src, packed)
    out_dir, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out_dir.mkdir()
    elsewhere.mkdir()
    (out_dir / "weights").symlink_to(elsewhere)
    with pytest.raises(InputError, match=r"weights.*symlink"):
        unpack(packed, out_dir / "m.onnx")
    assert not list(elsewhere.iterdir())


def test_pack_refuses_to_overwrite_the_models_own_external_data(tmp_path: Path, rng: np.random.Generator) -> None:
    """Regression: ``pack m.onnx -o w.bin --force`` replaced the weights it had just read."""
    src = _external_model(tmp_path, [("a", "w.bin", 0)], rng)
    before = (tmp_path / "w.bin").read_bytes()
    with pytest.raises(InputError, match=r"w.bin.*external data of the input model"):
        pack(src, tmp_path / "w.bin", force=True)
    assert (tmp_path / "w.bin").read_bytes() == before


def test_pack_force_replaces_and_self_pack_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_if_same_names(rng), src)
    packed = tmp_path / "m.onnxz"
    packed.write_bytes(b"old")
    with pytest.raises(InputError, match="already exists"):
        pack(src, packed)
    pack(src, packed, force=True)
    with PackedModel(packed) as container:
        assert container.manifest.tensors
    with pytest.raises(InputError, match="is the input model"):
        pack(src, src, force=True)
    with pytest.raises(InputError, match="input container"):
        unpack(packed, packed, force=True)
    unpack(packed, src, force=True)  # onto the source: the same bytes again
    assert load_model_proto(packed).SerializeToString() == src.read_bytes()


# ---------------------------------------------------------------------------------------
# hostile containers


def _rewrite(src: Path, dst: Path, edit: Callable[[dict, onnx.ModelProto], None]) -> Path:
    """Copies a container, letting ``edit`` change the manifest and the graph (re-hashed)."""
    with zipfile.ZipFile(src) as archive:
        content = {name: archive.read(name) for name in archive.namelist()}
    doc = json.loads(content["manifest.json"])
    graph = onnx.ModelProto.FromString(zstandard.ZstdDecompressor().decompress(content["graph.pb.zst"]))
    edit(doc, graph)
    raw = graph.SerializeToString()
    content["graph.pb.zst"] = zstandard.ZstdCompressor().compress(raw)
    doc["graph"].update(raw_size=len(raw), coded_size=len(content["graph.pb.zst"]), sha256=hashlib.sha256(raw).hexdigest())
    content["manifest.json"] = json.dumps(doc).encode()
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, payload in content.items():
            archive.writestr(zipfile.ZipInfo(name, ZIP_DATE_TIME), payload)
    return dst


def _readers(path: Path, tmp_path: Path) -> list[Callable[[], object]]:
    return [
        lambda: load_model_proto(path),
        lambda: onnxpress.load_session(path),
        lambda: unpack(path, tmp_path / "out.onnx", force=True),
    ]


@pytest.fixture
def external_packed(tmp_path: Path, rng: np.random.Generator) -> Path:
    src = _external_model(tmp_path / "src", [("a", "w.bin", 0), ("b", "w.bin", 1024)], rng)
    packed = tmp_path / "ext.onnxz"
    pack(src, packed)
    return packed


@pytest.mark.parametrize("where", ["initializer", "int attribute"])
def test_graph_cannot_make_a_reader_open_a_file(
    where: str, external_packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a graph tensor with an external reference and no marker made
    ``load_session`` read that file (relative to the working folder) into the model. The
    tensor is refused also where the walk that restores tensors does not look: set on an
    int attribute, beside its int."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET!!")
    monkeypatch.chdir(tmp_path)

    def leak(doc: dict, graph: onnx.ModelProto) -> None:
        tensor = onnx.TensorProto()
        tensor.name, tensor.data_type, tensor.dims[:], tensor.raw_data = "leak", TP.UINT8, [8], bytes(8)
        set_external_data(tensor, "secret.bin", 0, 8)  # sets data_location too
        tensor.ClearField("raw_data")
        if where == "initializer":
            graph.graph.initializer.add().CopyFrom(tensor)
            graph.graph.node.add().CopyFrom(oh.make_node("Identity", ["leak"], ["leak_o"]))
            graph.graph.output.add().CopyFrom(_vi("leak_o", [8], TP.UINT8))
        else:
            node = graph.graph.node.add()
            node.CopyFrom(oh.make_node("Flatten", [graph.graph.output[0].name], ["leak_o"], axis=0))
            node.attribute[0].t.CopyFrom(tensor)
            graph.graph.output.add().CopyFrom(_vi("leak_o", None))

    bad = _rewrite(external_packed, tmp_path / "leak.onnxz", leak)
    for read in _readers(bad, tmp_path):
        with pytest.raises(InputError, match=r"tensor 'leak'.*secret.bin"):
            read()


def test_graph_external_reference_must_match_the_manifest(external_packed: Path, tmp_path: Path) -> None:
    """Regression: unpack wrote a tensor's bytes to the manifest's file but kept the graph's
    reference, which could name any path (``../x``) the unpacked model would then read."""

    def redirect(doc: dict, graph: onnx.ModelProto) -> None:
        entry = next(e for e in graph.graph.initializer[0].external_data if e.key == "location")
        entry.value = "../elsewhere.bin"

    bad = _rewrite(external_packed, tmp_path / "redirect.onnxz", redirect)
    for read in _readers(bad, tmp_path):
        with pytest.raises(InputError, match=r"tensor 'a'.*does not match manifest entry"):
            read()


@pytest.mark.parametrize(
    "field,value",
    [("offset", 2**50), ("length", 5), ("offset", 1024 + 512)],
)
def test_external_bytes_must_lie_inside_the_declared_file(
    field: str, value: int, external_packed: Path, tmp_path: Path
) -> None:
    """Regression: an offset past the file made unpack grow a sparse file to any size
    (or fail with OSError), and a wrong length was accepted."""

    def lie(doc: dict, graph: onnx.ModelProto) -> None:
        doc["tensors"][-1]["external"][field] = value

    bad = _rewrite(external_packed, tmp_path / "lie.onnxz", lie)
    for read in _readers(bad, tmp_path):
        with pytest.raises(InputError, match=r"tensor 'b'.*external bytes .* inside 'w.bin'"):
            read()


def test_huge_declared_external_file_counts_against_the_limits(external_packed: Path, tmp_path: Path) -> None:
    """Regression: unpack truncated an external file to whatever size the manifest said."""

    def huge(doc: dict, graph: onnx.ModelProto) -> None:
        doc["source"]["external_files"][0]["size"] = 2**45

    bad = _rewrite(external_packed, tmp_path / "huge.onnxz", huge)
    for read in _readers(bad, tmp_path):
        with pytest.raises(InputError, match="over the limit"):
            read()


def test_two_entries_one_member_different_sizes_and_non_zip_files(tmp_path: Path, rng: np.random.Generator) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_sparse_and_duplicates(rng), src)
    packed = tmp_path / "m.onnxz"
    pack(src, packed, min_bytes=16)

    def share(doc: dict, graph: onnx.ModelProto) -> None:
        doc["tensors"][-1]["member"] = doc["tensors"][0]["member"]

    bad = _rewrite(packed, tmp_path / "share.onnxz", share)
    for read in _readers(bad, tmp_path):
        with pytest.raises(InputError, match=r"tensor '\w+'.*member 't/000000.bin'"):
            read()
    for name, payload, message in [("empty.onnxz", b"", "empty"), ("text.onnxz", b"not a zip", "not an .onnxz")]:
        (tmp_path / name).write_bytes(payload)
        for read in _readers(tmp_path / name, tmp_path):
            with pytest.raises(InputError, match=message):
                read()


def test_an_existing_folder_as_output_is_a_clear_error(tmp_path: Path, rng: np.random.Generator) -> None:
    """Regression: with --force, pack and unpack onto a folder died in os.replace."""
    src = _external_model(tmp_path / "src", [("a", "weights/w.bin", 0)], rng)
    packed = tmp_path / "m.onnxz"
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match=r"folder.*is a folder"):
        pack(src, tmp_path / "folder", force=True)
    pack(src, packed)
    with pytest.raises(InputError, match=r"folder.*is a folder"):
        unpack(packed, tmp_path / "folder", force=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"weights.*would be a folder"):
        unpack(packed, out / "weights", force=True)
    assert not list(out.iterdir())


def _one_file_per_tensor(folder: Path, count: int, rng: np.random.Generator) -> Path:
    inits = [_f32(rng, f"w{i}", 64) for i in range(count)]
    graph = oh.make_graph(
        [oh.make_node("Concat", [t.name for t in inits], ["y"], axis=0)], "g", [], [_vi("y", [64 * count])], inits
    )
    src = folder / "m.onnx"
    folder.mkdir()
    onnx.save(oh.make_model(graph, opset_imports=OPSET), src, save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    return src


@pytest.fixture
def low_open_file_limit() -> Iterator[int]:
    """The soft limit on open files set to 200 above what is open now (restored after)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(list(Path("/proc/self/fd").iterdir())) if Path("/proc/self/fd").is_dir() else 64
    low = in_use + 200
    if hard != resource.RLIM_INFINITY and hard < low + 1000:
        pytest.skip("the hard limit on open files is too low to test raising the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_model_with_more_files_than_open_file_limit_packs(
    tmp_path: Path, rng: np.random.Generator, low_open_file_limit: int
) -> None:
    """Regression: pack held two descriptors per external file (and unpack one per output
    file) at once, so a model saved one file per tensor died with EMFILE."""
    src = _one_file_per_tensor(tmp_path / "src", 300, rng)
    packed = tmp_path / "m.onnxz"
    pack(src, packed)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    unpack(packed, out)
    for path in src.parent.iterdir():
        assert (out.parent / path.name).read_bytes() == path.read_bytes()


def test_running_out_of_file_descriptors_is_a_clear_error(
    tmp_path: Path, rng: np.random.Generator, low_open_file_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    pack_module = importlib.import_module("onnxpress.packing.pack")  # the package exports a function of that name
    monkeypatch.setattr(pack_module, "_raise_open_file_limit", lambda: False)
    src = _one_file_per_tensor(tmp_path / "src", 300, rng)
    with pytest.raises(InputError, match=r"tensor 'w\d+' needs external data file .*ulimit -n"):
        pack(src, tmp_path / "m.onnxz")


def test_python_api_batch_runner_and_validate_take_onnxz(tmp_path: Path, rng: np.random.Generator) -> None:
    """``BatchRunner`` and ``validate`` on an .onnxz packed from weights in a subfolder."""
    from onnxpress.runtime import BatchRunner, validate

    src = _external_model(tmp_path / "src", [("a", "weights/w.bin", 0), ("b", "w.bin", 0)], rng)
    model = onnx.load(src, load_external_data=False)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_param="N"))
    src.write_bytes(model.SerializeToString())
    packed = tmp_path / "m.onnxz"
    pack(src, packed)
    feeds = {"x": rng.standard_normal((5, 16, 16)).astype(np.float32)}
    expected = BatchRunner(src, batch_size=4).run_batch(feeds)
    actual = BatchRunner(packed, batch_size=4).run_batch(feeds)
    assert_bit_identical(list(expected.values()), list(actual.values()))
    assert validate(src, packed, feeds, measure_speed=False).passed


def test_both_if_branches_with_same_tensor_names_run_bit_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    """Main-graph ``w`` goes to onnxruntime as an OrtValue; the branches' own ``w`` must not
    be replaced by it."""
    src, packed = tmp_path / "m.onnx", tmp_path / "m.onnxz"
    onnx.save(_if_same_names(rng), src)
    pack(src, packed, min_bytes=16)
    for sign in (1.0, -1.0):
        feeds = {"x": sign * np.abs(rng.standard_normal((32, 32))).astype(np.float32)}
        assert_bit_identical(onnxpress.load_session(src).run(None, feeds), onnxpress.load_session(packed).run(None, feeds))


def test_symlinked_model_packs_the_weights_onnxruntime_runs(tmp_path: Path, rng: np.random.Generator) -> None:
    """Regression: for a symlinked .onnx, pack read external data beside the link's target,
    while onnx and onnxruntime read it beside the link: the .onnxz held other weights."""
    real = _external_model(tmp_path / "real", [("a", "w.bin", 0)], rng)
    _external_model(tmp_path / "other", [("a", "w.bin", 0)], rng)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "m.onnx").symlink_to(real)
    (tmp_path / "link" / "w.bin").write_bytes((tmp_path / "other" / "w.bin").read_bytes())
    packed = tmp_path / "m.onnxz"
    pack(tmp_path / "link" / "m.onnx", packed)
    feeds = {"x": rng.standard_normal((16, 16)).astype(np.float32)}
    expected = onnxpress.load_session(tmp_path / "link" / "m.onnx").run(None, feeds)
    assert_bit_identical(expected, onnxpress.load_session(packed).run(None, feeds))


def test_packed_session_refuses_to_reuse_session_options(tmp_path: Path) -> None:
    """Regression: packed_session added the weights to the caller's SessionOptions, so a
    second packed session built with it died in onnxruntime ("already been added: w") or,
    on the streaming path, silently ran with the first model's main-graph weights."""
    for i in (1, 2):
        onnx.save(_if_same_names(np.random.default_rng(i)), tmp_path / f"m{i}.onnx")
        pack(tmp_path / f"m{i}.onnx", tmp_path / f"m{i}.onnxz", min_bytes=16)
    options = session_options()
    packed_session(tmp_path / "m1.onnxz", options, ["CPUExecutionProvider"])
    for inline_limit in (2**31, 0):
        with pytest.raises(ValueError, match="fresh SessionOptions"):
            packed_session(tmp_path / "m2.onnxz", options, ["CPUExecutionProvider"], inline_limit=inline_limit)
    packed_session(tmp_path / "m2.onnxz", session_options(), ["CPUExecutionProvider"])


def test_streaming_path_writes_identical_tensors_once(tmp_path: Path, rng: np.random.Generator) -> None:
    """The >2 GB path wrote a tied weight once per use (twice the temporary disk and time)."""
    from onnxpress.packing.unpack import _stream_to_external

    src, packed = tmp_path / "m.onnx", tmp_path / "m.onnxz"
    onnx.save(_sparse_and_duplicates(rng), src)  # "a" and "b" hold the same 6400 bytes
    pack(src, packed, min_bytes=16)
    with PackedModel(packed) as container:
        proto = container.graph_proto()
        streams = {e.member: e.raw_size for e in container.manifest.tensors}
        assert len(streams) < len(container.manifest.tensors)
        _stream_to_external(container, proto, tmp_path / "m.data", threads=2)
    assert (tmp_path / "m.data").stat().st_size == sum(-(-n // 4096) * 4096 for n in streams.values())
    refs = {t.name: external_info_of(t) for t in proto.graph.initializer}
    assert refs["a"] == refs["b"]
    feeds = _feeds(_sparse_and_duplicates(rng), rng)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "m.data").write_bytes((tmp_path / "m.data").read_bytes())
    (tmp_path / "run" / "m.onnx").write_bytes(proto.SerializeToString())
    assert_bit_identical(
        onnxpress.load_session(src).run(None, feeds), onnxpress.load_session(tmp_path / "run" / "m.onnx").run(None, feeds)
    )


def external_info_of(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def test_unpack_decodes_each_stored_stream_once(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unpack decoded a tied weight once per use; the bytes are still bit-exact."""
    src, packed = tmp_path / "m.onnx", tmp_path / "m.onnxz"
    onnx.save(_sparse_and_duplicates(rng), src)
    pack(src, packed, min_bytes=16)
    with PackedModel(packed) as container:
        streams = len({e.member for e in container.manifest.tensors})
        assert streams < len(container.manifest.tensors)
    decoded: list[int] = []
    original = PackedModel.tensor_bytes
    monkeypatch.setattr(PackedModel, "tensor_bytes", lambda self, i: decoded.append(i) or original(self, i))
    unpack(packed, tmp_path / "out.onnx")
    assert len(decoded) == streams
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()


def test_overlapping_external_tensors_with_different_bytes_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    """Regression: a crafted, not byte-exact container whose external tensors overlap with
    different bytes unpacked without error, the later tensor overwriting the earlier."""
    src = _external_model(tmp_path / "src", [("a", "w.bin", 0), ("b", "w.bin", 2048)], rng)
    packed = tmp_path / "m.onnxz"
    pack(src, packed)

    def overlap(doc: dict, graph: onnx.ModelProto) -> None:
        doc["source"]["byte_exact"] = False
        doc["tensors"][1]["external"]["offset"] = 512
        entry = next(e for e in graph.graph.initializer[1].external_data if e.key == "offset")
        entry.value = "512"

    bad = _rewrite(packed, tmp_path / "overlap.onnxz", overlap)
    with pytest.raises(InputError, match=r"tensor '[ab]' overlaps another tensor in 'w.bin'"):
        unpack(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    # honest overlaps (identical bytes) still unpack
    honest = _external_model(tmp_path / "src2", [("a", "w.bin", 0), ("b", "w.bin", 512)], rng)
    pack(honest, tmp_path / "honest.onnxz")
    unpack(_rewrite(tmp_path / "honest.onnxz", tmp_path / "h2.onnxz", lambda d, g: d["source"].update(byte_exact=False)),
           tmp_path / "h.onnx")


def test_inline_tensor_with_stray_external_entries_still_reads(tmp_path: Path, rng: np.random.Generator) -> None:
    """An inline tensor (data_location DEFAULT) that keeps leftover external_data entries is
    not external: the container that pack writes for it must read back."""
    model = _if_same_names(rng)
    stray = model.graph.initializer[0].external_data.add()
    stray.key, stray.value = "checksum", "abc"
    src, packed = tmp_path / "m.onnx", tmp_path / "m.onnxz"
    src.write_bytes(model.SerializeToString())
    pack(src, packed, min_bytes=16)
    assert load_model_proto(packed) == model
    unpack(packed, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()


def test_tensor_walk_reads_each_attribute_through_its_type(rng: np.random.Generator) -> None:
    """The walk finds a tensor in every kind of tensor attribute and in an untyped one, and
    skips one set beside an int (onnxruntime reads an attribute by its type, as pack does)."""
    from onnxpress.packing.format import iter_tensor_protos

    tensors = [_f32(rng, f"t{i}", 2) for i in range(8)]
    body = oh.make_graph([oh.make_node("Constant", [], ["c"], value=tensors[2])], "body", [], [_vi("c", [2])])
    sparse = oh.make_sparse_tensor(tensors[4], onh.from_array(np.array([0, 1], np.int64), "i"), [4])
    untyped = oh.make_attribute("u", tensors[5])
    untyped.type = onnx.AttributeProto.UNDEFINED
    smuggled = oh.make_attribute("n", 3)
    smuggled.t.CopyFrom(tensors[6])
    node = oh.make_node("Custom", [], ["y"], domain="x", t=tensors[0], ts=[tensors[1]], g=body, gs=[body],
                        s=sparse)
    node.attribute.extend([untyped, smuggled])
    found = [t.name for t in iter_tensor_protos(node)]
    assert found == ["t2", "t2", "t4", "i", "t0", "t1", "t5"]  # make_node sorts attributes by name


def test_a_marker_copied_into_a_node_attribute_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    """The graph check looks past the initializers when the marker bytes occur more often
    than the initializers' markers: a second reference, in a Constant, is refused."""
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"])], "g", [_vi("x", [4, 64])], [_vi("y", [4, 64])],
        [_f32(rng, "w", 64, 64)],
    )
    src = tmp_path / "m.onnx"
    onnx.save(oh.make_model(graph, opset_imports=OPSET), src)
    packed = tmp_path / "m.onnxz"
    pack(src, packed)

    def copy_marker(doc: dict, graph: onnx.ModelProto) -> None:
        stolen = onnx.TensorProto()
        stolen.CopyFrom(graph.graph.initializer[0])
        graph.graph.node.add().CopyFrom(oh.make_node("Constant", [], ["c"], value=stolen))
        graph.graph.output.add().CopyFrom(_vi("c", [64, 64]))

    bad = _rewrite(packed, tmp_path / "twice.onnxz", copy_marker)
    for read in _readers(bad, tmp_path):
        with pytest.raises(InputError, match="not referenced exactly once.*'w'"):
            read()
