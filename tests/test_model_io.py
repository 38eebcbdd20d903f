"""Model I/O: safe loading, atomic saving, external data and its location checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from conftest import assert_bit_identical, run_ort
from onnxpress.errors import InputError
from onnxpress.model_io import load_model, save_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4,256] x) => (float[4,256] y)
<float[256,256] w>
{
  y = MatMul(x, w)
}
"""


def _model_with_weight(rng: np.random.Generator) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(TEXT.replace("<float[256,256] w>", ""))
    weight = rng.standard_normal((256, 256)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    return proto


def _save_external(proto: onnx.ModelProto, path: Path, location: str) -> None:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # onnx.save rewrites its argument
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)


def test_round_trip_with_external_data_is_memory_mapped(tmp_path: Path, rng) -> None:
    proto = _model_with_weight(rng)
    src = tmp_path / "m.onnx"
    _save_external(proto, src, "m.weights")
    model = load_model(src)
    weight = model.graph.initializers["w"].const_value
    assert isinstance(weight, ir.ExternalTensor)
    out = save_model(model, tmp_path / "out.onnx", external_data=True, source=src)
    assert (tmp_path / "out.onnx.data").stat().st_size == 256 * 256 * 4
    feeds = {"x": rng.standard_normal((4, 256)).astype(np.float32)}
    assert_bit_identical(run_ort(proto, feeds), run_ort(onnx.load(str(out)), feeds))
    single = save_model(load_model(src), tmp_path / "single.onnx")
    assert not (tmp_path / "single.onnx.data").exists()
    assert_bit_identical(run_ort(proto, feeds), run_ort(onnx.load(str(single)), feeds))


def test_existing_output_needs_force_and_input_is_never_overwritten(tmp_path: Path, rng) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_model_with_weight(rng), str(src))
    original = src.read_bytes()
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        save_model(load_model(src), out)
    assert out.read_bytes() == b"keep me"
    save_model(load_model(src), out, force=True)
    assert out.read_bytes() != b"keep me"
    with pytest.raises(InputError, match="is the input"):
        save_model(load_model(src), src, force=True, source=src)
    assert src.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]


