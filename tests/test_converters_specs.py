"""Input descriptions, generated check data and the fidelity metrics (no framework needed)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress.converters.fidelity import FidelityRecord, compare_output
from onnxpress.converters.specs import (
    InputSpec,
    batches_from_data,
    check_batch_sizes,
    generate_inputs,
    load_callable,
    load_npz,
    parse_inputs,
)
from onnxpress.errors import InputError, ValidationFailedError


def test_parse_dynamic_and_fixed_dims() -> None:
    spec = InputSpec.parse("input_ids:Bx128:int64")
    assert spec.name == "input_ids" and spec.dtype == np.int64
    assert spec.onnx_shape() == ["B", 128]
    image = InputSpec.parse("image:1x3x32x32:float32")
    assert image.onnx_shape() == ["batch", 3, 32, 32]  # batch dynamic by default
    static = InputSpec.parse("image:1x3x32x32:float32", static_batch=True)
    assert static.onnx_shape() == [1, 3, 32, 32] and not static.batch_dynamic
    tokens = InputSpec.parse("tokens:batch,max_len=20:int64:0..500")
    assert tokens.onnx_shape() == ["batch", "max_len"]
    assert tokens.shape(3) == (3, 20) and (tokens.low, tokens.high) == (0, 500)


@pytest.mark.parametrize(
    "text, words",
    [
        ("x:Bx4", "NAME:SHAPE:DTYPE"),
        ("x:Bx4:complex64", "unknown dtype"),
        ("x:Bx-1:float32", "neither a size nor a name"),
        ("x:Bx0:float32", "positive"),
        ("x:Bx4:int64:9..3", "LOW..HIGH"),
    ],
)
def test_parse_errors_name_the_problem(text: str, words: str) -> None:
    with pytest.raises(InputError, match=words):
        InputSpec.parse(text)


def test_parse_inputs_rejects_duplicates_and_disagreeing_dims() -> None:
    with pytest.raises(InputError, match="given twice"):
        parse_inputs(["x:Bx4:float32", "x:Bx5:float32"])
    with pytest.raises(InputError, match="seq"):
        parse_inputs(["a:Bxseq=8:int64", "b:Bxseq=9:int64"])


def test_generated_inputs_are_reproducible_and_respect_ranges() -> None:
    specs = parse_inputs(["ids:Bxseq=12:int64:5..9", "attention_mask:Bxseq=12:int64", "x:Bx3:float32"])
    first = generate_inputs(specs, 4, seed=7)
    again = generate_inputs(specs, 4, seed=7)
    other = generate_inputs(specs, 4, seed=8)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["x"], other["x"])
    assert first["ids"].min() >= 5 and first["ids"].max() < 9
    mask = first["attention_mask"]
    assert set(np.unique(mask)) <= {0, 1} and (mask[:, 0] == 1).all()
    # each row is ones then zeros
    assert all((np.diff(row) <= 0).all() for row in mask)
    varied = generate_inputs(specs, 4, seed=7, vary=True)
    assert varied["ids"].shape == (4, 9) and varied["x"].shape == (4, 3)


def test_check_batch_sizes_follow_the_batch_dimension() -> None:
    assert check_batch_sizes(parse_inputs(["x:Bx3:float32"]), [1, 4]) == [1, 4]
    static = parse_inputs(["x:5x3:float32", "s:scalar:float32"], static_batch=True)
    assert check_batch_sizes(static, [1, 4]) == [5]
    assert check_batch_sizes(parse_inputs(["s:scalar:float32"]), [1, 4]) == [1]


def test_npz_loading_and_batching(tmp_path, rng: np.random.Generator) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((10, 3)).astype(np.float32))
    data = load_npz(path)
    batches = batches_from_data(data, [1, 4, 50])
    assert [b["x"].shape[0] for b in batches] == [1, 4, 10]
    bad = tmp_path / "bad.npz"
    np.savez(bad, o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable"):
        load_npz(bad)


def test_load_callable_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="cannot import module"):
        load_callable("no_such_module_xyz:build")
    script = tmp_path / "m.py"
    script.write_text("def build():\n    return 3\n")
    assert load_callable(f"{script}:build")() == 3
    with pytest.raises(InputError, match="has no callable 'make'.*build"):
        load_callable(f"{script}:make")
    with pytest.raises(InputError, match="no such file"):
        load_callable(f"{tmp_path}/missing.py:build")


def test_compare_output_metrics(rng: np.random.Generator) -> None:
    ref = rng.standard_normal((4, 16)).astype(np.float32)
    same = compare_output("y", 4, ref, ref.copy(), atol=1e-6, rtol=0, min_cosine=None)
    assert same.passed and same.max_abs_error == 0 and same.cosine == pytest.approx(1.0)
    noisy = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    result = compare_output("y", 4, ref, noisy, atol=1e-5, rtol=0, min_cosine=None)
    assert not result.passed and result.mismatched > 0
    expected_rel = np.linalg.norm(noisy - ref) / np.linalg.norm(ref)
    assert result.rel_l2_error == pytest.approx(expected_rel, rel=1e-4)
    assert result.max_abs_error == pytest.approx(np.abs(noisy - ref).max(), rel=1e-5)
    loose = compare_output("y", 4, ref, noisy, atol=1e-1, rtol=0, min_cosine=0.9999999999)
    assert not loose.passed and "cosine" in loose.note
    shape = compare_output("y", 4, ref, ref[:2], atol=1, rtol=1, min_cosine=None)
    assert not shape.passed and "shape" in shape.note
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare_output("y", 4, ref, nan, atol=1, rtol=1, min_cosine=None).passed


def test_failed_record_raises_with_every_output_named(rng: np.random.Generator) -> None:
    ref = rng.standard_normal((2, 3))
    record = FidelityRecord(atol=1e-6, rtol=0, min_cosine=None, inputs="test")
    record.outputs.append(compare_output("good", 2, ref, ref, atol=1e-6, rtol=0, min_cosine=None))
    record.outputs.append(compare_output("bad", 2, ref, ref + 1, atol=1e-6, rtol=0, min_cosine=None))
    assert not record.passed
    with pytest.raises(ValidationFailedError, match="'bad'") as info:
        record.raise_if_failed()
    assert info.value.exit_code == 4
    as_dict = record.to_dict()
    assert as_dict["passed"] is False and len(as_dict["outputs"]) == 2
    assert "bad" in record.table() and "NO" in record.table()
