"""cast-fp16: the result loads and runs in onnxruntime; sensitive ops stay float32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import run_ort
from quant_models import rel_error, to_ir, with_weights

from onnxpress.passes.cast_fp16 import CastFp16Config, CastFp16Pass

TEXT = """
<ir_version: 8, opset_import: ["": 17]>
t (float[N, 32] x) => (float[N, 16] y) {
    h = MatMul (x, W)
    n = LayerNormalization <axis = -1> (h, gamma, beta)
    s = Softmax <axis = -1> (n)
    r = ReduceMean <keepdims = 1> (s)
    y = Sub (s, r)
}
"""


def _model(rng):
    return with_weights(TEXT, {
        "W": rng.standard_normal((32, 16)).astype(np.float32),
        "gamma": rng.standard_normal(16).astype(np.float32),
        "beta": rng.standard_normal(16).astype(np.float32),
    })


def test_fp16_loads_runs_and_keeps_sensitive_ops_fp32(rng):
    proto = _model(rng)
    model = to_ir(proto)
    step = CastFp16Pass()
    assert step(model).modified
    assert model.graph.initializers["W"].dtype == ir.DataType.FLOAT16
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT and model.graph.outputs[0].dtype == ir.DataType.FLOAT
    norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert norm.inputs[0].dtype == ir.DataType.FLOAT  # a Cast back to float32 in front of it
    x = rng.standard_normal((6, 32)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert got.dtype == np.float32
    assert rel_error(ref, got) < 1e-2


def test_ops_without_fp16_kernels_are_kept_fp32_until_it_loads(rng, monkeypatch):
    import onnxpress.passes.cast_fp16 as cast_fp16

    real = cast_fp16._loads
    refusals = ["Could not find an implementation for Softmax(13) node with name 'sm'"]

    def loads(path):  # onnxruntime refuses the first conversion, as it does for ops without fp16 kernels
        return refusals.pop() if refusals else real(path)

    monkeypatch.setattr(cast_fp16, "_loads", loads)
    proto = _model(rng)
    model = to_ir(proto)
    step = CastFp16Pass(CastFp16Config(keep_fp32_ops=()))
    step(model)
    assert step.details["kept_fp32_for_onnxruntime"] == ["Softmax"]
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    assert softmax.inputs[0].dtype == ir.DataType.FLOAT
    assert next(n for n in model.graph if n.op_type == "LayerNormalization").inputs[0].dtype == ir.DataType.FLOAT16
    x = rng.standard_normal((3, 32)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 5e-2


def test_a_model_that_never_loads_is_an_error(rng, monkeypatch):
    import pytest

    import onnxpress.passes.cast_fp16 as cast_fp16

    monkeypatch.setattr(cast_fp16, "_loads", lambda path: "some other failure")
    with pytest.raises(ValueError, match="does not load in onnxruntime: some other failure"):
        CastFp16Pass()(to_ir(_model(rng)))


def test_excluded_nodes_stay_fp32(rng):
    proto = _model(rng)
    proto.graph.node[0].name = "first"
    model = to_ir(proto)
    CastFp16Pass(CastFp16Config(exclude_nodes=("first",)))(model)
    first = next(n for n in model.graph if n.name == "first")
    assert first.inputs[1].dtype == ir.DataType.FLOAT


def test_sensitive_op_inside_a_loop_body_loads(rng):
    """onnxruntime's converter put the Casts around a Softmax in a Loop body into the main
    graph, where their inputs do not exist: the model did not load."""
    import onnx.helper as oh
    import onnx.numpy_helper as onh

    body = oh.make_graph(
        [oh.make_node("Identity", ["c"], ["c_out"]), oh.make_node("MatMul", ["h", "W"], ["m"]),
         oh.make_node("Softmax", ["m"], ["h_out"], axis=-1)],
        "body",
        [oh.make_tensor_value_info("i", 7, []), oh.make_tensor_value_info("c", 9, []),
         oh.make_tensor_value_info("h", 1, None)],
        [oh.make_tensor_value_info("c_out", 9, []), oh.make_tensor_value_info("h_out", 1, None)],
    )
    graph = oh.make_graph(
        [oh.make_node("Loop", ["trip", "", "x"], ["y"], body=body)], "loop",
        [oh.make_tensor_value_info("x", 1, ["N", 16])], [oh.make_tensor_value_info("y", 1, ["N", 16])],
        [onh.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W"),
         onh.from_array(np.array(2, np.int64), "trip")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model = to_ir(proto)
    assert CastFp16Pass()(model).modified
    assert model.graph.initializers["W"].dtype == ir.DataType.FLOAT16
    x = rng.standard_normal((3, 16)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 1e-2  # float16 MatMul, float32 Softmax


def test_an_onnxruntime_crash_keeps_the_op_that_triggers_it_fp32(rng, monkeypatch):
    """onnxruntime 1.32 segfaults loading some float16 graphs (torch's TransformerEncoder, on
    its Transposes): the check runs in a child process, and op types are kept float32 one at
    a time until the model loads. Here the crash is simulated for float16 Transposes."""
    import onnx

    import onnxpress.passes.cast_fp16 as cast_fp16

    real = cast_fp16._loads

    def loads(path):
        proto = onnx.load(str(path))
        casts_to_fp32 = {o for n in proto.graph.node if n.op_type == "Cast" and n.attribute[0].i == 1 for o in n.output}
        if any(n.op_type == "Transpose" and n.input[0] not in casts_to_fp32 for n in proto.graph.node):
            return f"{cast_fp16.CRASHED} (signal 11) loading the float16 model"
        return real(path)

    monkeypatch.setattr(cast_fp16, "_loads", loads)
    proto = with_weights("""
    <ir_version: 8, opset_import: ["": 17]>
    t (float[N, 16] x) => (float[16, N] y) {
        h = MatMul (x, W)
        r = Relu (h)
        t = Transpose <perm = [1, 0]> (r)
        y = Add (t, t)
    }
    """, {"W": rng.standard_normal((16, 16)).astype(np.float32)})
    model = to_ir(proto)
    step = CastFp16Pass()
    step(model)
    assert step.details["kept_fp32_for_onnxruntime"] == ["Transpose"]
    assert model.graph.initializers["W"].dtype == ir.DataType.FLOAT16
    x = rng.standard_normal((3, 16)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < 1e-2

    monkeypatch.setattr(cast_fp16, "_loads", lambda path: f"{cast_fp16.CRASHED} (signal 11) loading the float16 model")
    import pytest

    with pytest.raises(ValueError, match="does not load in onnxruntime: onnxruntime crashed"):
        CastFp16Pass()(to_ir(proto))




def test_if_branches_whose_initializers_shadow_the_main_graphs(rng):
    """onnxruntime's converter keys initializers by name across graphs and died with a bare
    AssertionError on If branches holding their own ``W``. The branches' ``W`` are renamed
    first; each branch still multiplies by its own weights, as onnxruntime runs the original."""
    import onnx
    import onnx.helper as oh
    import onnx.numpy_helper as onh

    def branch(name: str, w: np.ndarray) -> onnx.GraphProto:
        return oh.make_graph([oh.make_node("MatMul", ["x", "W"], [f"y_{name}"])], name, [],
                             [oh.make_tensor_value_info(f"y_{name}", 1, ["N", 4])], [onh.from_array(w, "W")])

    weights = [rng.standard_normal((4, 4)).astype(np.float32) for _ in range(3)]
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["h"]),
         oh.make_node("If", ["c"], ["y"], then_branch=branch("then", weights[1]), else_branch=branch("else", weights[2]))],
        "g", [oh.make_tensor_value_info("x", 1, ["N", 4]), oh.make_tensor_value_info("c", 9, [])],
        [oh.make_tensor_value_info("h", 1, ["N", 4]), oh.make_tensor_value_info("y", 1, ["N", 4])],
        [onh.from_array(weights[0], "W")],
    )
    original = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()
    model = to_ir(onnx.load_from_string(original))
    assert CastFp16Pass()(model).modified
    assert model.graph.initializers["W"].dtype == ir.DataType.FLOAT16
    x = rng.standard_normal((3, 4)).astype(np.float32)
    for c, w in ((True, weights[1]), (False, weights[2])):
        feeds = {"x": x, "c": np.array(c)}
        (ref_h, ref_y), (got_h, got_y) = run_ort(onnx.load_from_string(original), feeds), run_ort(model, feeds)
        assert rel_error(x @ w, ref_y) < 1e-6  # onnxruntime reads the branch's own W
        assert rel_error(ref_y, got_y) < 1e-2 and rel_error(ref_h, got_h) < 1e-2
