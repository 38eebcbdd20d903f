"""prune-dead: unused nodes, initializers, functions and opsets go; initializer inputs stay."""

from __future__ import annotations

import numpy as np
import onnx

from conftest import apply_passes, assert_bit_identical, assert_same_outputs, op_types, parse, run_ort

MODEL = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1, "unused.domain" : 1]>
g (float[2,3] x, float[3] w_in) => (float[2,3] y)
<float[3] w_in = {1.0, 2.0, 3.0}, float[3] unused = {4.0, 5.0, 6.0}>
{
  a = Add(x, w_in)
  dead1 = Mul(x, x)
  dead2 = Neg(dead1)
  y = local.Twice(a)
}
<domain: "local", opset_import: ["" : 17]>
Twice (t) => (u) {
  d = Neg(t)
  u = Add(t, t)
}
<domain: "local", opset_import: ["" : 17]>
Never (t) => (u) {
  u = Neg(t)
}
"""


def test_removes_dead_nodes_initializers_functions_and_opsets(rng) -> None:
    before = parse(MODEL)
    after, records = apply_passes(before, "prune-dead")
    assert op_types(after) == ["Add", "Twice"]
    assert [i.name for i in after.graph.initializer] == ["w_in"]
    assert [i.name for i in after.graph.input] == ["x", "w_in"]
    assert [f.name for f in after.functions] == ["Twice"]
    assert [n.op_type for n in after.functions[0].node] == ["Add"]
    assert {o.domain for o in after.opset_import} == {"", "local"}
    details = records[0].details
    assert details["nodes"] == 3 and details["initializers"] == 1
    assert details["functions"] == 1
    assert records[0].modified
    assert_same_outputs(before, after, rng)


def test_initializer_inputs_stay_overridable(rng) -> None:
    """A lossless preset must not turn a default the caller may override into a constant."""
    before = parse(MODEL)
    after, _ = apply_passes(before, "prune-dead", "fold-constants", "eliminate-noop", "dedup-constants", "cse")
    assert "w_in" in [i.name for i in after.graph.input]
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32), "w_in": rng.standard_normal(3).astype(np.float32)}
    assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_walks_into_if_and_loop_bodies(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c, int64 n) => (float[2] y, float[2] z)
    {
      y = If(c) <then_branch = t () => (float[2] ty) <float[2] unused_t = {1.0, 2.0}> {
            dead = Neg(x)
            ty = Abs(x)
         }, else_branch = e () => (float[2] ey) {
            ey = Neg(x)
         }>
      z = Loop(n, c, x) <body = b (int64 i, bool cin, float[2] acc) => (bool cout, float[2] acc2) {
            cout = Identity(cin)
            dead_l = Mul(acc, acc)
            acc2 = Add(acc, x)
         }>
    }
    """)
    after, records = apply_passes(before, "prune-dead")
    then_branch = after.graph.node[0].attribute[0].g
    assert [n.op_type for n in then_branch.node] == ["Abs"]
    assert len(then_branch.initializer) == 0
    body = after.graph.node[1].attribute[0].g
    assert "Mul" not in [n.op_type for n in body.node]
    assert records[0].details["nodes"] == 2
    for n in (0, 1, 4):
        for c in (True, False):
            feeds = {"x": rng.standard_normal(2).astype(np.float32), "c": np.array(c),
                     "n": np.array(n, dtype=np.int64)}
            assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_second_run_changes_nothing() -> None:
    once, _ = apply_passes(parse(MODEL), "prune-dead")
    twice, records = apply_passes(once, "prune-dead")
    assert not records[0].modified
    assert onnx.printer.to_text(once) == onnx.printer.to_text(twice)


def test_values_read_only_by_a_removed_if_are_removed_in_the_same_run(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y)
    {
      a = Neg(x)
      b = Abs(a)
      dead = If(c) <then_branch = t () => (float[2] ty) {
            ty = Relu(b)
         }, else_branch = e () => (float[2] ey) {
            ey = Identity(a)
         }>
      y = Sqrt(x)
    }
    """)
    after, records = apply_passes(before, "prune-dead")
    assert op_types(after) == ["Sqrt"]
    assert records[0].details["nodes"] == 5
    again, records = apply_passes(after, "prune-dead")
    assert not records[0].modified
    for c in (True, False):
        feeds = {"x": rng.random(2).astype(np.float32), "c": np.array(c)}
        assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))
