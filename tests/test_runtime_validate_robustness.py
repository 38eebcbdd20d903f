"""``validate`` on model pairs it was not written for: each test pins a bug a robustness sweep found.

Every model is a few nodes of ONNX text; every expected metric is computed here with numpy
from onnxruntime's outputs, on fresh random inputs.
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import parse, run_ort
from onnxpress.cli import main
from onnxpress.cli.validate_cmd import parse_dims
from onnxpress.errors import InputError
from onnxpress.runtime import Tolerances, localize, validate
from onnxpress.runtime.html_report import render_html
from onnxpress.runtime.runner import InputSpec
from onnxpress.runtime.validate import random_inputs

OPSET = '<ir_version: 8, opset_import: ["" : 18]>\n'


def save(tmp_path: Path, name: str, text: str, **initializers: np.ndarray) -> Path:
    proto = parse(OPSET + text) if not initializers else onnx.parser.parse_model(OPSET + text)
    for key, array in initializers.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, key))
    onnx.checker.check_model(proto)
    path = tmp_path / name
    onnx.save(proto, path)
    return path


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_ort(onnx.load(path), feeds)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["validate", *map(str, args), "--no-progress", "--no-speed"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)


def test_same_infinity_or_nan_in_both_models_is_an_exact_match(tmp_path: Path, rng: np.random.Generator,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Was: Log(0) = -inf in both models gave inf - inf = NaN, counted as a non-finite difference: FAIL."""
    ref = save(tmp_path, "ref.onnx", "g (float[N, 6] x) => (float[N, 6] y, float[N, 6] s) "
               "{ r = Relu(x)  y = Log(r)  s = Sqrt(x) }")
    cand = save(tmp_path, "cand.onnx", "g (float[N, 6] x) => (float[N, 6] y, float[N, 6] s) "
                "{ r = Relu(x)  y = Log(r)  a = Abs(x)  s = Sqrt(a) }")
    x = rng.standard_normal((40, 6)).astype(np.float32)
    same = validate(ref, ref, data={"x": x}, measure_speed=False)
    assert same.passed and same.outputs["y"].nonfinite == 0 and same.outputs["s"].nonfinite == 0
    assert same.outputs["y"].max_abs_error == 0.0 and same.outputs["y"].mean_cosine == 1.0
    # NaN only in the reference (Sqrt of negatives): counted, and the other metrics stay numbers
    report = validate(ref, cand, data={"x": x}, measure_speed=False)
    s = report.outputs["s"]
    assert s.nonfinite == int((x < 0).sum()) > 0 and not report.passed
    r, c = outputs(ref, {"x": x})[1], outputs(cand, {"x": x})[1]
    finite = np.isfinite(r)
    assert s.max_abs_error == pytest.approx(np.abs(r[finite] - c[finite]).max(), rel=1e-6)
    assert all(math.isfinite(v) for v in (s.mean_abs_error, s.mean_cosine, s.min_cosine, s.rel_l2_error))
    assert report.outputs["y"].nonfinite == 0
    status, _, err = cli(capsys, ref, cand, "--data", _npz(tmp_path, x=x), "--report", tmp_path / "r.json")
    assert status == 4 and "Traceback" not in err and "RuntimeWarning" not in err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["outputs"]["s"]["nonfinite_differences"] == s.nonfinite and data["outputs"]["y"]["max_abs_error"] == 0


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_one_value_per_sample_takes_one_cosine_over_all_samples(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: the cosine of two numbers is their sign agreement, so a Relu regressor with a 1e-6
    offset (0 against 1e-6: cosine 0) failed at mean cosine ~0.5, with a max abs error of 1e-6."""
    w = rng.standard_normal((8, 1)).astype(np.float32)
    text = "g (float[N, 8] x) => (float[N, 1] y, float[N] score) {{ m = MatMul(x, w)  r = Relu(m)  y = {}  " \
           "score = ReduceSum<keepdims=0>(m, ax) }}"
    ax = np.array([1], np.int64)
    ref = save(tmp_path, "ref.onnx", text.format("Identity(r)"), w=w, ax=ax)
    cand = save(tmp_path, "cand.onnx", text.format("Add(r, b)"), w=w, ax=ax, b=np.array([1e-6], np.float32))
    x = rng.standard_normal((64, 8)).astype(np.float32)
    report = validate(ref, cand, data={"x": x}, batch_size=16, measure_speed=False)
    r, c = (o.astype(np.float64) for o in (outputs(ref, {"x": x})[0], outputs(cand, {"x": x})[0]))
    expected = float((r * c).sum() / np.sqrt((r * r).sum() * (c * c).sum()))
    assert report.outputs["y"].mean_cosine == pytest.approx(expected, rel=1e-9)
    assert report.outputs["y"].min_cosine == report.outputs["y"].mean_cosine
    assert report.outputs["y"].max_abs_error == pytest.approx(np.abs(r - c).max(), rel=1e-6)
    assert report.outputs["y"].max_abs_error < 2e-6
    assert report.passed and report.outputs["score"].mean_cosine == 1.0


def test_scalar_outputs_are_compared_batch_by_batch(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: np.concatenate of 0-d outputs raised ValueError (a traceback); and with a fixed batch
    size the runner sliced the scalar of the padded last batch (IndexError)."""
    ref = save(tmp_path, "ref.onnx", "g (float[N, 4] x) => (float m) { m = ReduceMean<keepdims=0>(x) }")
    cand = save(tmp_path, "cand.onnx", "g (float[N, 4] x) => (float m) { a = ReduceMean<keepdims=0>(x)  "
                "m = Mul(a, k) }", k=np.array(1.01, np.float32))
    x = rng.standard_normal((100, 4)).astype(np.float32)
    report = validate(ref, cand, data={"x": x}, batch_size=8, measure_speed=False)
    means = np.array([x[i:i + 8].mean() for i in range(0, 100, 8)], np.float64)
    m = report.outputs["m"]
    assert m.samples == len(means) == 13
    assert m.max_abs_error == pytest.approx(np.abs(means * 0.01).max(), rel=1e-3)
    fixed = save(tmp_path, "fixed.onnx", "g (float[4, 4] x) => (float s) { s = ReduceSum<keepdims=0>(x) }")
    timed = validate(fixed, fixed, data={"x": x[:10]}, speed_repeats=1)
    assert timed.passed and timed.outputs["s"].samples == 3 and timed.reference.samples_per_second > 0


def test_outputs_whose_shape_varies_between_batches(tmp_path: Path, rng: np.random.Generator,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Was: NonZero's [2, M] outputs of different M could not be concatenated (ValueError)."""
    ref = save(tmp_path, "ref.onnx", "g (float[N, 4] x) => (int64[2, M] idx) { idx = NonZero(x) }")
    cand = save(tmp_path, "cand.onnx", "g (float[N, 4] x) => (int64[2, M] idx) { r = Relu(x)  idx = NonZero(r) }")
    x = rng.standard_normal((50, 4)).astype(np.float32)
    x[x == 0] = 1
    same = validate(ref, ref, data={"x": x}, batch_size=8, measure_speed=False)
    assert same.passed and same.outputs["idx"].max_abs_error == 0
    status, out, _ = cli(capsys, ref, cand, "--data", _npz(tmp_path, x=x), "--batch-size", "8",
                           "--report", tmp_path / "r.json", "--html", tmp_path / "r.html")
    assert status == 4 and "shapes differ" in out
    data = json.loads((tmp_path / "r.json").read_text())
    # no metric where nothing comparable was measured: zeros would read as a perfect match
    assert data["outputs"]["idx"]["max_abs_error"] is None and data["outputs"]["idx"]["mean_cosine"] is None
    assert data["checks"][0]["passed"] is False and "same shape" in data["checks"][0]["check"]
    parser = _Html()
    parser.feed((tmp_path / "r.html").read_text())
    assert "svg" in parser.tags and "shapes differ" in (tmp_path / "r.html").read_text()


def test_labels_are_scored_on_the_class_score_output(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: labels were compared with the first 2-D output, here the 16-wide embedding, and a
    [N, 1] output was accepted (its arg-max is always 0)."""
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    ref = save(tmp_path, "ref.onnx", "g (float[N, 8] x) => (float[N, 16] embedding, float[N, 4] logits) "
               "{ embedding = MatMul(x, w1)  logits = MatMul(embedding, w2) }", w1=w1, w2=w2)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    logits = outputs(ref, {"x": x})[1]
    labels = logits.argmax(1)
    labels[:15] = (labels[:15] + 1) % 4
    report = validate(ref, ref, data={"x": x}, labels=labels, measure_speed=False)
    assert report.label_output == "logits" and report.reference.accuracy == pytest.approx(75.0)
    one = save(tmp_path, "one.onnx", "g (float[N, 8] x) => (float[N, 1] logit) { logit = MatMul(x, w) }",
               w=w1[:, :1].copy())
    with pytest.raises(InputError, match=r"no output holds class scores \[samples, classes >= 2\].*logit"):
        validate(one, one, data={"x": x}, labels=labels, measure_speed=False)
    # labels found in the data are skipped with a warning when no output holds class scores
    report = validate(one, one, data={"x": x, "label": labels}, measure_speed=False)
    assert report.reference.accuracy is None and any("accuracy is not measured" in w for w in report.warnings)


def test_labels_must_belong_to_the_data(tmp_path: Path, rng: np.random.Generator,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Was: 200 labels for 100 samples were cut silently, labels of class 13 for 4 classes scored
    0 % silently, and a column of labels [N, 1] was refused."""
    w = rng.standard_normal((8, 4)).astype(np.float32)
    ref = save(tmp_path, "ref.onnx", "g (float[N, 8] x) => (float[N, 4] logits) { logits = MatMul(x, w) }", w=w)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    labels = outputs(ref, {"x": x})[0].argmax(1)
    data = _npz(tmp_path, x=x)
    for name, bad, message in (("long", np.concatenate([labels, labels]), "200 labels for data of 100 samples"),
                               ("range", labels + 10, r"class indices must be \[0, 4\) for output 'logits'"),
                               ("negative", labels - 5, r"got values from -")):
        np.save(tmp_path / f"{name}.npy", bad)
        status, _, err = cli(capsys, ref, ref, "--data", data, "--labels", tmp_path / f"{name}.npy")
        assert status == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith("onnxpress validate: error: labels:")
        with pytest.raises(InputError, match=message):
            validate(ref, ref, data=data, labels=bad, measure_speed=False)
    column = validate(ref, ref, data=data, labels=labels[:, None], measure_speed=False)
    assert column.reference.accuracy == 100.0
    # more samples than the data holds: all of them, and said
    report = validate(ref, ref, data=data, labels=labels, samples=500, measure_speed=False)
    assert report.samples == 100 and any("500 samples were asked for" in w for w in report.warnings)
    # labels of the whole data with --samples are cut to the samples validated
    assert validate(ref, ref, data=data, labels=labels, samples=30, measure_speed=False).reference.accuracy == 100.0
    # labels in the data that are not class indices are not scored
    report = validate(ref, ref, data={"x": x, "label": labels + 0.5}, measure_speed=False)
    assert report.reference.accuracy is None and any("not one class index" in w for w in report.warnings)
    report = validate(ref, ref, data={"x": x, "label": labels + 4}, measure_speed=False)
    assert report.reference.accuracy is None and any("not class indices [0, 4)" in w for w in report.warnings)


def test_a_model_that_fails_on_random_inputs_says_to_pass_data(tmp_path: Path, rng: np.random.Generator,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Was: random token ids in [0, 100) on a 30-word embedding made onnxruntime raise, and the
    CLI printed its traceback. (A plain ``Gather`` now bounds the random ids, see the next test:
    here the ids are shifted first, so no bound is known.)"""
    table = rng.standard_normal((30, 8)).astype(np.float32)
    model = save(tmp_path, "tok.onnx", "g (int64[batch, seq] input_ids) => (float[batch, seq, 8] emb) "
                 "{ one = Constant<value = int64 {1}>() shifted = Add(input_ids, one) "
                 "emb = Gather(table, shifted) }", table=table)
    with pytest.raises(InputError, match=r"reference .*tok.onnx: samples 0-32: onnxruntime cannot run the model.*Gather.*"
                                         r"inputs are random.*pass --data"):
        validate(model, model, dims={"seq": 5}, measure_speed=False)
    status, _, err = cli(capsys, model, model, "--dim", "seq=5")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--data" in err
    ids = rng.integers(0, 29, (20, 5))  # shifted by one inside the model
    assert validate(model, model, data={"input_ids": ids}, measure_speed=False).passed


def test_random_ids_stay_inside_the_embedding_tables_they_index(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: random integers were drawn from [0, 100) whatever the table, so a BERT-like model
    (a 2-row token-type table, a 30-word vocabulary) could only be validated with --data."""
    from onnxpress.runtime.validate import gather_index_bounds

    words = rng.standard_normal((30, 8)).astype(np.float32)
    types = rng.standard_normal((2, 8)).astype(np.float32)
    model = save(tmp_path, "bert.onnx",
                 "g (int64[batch, seq] input_ids, int32[batch, seq] token_type_ids, int64[batch, seq] attention_mask)"
                 " => (float[batch, seq, 8] emb) { ids3 = Unsqueeze(input_ids, axes) w = Gather(words, ids3) "
                 "w2 = Squeeze(w, axes) tt = Cast<to = 7>(token_type_ids) t = Gather(types, tt) s = Add(w2, t) "
                 "m = Cast<to = 1>(attention_mask) m3 = Unsqueeze(m, axes2) emb = Mul(s, m3) }",
                 words=words, types=types, axes=np.array([2], np.int64), axes2=np.array([-1], np.int64))
    assert gather_index_bounds(model) == {"input_ids": 30, "token_type_ids": 2}
    report = validate(model, model, dims={"seq": 7}, samples=64, measure_speed=False)
    assert report.passed and report.outputs["emb"].max_abs_error == 0.0
    feeds = random_inputs(
        [InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
         InputSpec("token_type_ids", np.dtype(np.int32), ("batch", "seq"))],
        4000, {"seq": 3}, seed=1, bounds={"input_ids": 30, "token_type_ids": 2})
    assert feeds["input_ids"].max() == 29 and feeds["token_type_ids"].max() == 1
    ids = {"input_ids": rng.integers(0, 30, (8, 5)), "token_type_ids": np.zeros((8, 5), np.int32),
           "attention_mask": np.ones((8, 5), np.int64)}
    with_data = validate(model, model, data=ids, dims={"seq": 7}, measure_speed=False)
    assert any("--dim seq=7 is ignored" in w for w in with_data.warnings)


def test_non_tensor_outputs_and_models_without_inputs_are_input_errors(tmp_path: Path) -> None:
    """Was: a sequence output raised AttributeError ('list' has no 'size'); a model without
    inputs failed with '<random>: holds no arrays'."""
    seq = save(tmp_path, "seq.onnx", "g (float[N, 4] x) => (seq(float) s) { s = SequenceConstruct(x, x) }")
    with pytest.raises(InputError, match="output 's' is a list, not a tensor"):
        validate(seq, seq, data={"x": np.ones((4, 4), np.float32)}, measure_speed=False)
    const = save(tmp_path, "const.onnx", "g () => (float[3] y) { y = Constant<value = float[3] {1, 2, 3}>() }")
    with pytest.raises(InputError, match="the model has no inputs"):
        validate(const, const, measure_speed=False)


def test_localize_a_fixed_batch_model_on_fewer_rows_than_its_batch(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: only full batches were localized, so 3 rows for a batch of 4 gave 'localization needs
    at least one input batch' (exit 2) after the whole comparison had run."""
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    text = "g (float[4, 8] x) => (float[4, 4] logits) { h = MatMul(x, w1)  logits = MatMul(h, w2) }"
    ref = save(tmp_path, "ref.onnx", text, w1=w1, w2=w2)
    cand = save(tmp_path, "cand.onnx", text, w1=w1, w2=(w2 * 1.1).astype(np.float32))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    report = validate(ref, cand, data={"x": x}, localize=True, measure_speed=False)
    assert report.samples == 3 and report.localization[0].output == "logits"
    assert report.localization[0].added_error == pytest.approx(0.01, rel=1e-3)  # (1.1 - 1)^2 of the signal power
    # a candidate fixed at another batch size cannot be localized against it: said, and the verdict kept
    eight = save(tmp_path, "eight.onnx", text.replace("[4, ", "[8, "), w1=w1, w2=w2)
    report = validate(ref, eight, data={"x": x}, localize=True, measure_speed=False)
    assert report.passed and report.localization == []
    assert any("no localization" in w and "same batch" in w for w in report.warnings)


def test_localize_without_shared_values_keeps_the_comparison(tmp_path: Path, rng: np.random.Generator,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a candidate that renamed every intermediate (integer outputs only) made --localize
    exit 2 and lose the end-to-end verdict it had already measured."""
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    text = ("g (float[N, 8] x) => (int64[N] pred) {{ {0} = MatMul(x, w1)  {1} = MatMul({0}, w2)  "
            "pred = ArgMax<axis=1, keepdims=0>({1}) }}")
    ref = save(tmp_path, "ref.onnx", text.format("h", "l"), w1=w1, w2=w2)
    cand = save(tmp_path, "cand.onnx", text.format("other_h", "other_l"), w1=w1, w2=w2)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    report = validate(ref, cand, data={"x": x}, localize=True, measure_speed=False)
    assert report.passed and report.localization == []
    assert any("no localization" in w and "share no intermediate value" in w for w in report.warnings)
    status, out, err = cli(capsys, ref, cand, "--data", _npz(tmp_path, x=x), "--localize", "--html", tmp_path / "r.html")
    assert status == 0 and "share no intermediate value" in out and not err
    parser = _Html()
    parser.feed(render_html(report))
    assert "svg" in parser.tags


def test_dimensions_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: --dim seq=0 was taken (the message says 'a positive integer') and validated empty rows."""
    model = save(tmp_path, "m.onnx", "g (float[batch, seq] x) => (float[batch, seq] y) { y = Relu(x) }")
    with pytest.raises(InputError, match="positive integer"):
        parse_dims(["seq=0"])
    assert parse_dims(["seq=3"]) == {"seq": 3}
    spec = InputSpec("x", np.dtype(np.float32), ("batch", "seq"))
    with pytest.raises(InputError, match="seq=0: a dimension needs a size of at least 1"):
        random_inputs([spec], 4, {"seq": 0})
    status, _, err = cli(capsys, model, model, "--dim", "seq=0")
    assert status == 2 and "--dim seq=0" in err


def test_data_errors_name_the_model_they_are_about(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: a candidate with another input name failed with '<random>: the model needs input ...',
    not saying which of the two models."""
    w = rng.standard_normal((8, 4)).astype(np.float32)
    ref = save(tmp_path, "ref.onnx", "g (float[N, 8] x) => (float[N, 4] y) { y = MatMul(x, w) }", w=w)
    cand = save(tmp_path, "cand.onnx", "g (float[N, 8] inp) => (float[N, 4] y) { y = MatMul(inp, w) }", w=w)
    with pytest.raises(InputError, match=r"^candidate .*cand.onnx: <random>: the model needs input 'inp'"):
        validate(ref, cand, measure_speed=False)
    report = validate(ref, cand, data={"x": np.ones((2, 8), np.float32), "inp": np.ones((2, 8), np.float32)},
                      measure_speed=False, tolerances=Tolerances(max_abs_error=0.0))
    assert report.passed


def test_report_paths_and_tolerances_are_checked_before_the_models_run(
        tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: --report in a missing folder, or --html naming a folder, raised FileNotFoundError /
    IsADirectoryError (tracebacks) after the whole comparison; --min-cosine nan failed every
    check; --min-speedup with --no-speed failed the verdict on a speed never measured."""
    w = rng.standard_normal((8, 4)).astype(np.float32)
    model = save(tmp_path, "m.onnx", "g (float[N, 8] x) => (float[N, 4] y) { y = MatMul(x, w) }", w=w)
    data = _npz(tmp_path, x=rng.standard_normal((10, 8)).astype(np.float32))
    status, out, err = cli(capsys, model, model, "--data", data, "--report", tmp_path / "missing" / "r.json")
    assert status == 2 and "--report" in err and "does not exist" in err and not out
    status, out, err = cli(capsys, model, model, "--data", data, "--html", tmp_path)
    assert status == 2 and "--html" in err and "is a folder" in err and not out
    with pytest.raises(SystemExit):
        cli(capsys, model, model, "--data", data, "--min-cosine", "nan")
    assert "expected a number or 'none'" in capsys.readouterr().err
    with pytest.raises(InputError, match="tolerance min_cosine"):
        Tolerances(min_cosine=float("nan"))
    status, _, err = cli(capsys, model, model, "--data", data, "--min-speedup", "0.5")
    assert status == 2 and "not timed" in err and "--min-speedup none" in err
    assert cli(capsys, model, model, "--data", data, "--min-speedup", "none")[0] == 0


def test_localize_counts_the_values_a_branch_reads_as_inputs_of_the_if(tmp_path: Path,
                                                                         rng: np.random.Generator) -> None:
    """Was: an If whose branches read the noisy ``h`` from the graph around them showed an input
    SQNR of 200 dB (only its exact condition counted), as if the error started at the If."""
    text = ("g (float[N, 8] x, bool c) => (float[N, 4] y) { h = MatMul(x, w1)  y = If(c) <"
            "then_branch = t () => (float[N, 4] a) { a = MatMul(h, w2) }, "
            "else_branch = e () => (float[N, 4] b) { b2 = MatMul(h, w2)  b = Neg(b2) }> }")
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    ref = save(tmp_path, "ref.onnx", text, w1=w1, w2=w2)
    cand = save(tmp_path, "cand.onnx", text, w1=(w1 * 1.05).astype(np.float32), w2=w2)
    table = localize(ref, cand, [{"x": rng.standard_normal((8, 8)).astype(np.float32), "c": np.array(True)}])
    rows = {e.op_type: e for e in table}
    assert rows["MatMul"].node_sqnr_db == pytest.approx(-20 * np.log10(0.05), abs=0.01)  # 26.02 dB
    assert rows["If"].sqnr_in_db == pytest.approx(rows["MatMul"].sqnr_out_db)  # the captured h, not 200 dB
    assert rows["If"].node_sqnr_db == 200.0 and rows["If"].added_error == 0.0  # the If adds nothing itself


def test_integer_outputs_are_compared_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: int64 outputs were compared in float32, so ids above 2**24 that differ by one
    (16777217 against 16777216) showed no error at all."""
    ids = rng.integers(1 << 25, 1 << 26, (20, 3))
    ref = save(tmp_path, "ref.onnx", "g (int64[N, 3] x) => (int64[N, 3] y) { y = Identity(x) }")
    cand = save(tmp_path, "cand.onnx", "g (int64[N, 3] x) => (int64[N, 3] y) { y = Add(x, one) }",
                one=np.array(1, np.int64))
    report = validate(ref, cand, data={"x": ids}, measure_speed=False, tolerances=Tolerances(max_abs_error=0.5))
    assert report.outputs["y"].max_abs_error == 1.0 and report.outputs["y"].mean_abs_error == 1.0
    assert not report.passed
    # integer outputs (an arg-max head's class ids, a mask): agreement is the share of equal values
    same = validate(ref, ref, data={"x": ids}, measure_speed=False, tolerances=Tolerances(min_equal_values=99))
    assert same.passed and same.outputs["y"].top1_agreement == 100.0
    half = save(tmp_path, "half.onnx", "g (int64[N, 3] x) => (int64[N, 3] y) { y = Mul(x, m) }",
                m=np.array([1, 1, 2], np.int64))
    off = validate(ref, half, data={"x": ids}, measure_speed=False, tolerances=Tolerances(min_equal_values=99))
    assert off.outputs["y"].top1_agreement == pytest.approx(100 * 2 / 3) and not off.passed
    # a top-1 check that no output can take is said, not dropped in silence; integer outputs do not take it
    flt = save(tmp_path, "f.onnx", "g (float[N] x) => (float[N] y) { y = Identity(x) }")
    for model, data in ((flt, {"x": rng.standard_normal(20).astype(np.float32)}), (half, {"x": ids})):
        quiet = validate(model, model, data=data, measure_speed=False, tolerances=Tolerances(min_top1_agreement=99))
        assert quiet.passed and any("top-1 agreement check is not applied" in w for w in quiet.warnings)
        assert not any("top-1" in c.name for c in quiet.checks)


def test_class_ids_are_judged_by_equal_values_not_cosine(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: the default verdict took the cosine of an arg-max head's class ids, which stays near 1
    however many ids change (0.994 with 2 % of ten classes changed), so such a model passed."""
    text = "g (float[N, 10] x, int64[N] flip) => (int64[N] ids, float[N, 10] p) {{ {} p = Identity(x) }}"
    ref = save(tmp_path, "ref.onnx", text.format("ids = ArgMax<axis = 1, keepdims = 0>(x)"))
    # the candidate's class id is off by one where `flip` is 1
    cand = save(tmp_path, "cand.onnx", text.format(
        "a = ArgMax<axis = 1, keepdims = 0>(x)  s = Add(a, flip)  ids = Mod(s, ten)"), ten=np.array(10, np.int64))
    x = rng.standard_normal((1000, 10)).astype(np.float32)
    flip = np.zeros(1000, np.int64)
    flip[rng.choice(1000, 20, replace=False)] = 1  # 2 % of the ids differ
    report = validate(ref, cand, data={"x": x, "flip": flip}, measure_speed=False)
    ids = report.outputs["ids"]
    assert ids.exact_values and ids.top1_agreement == pytest.approx(98.0)
    assert ids.mean_cosine > 0.99  # what the old verdict judged by, and passed
    names = {c.name: c for c in report.checks}
    assert "ids: mean cosine >=" not in names and "p: mean cosine >=" in names
    assert not names["ids: equal values % >="].passed and not report.passed
    loose = validate(ref, cand, data={"x": x, "flip": flip}, measure_speed=False,
                     tolerances=Tolerances(min_equal_values=97.5))
    assert loose.passed


def test_localize_takes_equal_infinities_as_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: a Log of zero (-inf in both models) gave -inf - -inf = NaN, an infinite noise, so a
    bit-exact Log ranked first at -200 dB; and one -inf in the signal hid every error beside it."""
    text = "g (float[N, 4] x) => (float[N, 4] y) {{ r = Relu(x)  s = Mul(r, k)  l = Log(s)  y = {} }}"
    ref = save(tmp_path, "ref.onnx", text.format("Mul(l, w)"), k=np.array(1.0, np.float32),
               w=np.array(2.0, np.float32))
    cand = save(tmp_path, "cand.onnx", text.format("Mul(l, w)"), k=np.array(1.0, np.float32),
                w=np.array(2.2, np.float32))
    x = rng.standard_normal((40, 4)).astype(np.float32)
    rows = {e.output: e for e in localize(ref, cand, [{"x": x}])}
    assert rows["l"].node_sqnr_db == 200.0 and rows["l"].added_error == 0.0 and rows["l"].rel_l2_error == 0.0
    assert rows["s"].node_sqnr_db == 200.0
    # the Mul by 2.2 instead of 2 adds (0.2 / 2)^2 = 1 % of the (finite) signal power
    assert rows["y"].added_error == pytest.approx(0.01, rel=1e-3)
    assert rows["y"].rel_l2_error == pytest.approx(0.1, rel=1e-3)


def test_samples_where_only_one_side_is_zero_take_the_whole_outputs_cosine(tmp_path: Path,
                                                                           rng: np.random.Generator) -> None:
    """Was: a Relu head whose reference rows are often all zero got cosine 0 on each of them
    against a candidate off by 1e-6, so a model with a relative L2 error of 1e-6 failed."""
    w = rng.standard_normal((8, 4)).astype(np.float32)
    text = "g (float[N, 8] x) => (float[N, 4] y) { m = MatMul(x, w)  a = Add(m, b)  r = Relu(a)  y = Add(r, e) }"
    bias = np.full(4, -2.0, np.float32)
    ref = save(tmp_path, "ref.onnx", text, w=w, b=bias, e=np.array(0.0, np.float32))
    x = rng.standard_normal((200, 8)).astype(np.float32)
    r = outputs(ref, {"x": x})[0].astype(np.float64)
    zero_rows = int((np.abs(r).sum(1) == 0).sum())
    assert zero_rows > 20
    for offset, verdict in ((1e-6, True), (0.5, False)):
        cand = save(tmp_path, "cand.onnx", text, w=w, b=bias, e=np.array(offset, np.float32))
        c = outputs(cand, {"x": x})[0].astype(np.float64)
        report = validate(ref, cand, data={"x": x}, measure_speed=False)
        overall = (r * c).sum() / np.sqrt((r * r).sum() * (c * c).sum())
        live = np.abs(r).sum(1) > 0
        per_row = (r[live] * c[live]).sum(1) / np.sqrt((r[live] ** 2).sum(1) * (c[live] ** 2).sum(1))
        expected = (per_row.sum() + zero_rows * overall) / len(r)
        assert report.outputs["y"].mean_cosine == pytest.approx(expected, rel=1e-6)
        assert report.outputs["y"].min_cosine == pytest.approx(min(per_row.min(), overall), rel=1e-6)
        assert report.passed is verdict
    # a reference that is all zero against a candidate that is not has no direction in common:
    # 0 for every row but those where both are zero (1)
    zero = save(tmp_path, "zero.onnx", text, w=w * 0, b=bias * 0, e=np.array(0.0, np.float32))
    report = validate(zero, ref, data={"x": x}, measure_speed=False)
    assert report.outputs["y"].mean_cosine == pytest.approx(zero_rows / len(r)) and not report.passed
