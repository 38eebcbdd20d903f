"""Generated graphs: the lossless preset keeps every output bit-identical and is idempotent."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_bit_identical, run_ort
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import load_preset

SHAPE = [2, 3]
UNARY = ["Identity", "Relu", "Neg", "Abs", "Dropout", "Cast", "Reshape", "Transpose", "Squeeze", "Sqrt"]
BINARY = ["Add", "Mul", "Sub", "Max"]


@st.composite
def graphs(draw: st.DrawFn) -> onnx.ModelProto:
    """A random DAG over [2, 3] float tensors with constants, duplicates, no-ops and dead ends."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = ["x"]
    initializers = [oh.make_tensor("shape", onnx.TensorProto.INT64, [2], SHAPE)]
    nodes = []
    n_consts = draw(st.integers(0, 3))
    for i in range(n_consts):
        data = rng.standard_normal(SHAPE).astype(np.float32)
        initializers.append(onnx.numpy_helper.from_array(data, f"c{i}"))
        values.append(f"c{i}")
        if draw(st.booleans()):  # an exact duplicate
            initializers.append(onnx.numpy_helper.from_array(data.copy(), f"c{i}_dup"))
            values.append(f"c{i}_dup")
        if draw(st.booleans()):  # the same data as a Constant node
            nodes.append(oh.make_node("Constant", [], [f"k{i}"], value=onnx.numpy_helper.from_array(data.copy())))
            values.append(f"k{i}")
    for i in range(draw(st.integers(1, 12))):
        out = f"v{i}"
        if draw(st.booleans()):
            op = draw(st.sampled_from(UNARY))
            a = draw(st.sampled_from(values))
            if op == "Cast":
                nodes.append(oh.make_node(op, [a], [out], to=onnx.TensorProto.FLOAT))
            elif op == "Reshape":
                nodes.append(oh.make_node(op, [a, "shape"], [out]))
            elif op == "Transpose":
                nodes.append(oh.make_node(op, [a], [out], perm=[0, 1]))
            elif op == "Sqrt":
                abs_out = f"abs{i}"
                nodes.append(oh.make_node("Abs", [a], [abs_out]))
                nodes.append(oh.make_node(op, [abs_out], [out]))
            else:
                nodes.append(oh.make_node(op, [a], [out]))
        else:
            op = draw(st.sampled_from(BINARY))
            nodes.append(oh.make_node(op, [draw(st.sampled_from(values)), draw(st.sampled_from(values))], [out]))
        values.append(out)
    produced = [v for v in values if v.startswith("v")]
    outputs = sorted(set(draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3))))
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, SHAPE)],
        [oh.make_tensor_value_info(o, onnx.TensorProto.FLOAT, SHAPE) for o in outputs],
        initializers,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_lossless_preset_is_bit_identical_and_idempotent(proto: onnx.ModelProto) -> None:
    model = ir.from_proto(proto)
    pipeline = Pipeline.from_recipe(load_preset("lossless"))
    pipeline.run(model)
    once = ir.to_proto(model)
    onnx.checker.check_model(once, full_check=True)
    assert [o.name for o in once.graph.output] == [o.name for o in proto.graph.output]
    assert len(once.graph.node) <= len(proto.graph.node)
    rng = np.random.default_rng(0)
    for _ in range(2):
        feeds = {"x": rng.standard_normal(SHAPE).astype(np.float32)}
        assert_bit_identical(run_ort(proto, feeds), run_ort(once, feeds))
    second = pipeline.run(model)
    assert not any(r.modified for r in second), [r.pass_name for r in second if r.modified]