def test_failed_save_leaves_no_partial_file(tmp_path: Path, rng, monkeypatch) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_model_with_weight(rng), str(src))
    model = load_model(src)

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path: Path, location: str, rng) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    proto = _model_with_weight(rng)
    _save_external(proto, folder / "m.onnx", "w.bin")
    # Rewrite the location by hand, as a hostile file would.
    hostile = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for entry in hostile.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    (tmp_path / "outside.bin").write_bytes((folder / "w.bin").read_bytes())
    onnx.save(hostile, str(folder / "m.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        load_model(folder / "m.onnx")


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path, rng) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    _save_external(_model_with_weight(rng), folder / "m.onnx", "w.bin")
    os.replace(folder / "w.bin", tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", folder / "w.bin")
    with pytest.raises(InputError, match="leads out of the model's folder"):
        load_model(folder / "m.onnx")


def test_missing_or_short_external_data_is_a_clear_error(tmp_path: Path, rng) -> None:
    _save_external(_model_with_weight(rng), tmp_path / "m.onnx", "w.bin")
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(InputError, match="truncated"):
        load_model(tmp_path / "m.onnx")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.parametrize("content", [b"", b"hello, this is not a model\n", None])
def test_empty_truncated_or_foreign_files(tmp_path: Path, content: bytes | None, rng) -> None:
    path = tmp_path / "bad.onnx"
    if content is None:
        data = _model_with_weight(rng).SerializeToString()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.onnx"):
        load_model(path)


def test_large_constants_go_to_external_data_automatically(tmp_path: Path, rng, monkeypatch) -> None:
    import onnxpress.model_io as model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD_BYTES", 100_000)
    src = tmp_path / "m.onnx"
    onnx.save(_model_with_weight(rng), str(src))
    save_model(load_model(src), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert (tmp_path / "big.onnx").stat().st_size < 10_000


def test_inline_save_over_external_output_removes_the_stale_sidecar(tmp_path: Path, rng) -> None:
    from onnxpress.model_io import saved_size

    src = tmp_path / "m.onnx"
    onnx.save(_model_with_weight(rng), str(src))
    out = tmp_path / "out.onnx"
    save_model(load_model(src), out, external_data=True)
    assert (tmp_path / "out.onnx.data").exists()
    assert saved_size(out) == out.stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    save_model(load_model(src), out, force=True)
    assert not (tmp_path / "out.onnx.data").exists()
    assert saved_size(out) == out.stat().st_size


def test_sparse_initializers_and_sparse_constants_load_densely(tmp_path: Path, rng) -> None:
    """onnx_ir drops sparse initializers and cannot read sparse Constants: both are stored densely."""
    h = onnx.helper
    values = h.make_tensor("sp", onnx.TensorProto.FLOAT, [2], [1.5, -2.0])
    sparse_init = h.make_sparse_tensor(values, h.make_tensor("i", onnx.TensorProto.INT64, [2], [0, 5]), [2, 3])
    coords = h.make_tensor("j", onnx.TensorProto.INT64, [2, 2], [0, 1, 1, 2])
    sparse_const = h.make_sparse_tensor(h.make_tensor("v", onnx.TensorProto.FLOAT, [2], [3.0, 4.0]), coords, [2, 3])
    graph = h.make_graph(
        [
            h.make_node("Constant", [], ["k"], sparse_value=sparse_const),
            h.make_node("Add", ["x", "sp"], ["a"]),
            h.make_node("Add", ["a", "k"], ["y"]),
        ],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        sparse_initializer=[sparse_init],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    src = tmp_path / "sparse.onnx"
    onnx.save(proto, src)
    out = save_model(load_model(src), tmp_path / "dense.onnx")
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32)}
    expected = run_ort(proto, feeds)
    assert_bit_identical(expected, run_ort(onnx.load(out), feeds))
    assert expected[0][0, 0] == feeds["x"][0, 0] + 1.5 and expected[0][1, 2] == feeds["x"][1, 2] - 2.0 + 4.0


def test_nodes_out_of_topological_order_are_sorted(tmp_path: Path, rng) -> None:
    """onnxruntime runs a graph whose nodes are out of order; loading sorts it instead of refusing it."""
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Relu", ["a"], ["y"]), h.make_node("Neg", ["x"], ["a"])],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    src = tmp_path / "unsorted.onnx"
    onnx.save(proto, src)
    model = load_model(src)
    assert [n.op_type for n in model.graph] == ["Neg", "Relu"]
    out = onnx.load(save_model(model, tmp_path / "sorted.onnx"))
    onnx.checker.check_model(out)
    feeds = {"x": rng.standard_normal(3).astype(np.float32)}
    assert_bit_identical(run_ort(proto, feeds), run_ort(out, feeds))


def test_a_graph_that_sorting_cannot_fix_is_still_refused(tmp_path: Path) -> None:
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Relu", ["missing"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
    )
    src = tmp_path / "dangling.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), src)
    with pytest.raises(InputError, match="not a valid ONNX model"):
        load_model(src)


def test_map_typed_outputs_survive_load_passes_and_save(tmp_path: Path, rng) -> None:
    """onnx_ir cannot read map types (sklearn's ZipMap outputs seq(map(int64, float)))."""
    from onnxpress.pipeline import Pipeline
    from onnxpress.recipes import load_preset

    h = onnx.helper
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "ai.onnx.ml" : 1]>
    g (float[2,3] x) => (int64[2] label)
    {
      label, p = ai.onnx.ml.LinearClassifier <classlabels_ints = [0, 1], post_transform = "SOFTMAX",
          coefficients = [1.0, -1.0, 0.5, -1.0, 1.0, -0.5], intercepts = [0.1, -0.1]> (x)
      probs = ai.onnx.ml.ZipMap <classlabels_int64s = [0, 1]> (p)
      dead = ai.onnx.ml.ZipMap <classlabels_int64s = [0, 1]> (p)
    }
    """)
    value = h.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)
    value.tensor_type.ClearField("shape")
    seq_of_maps = h.make_sequence_type_proto(h.make_map_type_proto(onnx.TensorProto.INT64, value))
    proto.graph.output.append(h.make_value_info("probs", seq_of_maps))
    onnx.checker.check_model(proto)
    src = tmp_path / "zipmap.onnx"
    onnx.save(proto, src)
    model = load_model(src)
    Pipeline.from_recipe(load_preset("lossless")).run(model)
    out = onnx.load(save_model(model, tmp_path / "out.onnx"))
    onnx.checker.check_model(out)
    assert out.graph.output[1].type == seq_of_maps
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32)}
    expected, actual = run_ort(proto, feeds), run_ort(out, feeds)
    assert expected[0].tobytes() == actual[0].tobytes()
    assert expected[1] == actual[1]  # lists of {label: probability}


def test_graph_outputs_of_unknown_rank_load(tmp_path: Path, rng) -> None:
    """onnx's checker wants a shape on every graph input and output; the IR and onnxruntime do not."""
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2,3] x) => (float[2,3] y, float z)
    {
      e = Constant <value = int64[0] {}> ()
      y = ReduceSum <noop_with_empty_axes = 1> (x, e)
      z = ReduceSum <keepdims = 0> (x, e)
    }
    """)
    proto.graph.output[1].type.tensor_type.ClearField("shape")
    src = tmp_path / "unknown_rank.onnx"
    onnx.save(proto, src)
    out = onnx.load(save_model(load_model(src), tmp_path / "out.onnx"))
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32)}
    assert_bit_identical(run_ort(proto, feeds), run_ort(out, feeds))


def test_default_domain_spelled_ai_onnx_loads(tmp_path: Path, rng) -> None:
    """``ai.onnx`` and ``""`` name the same operator set; onnxruntime runs either."""
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Neg", ["x"], ["a"], domain="ai.onnx"), h.make_node("Identity", ["a"], ["y"], domain="ai.onnx")],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("ai.onnx", 17)])
    src = tmp_path / "ai_onnx.onnx"
    onnx.save(proto, src)
    out = onnx.load(save_model(load_model(src), tmp_path / "out.onnx"))
    onnx.checker.check_model(out)
    feeds = {"x": rng.standard_normal(3).astype(np.float32)}
    assert_bit_identical(run_ort(proto, feeds), run_ort(out, feeds))


def test_external_data_files_are_found_and_inline_models_are_not_parsed(
    tmp_path: Path, rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxpress import external_data

    model = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[4, 64] x) => (float[4, 64] y) { y = MatMul(x, w) }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"))
    inline = tmp_path / "inline.onnx"
    onnx.save(model, inline)
    external = tmp_path / "ext" / "m.onnx"
    external.parent.mkdir()
    onnx.save(model, external, save_as_external_data=True, location="w.bin", size_threshold=0)  # edits model
    assert external_data.external_data_files(external) == ["w.bin"]
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert external_data.external_data_files(empty) == []

    parsed: list[object] = []
    monkeypatch.setattr(external_data.onnx, "load", lambda *args, **kwargs: parsed.append(args))
    assert external_data.external_data_files(inline) == []
    assert parsed == []  # no bytes 'location' in the file: nothing to parse
