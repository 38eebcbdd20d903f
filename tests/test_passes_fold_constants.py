"""fold-constants: constant subgraphs are evaluated ahead, within the size budget."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import apply_passes, assert_bit_identical, assert_same_outputs, op_types, parse, run_ort
from onnxpress.passes.fold_constants import _evaluate
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import Recipe, RecipeStep


def _fold(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, list]:
    import onnx_ir as ir

    model = ir.from_proto(proto)
    records = Pipeline.from_recipe(Recipe([RecipeStep("fold-constants", options, "steps[1]")])).run(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return out, records


def test_folds_constant_chains_bit_exactly(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,4] x) => (float[3,4] y)
    <float[4,3] w = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2}, float scale = {0.7}>
    {
      wt = Transpose(w)
      ws = Mul(wt, scale)
      wsq = Sqrt(ws)
      k = Constant<value = float[1] {3.0}>()
      wk = Div(wsq, k)
      y = Add(x, wk)
    }
    """)
    after, records = _fold(before)
    assert op_types(after) == ["Add"]
    assert records[0].details["folded"] == {"Transpose": 1, "Mul": 1, "Sqrt": 1, "Div": 1}
    assert_same_outputs(before, after, rng)


def test_constant_of_shape_of_100mb_stays_unfolded(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y)
    <int64[2] shape = {5120, 5120}>
    {
      big = ConstantOfShape<value = float[1] {0.5}>(shape)
      total = ReduceSum<keepdims = 0>(big)
      y = Add(x, total)
    }
    """)
    after, records = _fold(before)
    assert "ConstantOfShape" in op_types(after)
    assert records[0].details["kept_for_size"]
    assert after.ByteSize() < 10_000
    assert records[0].after.constant_bytes < 1000
    assert_same_outputs(before, after, rng)


def test_budget_is_configurable(rng) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[64] x) => (float[64] y)
    <int64[1] shape = {64}>
    {
      c = ConstantOfShape<value = float[1] {0.25}>(shape)
      y = Add(x, c)
    }
    """
    kept, _ = _fold(parse(text), size_budget_bytes=100)
    folded, records = _fold(parse(text), size_budget_bytes=1000)
    assert "ConstantOfShape" in op_types(kept)
    assert op_types(folded) == ["Add"]
    assert_same_outputs(parse(text), folded, rng)


