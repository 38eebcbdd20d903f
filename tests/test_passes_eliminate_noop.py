"""eliminate-noop: nodes that provably return their input go; look-alikes that do not, stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import apply_passes, assert_bit_identical, assert_same_outputs, op_types, parse, run_ort

NOOPS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3,4] x) => (float[2,3,4] y)
<int64[3] shape = {2, 3, 4}, int64[3] pads0 = {0, 0, 0}, int64[6] zeros6 = {0, 0, 0, 0, 0, 0},
 int64[1] st = {0}, int64[1] en = {9223372036854775807}, int64[1] ax = {1}, int64[3] ones = {1, 1, 4}>
{
  a = Identity(x)
  b = Dropout(a)
  c = Cast<to = 1>(b)
  d = Reshape(c, shape)
  e = Expand(d, ones)
  f = Transpose<perm = [0, 1, 2]>(e)
  g1 = Squeeze(f)
  h = Pad(g1, zeros6)
  i = Slice(h, st, en, ax)
  y = Relu(i)
}
"""

KEEP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,1,4] x, float[2,3] v) => (float[8] y, double[2,1,4] z, float[2,1,4] s, float[2,1,2] t, float[3,2] u)
<int64[1] flat = {8}, int64[1] st = {0}, int64[1] en = {2}, int64[1] ax = {2}>
{
  y = Reshape(x, flat)
  z = Cast<to = 11>(x)
  sq = Squeeze(x)
  s = Unsqueeze(sq, ax1) 
  t = Slice(x, st, en, ax)
  u = Transpose(v)
}
"""


def test_removes_every_kind_of_noop(rng) -> None:
    before = parse(NOOPS)
    after, records = apply_passes(before, "eliminate-noop")
    assert op_types(after) == ["Relu"]
    assert records[0].details["removed"] == {
        "Identity": 1, "Dropout": 1, "Cast": 1, "Reshape": 1, "Expand": 1,
        "Transpose": 1, "Squeeze": 1, "Pad": 1, "Slice": 1,
    }
    assert_same_outputs(before, after, rng)


def test_keeps_nodes_that_change_something(rng) -> None:
    text = KEEP.replace("s = Unsqueeze(sq, ax1) ", "s = Unsqueeze(sq, ax1)").replace(
        "int64[1] ax = {2}>", "int64[1] ax = {2}, int64[1] ax1 = {1}>"
    )
    before = parse(text)
    after, records = apply_passes(before, "eliminate-noop")
    assert op_types(after) == op_types(before)
    assert not records[0].modified
    assert_same_outputs(before, after, rng)


def test_dropout_with_used_mask_or_training_stays(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x, bool train) => (float[4] y, bool[4] m, float[4] z)
    {
      y, m = Dropout(x)
      z = Dropout(x, , train)
    }
    """)
    after, _ = apply_passes(before, "eliminate-noop")
    assert op_types(after) == ["Dropout", "Dropout"]


def test_identity_to_graph_output_renames_producer(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y, float[4] x_out)
    {
      r = Relu(x)
      y = Identity(r)
      x_out = Identity(x)
    }
    """)
    after, _ = apply_passes(before, "eliminate-noop")
    # y's Identity goes (Relu now writes y); x_out = Identity(x) must stay: x is a graph input.
    assert op_types(after) == ["Relu", "Identity"]
    assert [o.name for o in after.graph.output] == ["y", "x_out"]
    assert_same_outputs(before, after, rng)


def test_noops_inside_if_loop_and_function(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2] x, bool c, int64 n) => (float[2] y, float[2] z, float[2] w)
    {
      y = If(c) <then_branch = t () => (float[2] ty) {
            a = Identity(x)
            ty = Abs(a)
         }, else_branch = e () => (float[2] ey) {
            b = Cast<to = 1>(x)
            ey = Neg(b)
         }>
      z = Loop(n, c, x) <body = bd (int64 i, bool cin, float[2] acc) => (bool cout, float[2] acc2) {
            cout = Identity(cin)
            d = Dropout(acc)
            acc2 = Add(d, x)
         }>
      w = local.F(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    F (t) => (u) {
      k = Identity(t)
      u = Neg(k)
    }
    """)
    after, records = apply_passes(before, "eliminate-noop")
    then_ops = [n.op_type for n in after.graph.node[0].attribute[0].g.node]
    else_ops = [n.op_type for n in after.graph.node[0].attribute[1].g.node]
    body_ops = [n.op_type for n in after.graph.node[1].attribute[0].g.node]
    assert then_ops == ["Abs"] and else_ops == ["Neg"]
    assert "Dropout" not in body_ops
    assert [n.op_type for n in after.functions[0].node] == ["Neg"]
    for n in (0, 3):
        for c in (True, False):
            feeds = {"x": rng.standard_normal(2).astype(np.float32), "c": np.array(c), "n": np.array(n)}
            assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_second_run_changes_nothing() -> None:
    once, _ = apply_passes(parse(NOOPS), "eliminate-noop")
    twice, records = apply_passes(once, "eliminate-noop")
    assert not records[0].modified
    assert op_types(once) == op_types(twice)


@pytest.mark.parametrize("dims", ["N,3,4", "2,3,4"])
def test_reshape_with_symbolic_dims_is_not_provable(dims: str, rng) -> None:
    before = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{dims}] x) => (float[2,3,4] y)
    <int64[3] shape = {{2, 3, 4}}>
    {{
      r = Reshape(x, shape)
      y = Relu(r)
    }}
    """)
    after, _ = apply_passes(before, "eliminate-noop")
    expected = ["Reshape", "Relu"] if dims.startswith("N") else ["Relu"]
    assert op_types(after) == expected
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))
    onnx.checker.check_model(after)
