"""Bit-exact round trips through ``.onnxz``: bundled models, every dtype, external data, sessions."""

from __future__ import annotations

import hashlib
import importlib
import threading
from pathlib import Path

import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx.parser
import pytest
from conftest import assert_bit_identical
from hypothesis import HealthCheck, given, settings
from onnxpress.models.digits import digits_cnn_path, load_digits_test

import onnxpress
from onnxpress.packing import (
    PackedModel,
    load_model_proto,
    pack,
    packed_session,
    unpack,
)
from onnxpress.sessions import session_options

MODELS_DIR = Path(onnxpress.__file__).resolve().parent.parent / "models"


def _round_trip(src: Path, tmp_path: Path, **kwargs: object) -> tuple[Path, Path]:
    packed = tmp_path / "m.onnxz"
    out = tmp_path / "out" / src.name
    out.parent.mkdir(exist_ok=True)
    pack(src, packed, **kwargs)
    unpack(packed, out)
    return packed, out


@pytest.mark.parametrize("model", sorted(MODELS_DIR.glob("*.onnx")), ids=lambda p: p.name)
def test_bundled_model_round_trip_is_byte_identical(model: Path, tmp_path: Path) -> None:
    packed, out = _round_trip(model, tmp_path)
    assert out.read_bytes() == model.read_bytes()
    with PackedModel(packed) as container:
        assert container.manifest.byte_exact
        assert container.manifest.tensors, "the model's weights should be packed"


def test_digits_session_from_onnxz_gives_identical_outputs(tmp_path: Path, rng: np.random.Generator) -> None:
    packed = tmp_path / "digits.onnxz"
    pack(digits_cnn_path(), packed)
    images, _ = load_digits_test()
    idx = rng.choice(len(images), size=16, replace=False)
    feeds = {"image": images[idx]}
    expected = onnxpress.load_session(digits_cnn_path()).run(None, feeds)
    actual = onnxpress.load_session(packed).run(None, feeds)
    assert_bit_identical(expected, actual)


@pytest.mark.parametrize("warm_up_fails", [False, True])
def test_onnxruntime_head_start_runs_once_and_never_changes_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm_up_fails: bool
) -> None:
    """The first packed session starts onnxruntime on a side thread; a broken warm-up is harmless."""
    unpack_module = importlib.import_module("onnxpress.packing.unpack")  # the package exports a function `unpack`
    packed = tmp_path / "digits.onnxz"
    pack(digits_cnn_path(), packed)
    monkeypatch.setattr(unpack_module, "_ort_started", threading.Event())
    if warm_up_fails:
        monkeypatch.setattr(unpack_module, "_tiny_model", lambda: b"not a model")
    started: list[threading.Thread | None] = []
    real_start = unpack_module._start_onnxruntime

    def recording_start(providers: list[str]) -> threading.Thread | None:
        started.append(real_start(providers))
        return started[-1]

    monkeypatch.setattr(unpack_module, "_start_onnxruntime", recording_start)
    feeds = {"image": load_digits_test()[0][:8]}
    expected = onnxpress.load_session(digits_cnn_path()).run(None, feeds)
    first = onnxpress.load_session(packed).run(None, feeds)
    second = onnxpress.load_session(packed).run(None, feeds)
    assert len(started) == 2 and started[1] is None
    assert started[0] is not None and not started[0].is_alive()  # no thread outlives load_session
    assert_bit_identical(expected, first)
    assert_bit_identical(expected, second)


# ---------------------------------------------------------------------------------------
# every dtype, generated