def test_shape_of_static_value_folds_and_custom_ops_are_left(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>
    g (float[2,6] x) => (float[3,4] y)
    <float[2] c = {1.0, 2.0}, int64[2] target = {3, 4}>
    {
      s = Shape(x)
      n = Size(x)
      r = Reshape(x, target)
      y = Identity(r)
      odd = custom.domain.Weird(c)
    }
    """)
    after, records = _fold(before)
    assert "Shape" not in op_types(after) and "Size" not in op_types(after)
    assert "Weird" in op_types(after)
    assert records[0].details["folded"] == {"Shape": 1, "Size": 1}


def test_shape_that_an_if_condition_reads_is_not_folded() -> None:
    """onnxruntime inlines an If with a constant condition and then refuses Range([1]) (AffineGrid)."""
    before = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (int64[2] size) => (float[?] y)
    {
      n = Size(size)
      two = Constant <value = int64 {2}> ()
      is2 = Equal(n, two)
      four = Constant <value = int64[1] {4}> ()
      w = If(is2) <then_branch = t () => (int64[1] tw) {
            tw = Identity(four)
         }, else_branch = e () => (int64[1] ew) {
            ew, rest = Split <num_outputs = 2> (size)
         }>
      zero = Constant <value = int64 {0}> ()
      one = Constant <value = int64 {1}> ()
      r = Range(zero, w, one)
      y = Cast <to = 1> (r)
    }
    """)
    after, records = _fold(before)
    assert "Size" in op_types(after)
    feeds = {"size": np.array([3, 5], np.int64)}
    assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_node_with_an_unnamed_first_output_folds(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y)
    {
      shp = Constant <value = int64[1] {2}> ()
      s = Constant <value = float[1,1,1] {0.5}> ()
      w = Constant <value = float[1,8,1] {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}> ()
      r = Constant <value = float[1,8,2] {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                          0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1}> ()
      , h = LSTM <hidden_size = 2> (s, w, r)
      f = Reshape(h, shp)
      y = Add(x, f)
    }
    """)
    after, records = _fold(before)
    assert records[0].details["folded"] == {"LSTM": 1, "Reshape": 1}
    assert_same_outputs(before, after, rng)


def test_float8_results_are_not_reread_as_uint8(rng) -> None:
    """onnxruntime hands float8 results back as uint8 arrays; folding them would change the type."""
    before = parse("""
    <ir_version: 9, opset_import: ["" : 19]>
    g (float[3] x) => (float[3] z)
    <float[3] a = {1.0, 2.0, 3.0}>
    {
      d = Cast <to = 17> (a)
      e = Cast <to = 1> (d)
      z = Add(x, e)
    }
    """)
    after, records = _fold(before)
    assert records[0].details["folded"] == {}
    assert all(i.data_type != onnx.TensorProto.UINT8 for i in after.graph.initializer)
    assert_same_outputs(before, after, rng)
    # Also when the graph gives no type to check against: the evaluation itself refuses.
    model = ir.from_proto(before)
    cast = next(n for n in model.graph if n.op_type == "Cast")
    with pytest.raises(TypeError, match="float8"):
        _evaluate(cast, model, [np.array([1.0, 2.0, 3.0], np.float32)])


def test_training_dropout_of_constants_is_not_folded() -> None:
    """Its mask is drawn afresh on every run; folding would freeze one draw."""
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[64] x) => (float[64] y)
    <float[64] c = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0},
     float r = {0.5}, bool t = {1}>
    {
      d = Dropout(c, r, t)
      y = Add(x, d)
    }
    """)
    after, records = _fold(before)
    assert "Dropout" in op_types(after)
    assert records[0].details["folded"] == {}


def test_quantize_nodes_graph_outputs_and_overridable_inputs_are_not_folded(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, float[2] w) => (float[2] y, float[2] c)
    <int8[2] q = {3, -4}, float s = {0.5}, float[2] w = {1.0, 2.0}, float[2] k = {3.0, 4.0}>
    {
      d = DequantizeLinear(q, s)
      c = Neg(k)
      a = Mul(w, w)
      xa = Add(x, a)
      y = Add(xa, d)
    }
    """)
    after, records = _fold(before)
    assert op_types(after) == op_types(before)
    assert not records[0].modified
    feeds = {"x": rng.standard_normal(2).astype(np.float32), "w": rng.standard_normal(2).astype(np.float32)}
    assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_folds_inside_subgraphs_using_outer_constants(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y)
    <float[2] w = {1.5, -2.0}>
    {
      y = If(c) <then_branch = t () => (float[2] ty) {
            ww = Mul(w, w)
            ty = Add(x, ww)
         }, else_branch = e () => (float[2] ey) {
            nw = Neg(w)
            ey = Sub(x, nw)
         }>
    }
    """)
    after, records = apply_passes(before, "fold-constants")
    assert records[0].details["folded"] == {"Mul": 1, "Neg": 1}
    for branch in after.graph.node[0].attribute:
        assert len(branch.g.node) == 1 and len(branch.g.initializer) == 1
    for c in (True, False):
        feeds = {"x": rng.standard_normal(2).astype(np.float32), "c": np.array(c)}
        assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_second_run_changes_nothing() -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y)
    <float[3] w = {1.0, 4.0, 9.0}>
    {
      r = Sqrt(w)
      y = Mul(x, r)
    }
    """)
    once, _ = apply_passes(before, "fold-constants")
    _, records = apply_passes(once, "fold-constants")
    assert not records[0].modified
