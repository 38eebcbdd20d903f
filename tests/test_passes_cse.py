"""cse: repeated computations collapse into one, in subgraphs too."""

from __future__ import annotations

import numpy as np

from conftest import apply_passes, assert_bit_identical, assert_same_outputs, op_types, parse, run_ort


def test_merges_repeated_nodes(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y)
    {
      a = Relu(x)
      b = Relu(x)
      c = Mul(a, b)
      d = Mul(a, b)
      y = Add(c, d)
    }
    """)
    after, records = apply_passes(before, "cse")
    assert op_types(after) == ["Relu", "Mul", "Add"]
    assert records[0].details["merged_nodes"] == 2
    assert_same_outputs(before, after, rng)


def test_merges_inside_if_branches_and_keeps_random_ops(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x, bool c) => (float[4] y, float[4] r)
    {
      r1 = RandomUniformLike(x)
      r2 = RandomUniformLike(x)
      r = Sub(r1, r2)
      y = If(c) <then_branch = t () => (float[4] ty) {
            a = Abs(x)
            b = Abs(x)
            ty = Add(a, b)
         }, else_branch = e () => (float[4] ey) {
            ey = Neg(x)
         }>
    }
    """)
    after, _ = apply_passes(before, "cse")
    assert op_types(after).count("RandomUniformLike") == 2
    assert [n.op_type for n in after.graph.node[-1].attribute[0].g.node] == ["Abs", "Add"]
    for c in (True, False):
        feeds = {"x": rng.standard_normal(4).astype(np.float32), "c": np.array(c)}
        assert_bit_identical(run_ort(before, feeds)[:1], run_ort(after, feeds)[:1])


def test_keeps_constants_of_opposite_zeros_apart(rng) -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y, float[4] z)
    {
      p = Constant <value_float = 0.0> ()
      n = Constant <value_float = -0.0> ()
      y = Div(x, p)
      z = Div(x, n)
    }
    """)
    after, records = apply_passes(before, "cse")
    assert op_types(after).count("Constant") == 2
    assert records[0].details["merged_nodes"] == 0
    assert_same_outputs(before, after, rng)


def test_type_attributes_compare_without_error() -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (bool a, bool b, bool c)
    {
      o1 = Optional <type = float[4]> ()
      o2 = Optional <type = float[4]> ()
      o3 = Optional <type = int64[4]> ()
      a = OptionalHasElement(o1)
      b = OptionalHasElement(o2)
      c = OptionalHasElement(o3)
    }
    """)
    after, records = apply_passes(before, "cse")
    assert op_types(after).count("Optional") == 2
    outs = run_ort(after, {"x": np.zeros(4, np.float32)})
    assert [bool(v) for v in outs] == [False, False, False]


def test_keeps_random_draws_apart() -> None:
    before = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[64] x, bool t) => (float[64] y, float[64] z)
    {
      b1 = Bernoulli(x)
      b2 = Bernoulli(x)
      y = Sub(b1, b2)
      r = Constant <value_float = 0.5> ()
      d1 = Dropout(x, r, t)
      d2 = Dropout(x, r, t)
      z = Sub(d1, d2)
    }
    """)
    after, records = apply_passes(before, "cse")
    assert op_types(after).count("Bernoulli") == 2
    assert op_types(after).count("Dropout") == 2
    assert records[0].details["merged_nodes"] == 0
