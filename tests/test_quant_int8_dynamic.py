"""quantize-int8-dynamic on small models: counts, scales, tolerances, exclusions, auto-exclude."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_ort
from quant_models import embed_mlp, initializer, mlp, rel_error, to_ir, with_weights

from onnxpress.errors import InputError
from onnxpress.passes.quantize_int8_dynamic import QuantizeInt8DynamicConfig, QuantizeInt8DynamicPass


def _quantize(proto: onnx.ModelProto, calibration=None, **options) -> tuple[ir.Model, QuantizeInt8DynamicPass]:
    model = to_ir(proto)
    step = QuantizeInt8DynamicPass(QuantizeInt8DynamicConfig(**options), calibration=calibration)
    result = step(model)
    onnx.checker.check_model(ir.to_proto(result.model))
    return result.model, step


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("activations", ["tensor", "row"])
def test_matmuls_become_int8_within_tolerance(rng, activations):
    proto = mlp(rng)
    model, step = _quantize(proto, activations=activations, min_elements=0)
    ops = _ops(model)
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    assert step.details["quantized"] == 2
    x = rng.standard_normal((7, 64)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 0.03  # two int8 layers (7-bit weights): about 1.5% relative L2 error


def test_weight_scales_are_per_output_channel(rng):
    proto = mlp(rng)
    w1 = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "W1"))
    for reduce_range, q_max in ((False, 127), (True, 63)):
        model, _ = _quantize(proto, min_elements=0, reduce_range=reduce_range)
        q = initializer(model, "W1_int8")
        scale = initializer(model, "fc1_weight_scale")
        np.testing.assert_allclose(scale, np.abs(w1).max(axis=0) / q_max, rtol=1e-6)
        assert q.dtype == np.int8 and np.abs(q).max() == q_max
        assert np.abs(q * scale - w1).max() <= scale.max() / 2 + 1e-7


def test_row_scales_beat_tensor_scales_on_an_outlier_row(rng):
    proto = mlp(rng)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    x[3] *= 200.0  # one outlier token sets a per-tensor step far too coarse for the others
    (ref,) = run_ort(proto, {"x": x})
    errors = {}
    for activations in ("tensor", "row"):
        model, _ = _quantize(proto, activations=activations, min_elements=0)
        (got,) = run_ort(model, {"x": x})
        keep = np.arange(16) != 3
        errors[activations] = rel_error(ref[keep], got[keep])
    assert errors["row"] < errors["tensor"] / 5


def test_gemm_with_trans_b_alpha_beta(rng):
    text = """
    <ir_version: 8, opset_import: ["": 17]>
    g (float[N, 32] x) => (float[N, 24] y) {
        y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, W, C)
    }
    """
    proto = with_weights(text, {
        "W": rng.standard_normal((24, 32)).astype(np.float32),
        "C": rng.standard_normal(24).astype(np.float32),
    })
    model, _ = _quantize(proto, min_elements=0)
    assert "Gemm" not in _ops(model) and "MatMulInteger" in _ops(model)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 0.02


def test_embedding_rows_are_int8_with_a_scale_per_row(rng):
    proto = embed_mlp(rng)
    table = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "table"))
    model, _ = _quantize(proto, min_elements=0, op_types=("Gather",))
    scale = initializer(model, "table_row_scale")
    assert scale.shape == (100, 1)
    np.testing.assert_allclose(scale[:, 0], np.abs(table).max(axis=1) / 127, rtol=1e-6)
    assert "table" not in model.graph.initializers  # the float table is gone
    ids = rng.integers(0, 100, size=(3, 5)).astype(np.int64)
    # The looked-up rows are off by at most half a step of their own row.
    reference_rows = table[ids]
    text = onnx.printer.to_text(proto.graph)
    assert "Gather" in text
    rows = np.take(initializer(model, "table_int8").astype(np.float32) * scale, ids, axis=0)
    assert np.all(np.abs(rows - reference_rows) <= scale[ids] / 2 + 1e-6)
    (ref,), (got,) = run_ort(proto, {"ids": ids}), run_ort(model, {"ids": ids})
    assert rel_error(ref, got) < 0.01


def test_exclusions_by_name_glob_and_op_type(rng):
    proto = mlp(rng)
    for options in ({"exclude_nodes": ("fc2",)}, {"exclude_nodes": ("fc[2-9]",)}, {"exclude_nodes": ("*2",)}):
        model, step = _quantize(proto, min_elements=0, excluded_weights="float", **options)
        assert _ops(model).count("MatMulInteger") == 1
        fc2 = next(n for n in model.graph if n.name == "fc2")
        assert fc2.op_type == "MatMul" and fc2.inputs[1].name == "W2"  # the float weight, untouched
        assert step.details["kept_float"] == ["fc2"]
    model, step = _quantize(proto, min_elements=0, exclude_op_types=("MatMul",))
    assert "MatMulInteger" not in _ops(model)
    assert sorted(step.details["kept_float"]) == ["fc1", "fc2"]
    # excluded_weights: int8 keeps float arithmetic but stores the weight in 8 bits.
    assert initializer(model, "W1_int8").dtype == np.int8 and initializer(model, "W2_int8").dtype == np.int8
    assert "W1" not in model.graph.initializers and "W2" not in model.graph.initializers
    x = rng.standard_normal((4, 64)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 0.02  # 8-bit weights only: about 1% for two layers


def test_conv_weights_stored_int8(rng):
    text = """
    <ir_version: 8, opset_import: ["": 17]>
    c (float[N, 3, 8, 8] x) => (float[N, 8, 6, 6] y) {
        y = Conv (x, W, B)
    }
    """
    proto = with_weights(text, {
        "W": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(8).astype(np.float32),
    })
    model, _ = _quantize(proto, min_elements=0)
    assert initializer(model, "W_int8").dtype == np.int8
    assert initializer(model, "W_scale").shape == (8, 1, 1, 1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 0.01


def test_small_weights_stay_float(rng):
    model, step = _quantize(mlp(rng), min_elements=64 * 48 + 1)
    assert "MatMulInteger" not in _ops(model) and not step.details["quantized"]


def test_auto_exclude_needs_calibration(rng):
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        _quantize(mlp(rng), min_elements=0, auto_exclude=True)


def test_auto_exclude_keeps_the_worst_node_and_reports_it(rng):
    proto = mlp(rng)
    batches = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(2)]
    batches[0]["x"][0] *= 20  # an outlier row makes per-tensor activation steps coarse
    model, step = _quantize(proto, batches, min_elements=0, auto_exclude=True, target_cosine=0.999999, max_excluded=1)
    record = step.details["auto_exclude"]
    assert len(record["kept_float"]) == 1 and set(record["kept_float"]) <= {"fc1", "fc2"}
    assert step.details["kept_float"] == record["kept_float"]
    assert _ops(model).count("MatMulInteger") == 1
    kept = next(n for n in model.graph if n.name == record["kept_float"][0])
    assert kept.op_type == "MatMul"
    assert 0.0 < record["cosine_all_quantized"] < 0.999999 and not record["target_met"]


def test_auto_exclude_keeps_nothing_when_the_target_is_met(rng):
    batches = [{"x": rng.standard_normal((8, 64)).astype(np.float32)}]
    model, step = _quantize(mlp(rng), batches, min_elements=0, auto_exclude=True, target_cosine=0.9)
    assert step.details["auto_exclude"]["kept_float"] == [] and step.details["auto_exclude"]["target_met"]
    assert _ops(model).count("MatMulInteger") == 2


def test_auto_exclude_null_runs_only_with_calibration(rng):
    model, step = _quantize(mlp(rng), None, min_elements=0, auto_exclude=None)
    assert "auto_exclude" not in step.details
    batches = [{"x": rng.standard_normal((8, 64)).astype(np.float32)}]
    model, step = _quantize(mlp(rng), batches, min_elements=0, auto_exclude=None, target_cosine=0.5)
    assert step.details["auto_exclude"]["target_met"]


def test_auto_exclude_rejects_data_that_does_not_fit(rng):
    batches = [{"x": rng.standard_normal((8, 63)).astype(np.float32)}]
    with pytest.raises(InputError, match="'x'.*64"):
        _quantize(mlp(rng), batches, min_elements=0, auto_exclude=True)


def test_unchanged_when_nothing_to_quantize(rng):
    text = """
    <ir_version: 8, opset_import: ["": 17]>
    g (float[N, 4] x, float[4, 4] w) => (float[N, 4] y) { y = MatMul (x, w) }
    """
    model = to_ir(with_weights(text, {}))
    result = QuantizeInt8DynamicPass()(model)
    assert not result.modified


def test_walks_into_subgraphs(rng):
    text = """
    <ir_version: 8, opset_import: ["": 17]>
    g (bool c, float[N, 64] x) => (float[N, 48] y) {
        y = If (c) <
            then_branch = t () => (float[N, 48] a) { a = MatMul (x, W) },
            else_branch = e () => (float[N, 48] b) { b = MatMul (x, W) }
        >
    }
    """
    proto = with_weights(text, {"W": rng.standard_normal((64, 48)).astype(np.float32)})
    model, step = _quantize(proto, min_elements=0)
    assert step.details["quantized"] == 2
    assert "W" not in model.graph.initializers  # the float weight both branches read is gone
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for flag in (True, False):
        feeds = {"c": np.array(flag), "x": x}
        (ref,), (got,) = run_ort(proto, feeds), run_ort(model, feeds)
        assert rel_error(ref, got) < 0.02


def test_recurrent_weights_stored_int8(rng):
    """LSTM/GRU W and R were left float32: an int8 recurrent model did not shrink at all."""
    from quant_models import with_weights

    text = """
    <ir_version: 8, opset_import: ["": 17]>
    g (float[T, N, 16] x) => (float[T, 1, N, 32] y, float[T, 1, N, 24] z) {
        y, h, c = LSTM <hidden_size = 32> (x, W, R, B)
        s = Squeeze (y, one)
        z, hz = GRU <hidden_size = 24, linear_before_reset = 1> (s, Wg, Rg)
    }
    """
    proto = with_weights(text, {
        "W": rng.standard_normal((1, 128, 16)).astype(np.float32) * 0.3,
        "R": rng.standard_normal((1, 128, 32)).astype(np.float32) * 0.2,
        "B": rng.standard_normal((1, 256)).astype(np.float32) * 0.1,
        "one": np.array([1], np.int64),
        "Wg": rng.standard_normal((1, 72, 32)).astype(np.float32) * 0.3,
        "Rg": rng.standard_normal((1, 72, 24)).astype(np.float32) * 0.2,
    })
    model, step = _quantize(proto)
    assert step.details["weights_only_int8"] == 4
    int8 = {v.name for v in model.graph.initializers.values() if v.dtype == ir.DataType.INT8}
    assert len(int8) == 4 and not {"W", "R", "Wg", "Rg"} & set(model.graph.initializers)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    ref, got = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    for r, g in zip(ref, got, strict=True):
        assert rel_error(r, g) < 2e-2  # 8-bit weights, per gate row, float recurrence


def test_auto_exclude_on_a_graph_with_an_if(rng, tmp_path):
    """A MatMul inside an If branch is quantized and the result loads; auto-exclude works there."""
    import onnx.helper as oh
    import onnx.numpy_helper as onh

    branch = oh.make_graph([oh.make_node("MatMul", ["h", "W1"], ["m"]), oh.make_node("Relu", ["m"], ["b"])],
                           "then", [], [oh.make_tensor_value_info("b", 1, None)])
    other = oh.make_graph([oh.make_node("Neg", ["h"], ["c"])], "else", [], [oh.make_tensor_value_info("c", 1, None)])
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
         oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0), oh.make_node("Greater", ["s", "zero"], ["cond"]),
         oh.make_node("If", ["cond"], ["r"], then_branch=branch, else_branch=other),
         oh.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
        "if_mlp", [oh.make_tensor_value_info("x", 1, ["N", 64])], [oh.make_tensor_value_info("y", 1, ["N", 32])],
        [onh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W1"),
         onh.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W2"),
         onh.from_array(np.array(0.0, np.float32), "zero")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    # The values the quantizer adds are named once for the whole model: unnamed, ir.save numbered
    # the branch's and the main graph's both from val_0 and onnxruntime refused the file.
    import onnxruntime as ort

    from onnxpress.passes.quant_common import to_proto_file

    model, _ = _quantize(proto, min_elements=0)
    assert _ops(model).count("MatMulInteger") == 2  # fc1, fc2; the branch has its own
    ort.InferenceSession(str(to_proto_file(model, tmp_path)), providers=["CPUExecutionProvider"])
    batches = [{"x": rng.standard_normal((8, 64)).astype(np.float32)}]
    batches[0]["x"][0] *= 20
    model, step = _quantize(proto, batches, min_elements=0, auto_exclude=True, target_cosine=0.999999, max_excluded=1)
    record = step.details["auto_exclude"]
    assert len(record["kept_float"]) == 1 and set(record["kept_float"]) <= {"fc1", "fc2"}
    assert _ops(model).count("MatMulInteger") == 1
    x = batches[0]["x"]
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 0.1


def test_auto_exclude_survives_a_failed_localization(rng, monkeypatch):
    """Localization exposes every intermediate; when onnxruntime refuses that model, the
    search probes the nodes in graph order instead of failing the pass."""
    import importlib

    localize_module = importlib.import_module("onnxpress.runtime.localize")

    def refuse(*args, **kwargs):
        raise InputError("onnxruntime cannot load the model with exposed intermediates")

    monkeypatch.setattr(localize_module, "localize", refuse)
    proto = mlp(rng)
    batches = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(2)]
    batches[0]["x"][0] *= 20
    model, step = _quantize(proto, batches, min_elements=0, auto_exclude=True, target_cosine=0.999999, max_excluded=1)
    record = step.details["auto_exclude"]
    assert "exposed intermediates" in record["localization_failed"]
    assert len(record["kept_float"]) == 1 and _ops(model).count("MatMulInteger") == 1


def test_conv_transpose_weights_stored_int8(rng):
    """ConvTranspose weights (a decoder's upsampling) were left float32."""
    text = """
    <ir_version: 8, opset_import: ["": 17]>
    g (float[N, 32, 5, 5] x) => (float[N, 16, 10, 10] y) {
        y = ConvTranspose <strides = [2, 2], group = 2> (x, W, B)
    }
    """
    proto = with_weights(text, {
        "W": rng.standard_normal((32, 8, 2, 2)).astype(np.float32),
        "B": rng.standard_normal(16).astype(np.float32),
    })
    model, step = _quantize(proto)
    assert step.details["weights_only_int8"] == 1 and "W" not in model.graph.initializers
    x = rng.standard_normal((2, 32, 5, 5)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 1e-2
