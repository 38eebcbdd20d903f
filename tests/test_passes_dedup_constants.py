"""dedup-constants: equal constants (dtype, shape, bytes) share one tensor."""

from __future__ import annotations

import numpy as np

from conftest import apply_passes, assert_bit_identical, assert_same_outputs, op_types, parse, run_ort


def test_merges_equal_initializers_and_constant_nodes(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y)
    <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {1.0, 2.0, 3.0}, double[3] d = {1.0, 2.0, 3.0},
     float[3] other = {1.0, 2.0, 4.0}>
    {
      k1 = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      k2 = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      s1 = Add(x, a)
      s2 = Add(s1, b)
      s3 = Add(s2, k1)
      s4 = Add(s3, k2)
      s5 = Add(s4, other)
      dd = Cast<to = 1>(d)
      y = Add(s5, dd)
    }
    """)
    after, records = apply_passes(before, "dedup-constants")
    # b, k1 and k2 equal a; d (double) and other (different bytes) stay.
    assert records[0].details["merged"] == 3
    assert sorted(i.name for i in after.graph.initializer) == ["a", "d", "other"]
    assert "Constant" not in op_types(after)
    assert_same_outputs(before, after, rng)


def test_subgraph_constants_reuse_the_main_graphs(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y)
    <float[2] w = {0.5, 0.25}>
    {
      y = If(c) <then_branch = t () => (float[2] ty) <float[2] w2 = {0.5, 0.25}> {
            ty = Mul(x, w2)
         }, else_branch = e () => (float[2] ey) {
            k = Constant<value = float[2] {0.5, 0.25}>()
            ey = Add(x, k)
         }>
    }
    """)
    after, records = apply_passes(before, "dedup-constants")
    assert records[0].details["merged"] == 2
    then_g, else_g = (a.g for a in after.graph.node[0].attribute)
    assert len(then_g.initializer) == 0 and list(then_g.node[0].input) == ["x", "w"]
    assert [n.op_type for n in else_g.node] == ["Add"]
    for c in (True, False):
        feeds = {"x": rng.standard_normal(2).astype(np.float32), "c": np.array(c)}
        assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_subgraphs_never_read_a_main_graph_constant_node_defined_after_them(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x, bool c) => (float[4] y, float[4] z)
    {
      y = If(c) <then_branch = t () => (float[4] ty) {
            k = Constant <value = float[1] {2.0}> ()
            ty = Mul(x, k)
         }, else_branch = e () => (float[4] ey) {
            ey = Neg(x)
         }>
      k2 = Constant <value = float[1] {2.0}> ()
      z = Add(x, k2)
    }
    """)
    after, records = apply_passes(before, "dedup-constants")  # checks the topological order
    assert not records[0].modified
    for c in (True, False):
        feeds = {"x": rng.standard_normal(4).astype(np.float32), "c": np.array(c)}
        assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def test_graph_outputs_and_inputs_are_kept(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, float[2] w) => (float[2] y, float[2] k)
    <float[2] w = {1.0, 2.0}, float[2] v = {1.0, 2.0}>
    {
      k = Constant<value = float[2] {1.0, 2.0}>()
      a = Add(x, w)
      y = Add(a, v)
    }
    """)
    after, records = apply_passes(before, "dedup-constants")
    assert not records[0].modified
    assert op_types(after) == op_types(before)


def test_second_run_changes_nothing() -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y)
    <float[2] a = {1.0, 2.0}, float[2] b = {1.0, 2.0}>
    {
      s = Add(x, a)
      y = Mul(s, b)
    }
    """)
    once, _ = apply_passes(before, "dedup-constants")
    _, records = apply_passes(once, "dedup-constants")
    assert not records[0].modified