_NUMERIC = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT64: np.uint64,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.COMPLEX64: np.complex64,
    onnx.TensorProto.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
}
_PACKED_4BIT = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _tensor(data_type: int, shape: list[int], seed: int, sparsity: float, name: str) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape))
    if data_type == onnx.TensorProto.STRING:
        words = ["".join(chr(c) for c in rng.integers(32, 0x2FF, size=rng.integers(0, 6))) for _ in range(numel)]
        return oh.make_tensor(name, data_type, shape, [w.encode() for w in words])
    if data_type in _PACKED_4BIT:
        raw = rng.integers(0, 256, size=(numel + 1) // 2, dtype=np.uint8)
        raw[rng.random(raw.size) < sparsity] = 0
        return oh.make_tensor(name, data_type, shape, raw.tobytes(), raw=True)
    dtype = np.dtype(_NUMERIC[data_type])
    raw = rng.integers(0, 256, size=numel * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        raw = (raw & 1).astype(np.uint8)
    elements = raw.reshape(numel, dtype.itemsize)
    elements[rng.random(numel) < sparsity] = 0
    if dtype.kind == "f" and numel:
        # -0.0 must survive: it is zero by value but not by bytes.
        elements[0] = np.frombuffer(np.array(-0.0, dtype=dtype).tobytes(), np.uint8)
    return oh.make_tensor(name, data_type, shape, elements.tobytes(), raw=True)


_DTYPES = list(_NUMERIC) + list(_PACKED_4BIT) + [onnx.TensorProto.STRING]


@st.composite
def _tensor_specs(draw: st.DrawFn) -> list[tuple[int, list[int], int, float]]:
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        data_type = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 24), min_size=0, max_size=3))
        specs.append((data_type, shape, draw(st.integers(0, 2**31)), draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))))
    return specs


def _model_with(tensors: list[onnx.TensorProto]) -> onnx.ModelProto:
    outputs = [oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    graph = oh.make_graph([], "g", [], outputs, initializer=tensors)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], producer_name="hypothesis")
    model.metadata_props.add(key="author", value="test ✓")
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=_tensor_specs(),
    level=st.sampled_from([1, 3]),
    min_bytes=st.sampled_from([0, 64]),
    chunk_bytes=st.sampled_from([1024, 1 << 22]),
)
def test_generated_tensors_of_every_dtype_round_trip(
    tmp_path_factory: pytest.TempPathFactory, specs: list, level: int, min_bytes: int, chunk_bytes: int
) -> None:
    tmp_path = tmp_path_factory.mktemp("gen")
    tensors = [_tensor(dt, shape, seed, sparsity, f"t{i}") for i, (dt, shape, seed, sparsity) in enumerate(specs)]
    if len(tensors) > 1:  # a duplicate under another name must be stored once
        dup = onnx.TensorProto()
        dup.CopyFrom(tensors[0])
        dup.name = "duplicate"
        tensors.append(dup)
    src = tmp_path / "gen.onnx"
    onnx.save(_model_with(tensors), src)
    packed, out = _round_trip(src, tmp_path, level=level, min_bytes=min_bytes, chunk_bytes=chunk_bytes)
    assert out.read_bytes() == src.read_bytes()
    restored = load_model_proto(packed)
    for original, back in zip(tensors, restored.graph.initializer, strict=True):
        assert back.SerializeToString() == original.SerializeToString()
    with PackedModel(packed) as container:
        members = {t.name: t.member for t in container.manifest.tensors}
    if "duplicate" in members and "t0" in members:
        assert members["duplicate"] == members["t0"]


# ---------------------------------------------------------------------------------------
# graph structure: attributes, subgraphs, functions, external data, sessions

_STRUCTURED = """
<ir_version: 10, opset_import: ["" : 21, "local" : 1]>
g (float[N, 64] x, bool cond) => (float[N, 64] y) {
    w_used = Identity(w)
    c = Constant <value = float[64] {CONSTS}> ()
    a = Add(x, c)
    b = MatMul(a, w_used)
    y = If(cond) <
        then_branch = t () => (float[N, 64] r) { r = local.scale(b) },
        else_branch = e () => (float[N, 64] r) { r = Mul(b, k) }
    >
}
<domain: "local", opset_import: ["" : 21]>
scale (v) => (out) {
    s = Constant <value = float[64] {CONSTS}> ()
    out = Mul(v, s)
}
"""


def _structured_model(rng: np.random.Generator) -> onnx.ModelProto:
    consts = ", ".join(f"{v:.6f}" for v in rng.standard_normal(64))
    model = onnx.parser.parse_model(_STRUCTURED.replace("CONSTS", consts))
    model.graph.initializer.append(onh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"))
    model.graph.initializer.append(onh.from_array(rng.standard_normal(64).astype(np.float32), "k"))
    # The text parser writes float_data; exporters write raw_data, which is what gets packed.
    for node in [*model.graph.node, *model.functions[0].node]:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(onh.from_array(onh.to_array(attr.t), attr.t.name))
    onnx.checker.check_model(model)
    return model


def test_attribute_subgraph_and_function_tensors_are_packed_and_run(tmp_path: Path, rng: np.random.Generator) -> None:
    model = _structured_model(rng)
    src = tmp_path / "s.onnx"
    onnx.save(model, src)
    packed, out = _round_trip(src, tmp_path, min_bytes=128, chunk_bytes=4096)
    assert out.read_bytes() == src.read_bytes()
    with PackedModel(packed) as container:
        names = [t.name for t in container.manifest.tensors]
    assert len(names) == 4  # w, k and both Constant values
    for cond in (True, False):
        feeds = {"x": rng.standard_normal((3, 64)).astype(np.float32), "cond": np.array(cond)}
        expected = onnxpress.load_session(src).run(None, feeds)
        assert_bit_identical(expected, onnxpress.load_session(packed).run(None, feeds))


def test_streaming_session_path_matches(tmp_path: Path, rng: np.random.Generator) -> None:
    src = tmp_path / "s.onnx"
    onnx.save(_structured_model(rng), src)
    packed = tmp_path / "s.onnxz"
    pack(src, packed, min_bytes=128, chunk_bytes=1024)
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32), "cond": np.array(False)}
    expected = onnxpress.load_session(src).run(None, feeds)
    # inline_limit=0 forces the large-model path: tensors streamed to a temporary external file
    session = packed_session(packed, session_options(), ["CPUExecutionProvider"], inline_limit=0)
    assert_bit_identical(expected, session.run(None, feeds))


def test_external_data_model_round_trips_both_files(tmp_path: Path, rng: np.random.Generator) -> None:
    model = _structured_model(rng)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, location="ext.onnx.data", size_threshold=128)
    data_file = src_dir / "ext.onnx.data"
    assert data_file.stat().st_size > 0
    packed = tmp_path / "ext.onnxz"
    report = pack(src, packed, chunk_bytes=2048)
    assert report.byte_exact
    out = tmp_path / "out" / "ext.onnx"
    out.parent.mkdir()
    unpack(packed, out)
    assert out.read_bytes() == src.read_bytes()
    assert (out.parent / "ext.onnx.data").read_bytes() == data_file.read_bytes()
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32), "cond": np.array(True)}
    assert_bit_identical(
        onnxpress.load_session(src).run(None, feeds), onnxpress.load_session(packed).run(None, feeds)
    )


def test_sparse_tensor_uses_sparse_codec_and_shrinks(tmp_path: Path, rng: np.random.Generator) -> None:
    weights = rng.standard_normal((256, 256)).astype(np.float32)
    weights[np.abs(weights) < np.quantile(np.abs(weights), 0.8)] = 0.0
    model = _model_with([onh.from_array(weights, "w")])
    src = tmp_path / "sparse.onnx"
    onnx.save(model, src)
    report = pack(src, tmp_path / "sparse.onnxz")
    assert report.codecs == {"sparse": 1}
    assert report.ratio > 3.0


def test_packing_is_deterministic(tmp_path: Path) -> None:
    pack(digits_cnn_path(), tmp_path / "a.onnxz", threads=1)
    pack(digits_cnn_path(), tmp_path / "b.onnxz", threads=2)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.onnxz", "b.onnxz")]
    assert digest[0] == digest[1]


@pytest.mark.slow
def test_minilm_round_trip_and_session(tmp_path: Path, rng: np.random.Generator) -> None:
    from onnxpress.models.minilm import build_minilm_onnx, sample_sentences, tokenize

    src = build_minilm_onnx()
    packed, out = _round_trip(src, tmp_path, level=3)
    assert out.read_bytes() == src.read_bytes()
    assert packed.stat().st_size * 1.2 <= src.stat().st_size
    feeds = tokenize(list(rng.choice(sample_sentences(32), size=4)))
    assert_bit_identical(
        onnxpress.load_session(src).run(None, feeds), onnxpress.load_session(packed).run(None, feeds)
    )
