"""validate(), localize(), the HTML report and ``onnxpress validate``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

from conftest import run_ort
from onnxpress.cli import main
from onnxpress.errors import InputError
from onnxpress.runtime import Tolerances, localize, validate
from onnxpress.runtime.localize import load_value_map
from onnxpress.runtime.metrics import HISTOGRAM_EDGES, histogram_bins
from onnxpress.runtime.validate import artifact_bytes

# Four MatMul layers, each followed by an activation; the second MatMul is where the error is planted.
MLP = """
<ir_version: 8, opset_import: ["" : 18]>
mlp (float[N, 16] x) => (float[N, 5] logits, float[N, 16] features)
{
    h1 = MatMul (x, w1)
    a1 = Relu (h1)
    h2 = MatMul (a1, w2)
    a2 = Tanh (h2)
    h3 = MatMul (a2, w3)
    features = Relu (h3)
    logits = MatMul (features, w4)
}
"""
NODE_NAMES = {"h1": "mm1", "a1": "relu1", "h2": "mm2", "a2": "tanh2", "h3": "mm3", "features": "relu3",
              "logits": "mm4"}
SHAPES = {"w1": (16, 32), "w2": (32, 32), "w3": (32, 16), "w4": (16, 5)}


def mlp(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(MLP)
    for node in proto.graph.node:
        node.name = NODE_NAMES[node.output[0]]
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return proto


def random_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in SHAPES.items()}


def noisy(weights: dict[str, np.ndarray], rng: np.random.Generator, scale: float, planted: str | None = None,
          planted_scale: float = 0.0) -> dict[str, np.ndarray]:
    """Weights with relative noise everywhere (like quantization) and much more on one of them."""
    out = {}
    for name, w in weights.items():
        s = planted_scale if name == planted else scale
        out[name] = (w + rng.standard_normal(w.shape).astype(np.float32) * np.abs(w).mean() * s).astype(np.float32)
    return out


@pytest.fixture
def pair(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, dict[str, np.ndarray]]:
    weights = random_weights(rng)
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(mlp(weights), ref)
    onnx.save(mlp(noisy(weights, rng, 0.01)), cand)
    return ref, cand, weights


def test_metrics_match_numpy(pair: tuple[Path, Path, dict], tmp_path: Path, rng: np.random.Generator) -> None:
    ref, cand, _ = pair
    x = rng.standard_normal((150, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    report = validate(ref, cand, data=tmp_path / "data.npz", batch_size=32, measure_speed=False)
    r = run_ort(onnx.load(ref), {"x": x})
    c = run_ort(onnx.load(cand), {"x": x})
    for name, a, b in (("logits", r[0], c[0]), ("features", r[1], c[1])):
        m = report.outputs[name]
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        np.testing.assert_allclose(m.max_abs_error, np.abs(a64 - b64).max(), rtol=1e-6)
        np.testing.assert_allclose(m.mean_abs_error, np.abs(a64 - b64).mean(), rtol=1e-6)  # differences are taken in float32
        np.testing.assert_allclose(m.rel_l2_error, np.linalg.norm(a64 - b64) / np.linalg.norm(a64), rtol=1e-6)  # differences are taken in float32
        cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
        cos = np.where(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1) > 0, cos, 1.0)
        np.testing.assert_allclose(m.mean_cosine, cos.mean(), rtol=1e-6)  # differences are taken in float32
        np.testing.assert_allclose(m.min_cosine, cos.min(), rtol=1e-6)  # differences are taken in float32
        edges = HISTOGRAM_EDGES.astype(np.float32)
        bins = np.minimum(np.searchsorted(edges, np.abs(a - b).reshape(-1), side="left"), len(edges) - 1)
        np.testing.assert_array_equal(m.histogram, np.bincount(bins, minlength=len(edges)))
    assert report.outputs["logits"].top1_agreement == pytest.approx(100 * np.mean(r[0].argmax(1) == c[0].argmax(1)))
    assert report.outputs["features"].top1_agreement is None  # features, not class scores
    assert report.samples == 150 and report.data.endswith("data.npz")
    assert report.reference.size_bytes == ref.stat().st_size
    # small batches: several phases, each run by both models at once while the last one is scored
    seen: list[tuple[int, int]] = []
    phased = validate(ref, cand, data=tmp_path / "data.npz", batch_size=8, measure_speed=False,
                      progress=lambda done, total: seen.append((done, total)))
    assert [d for d, _ in seen] == [64, 128, 150] and {t for _, t in seen} == {150}
    for name, m in phased.outputs.items():
        assert m.max_abs_error == report.outputs[name].max_abs_error
        assert (m.histogram == report.outputs[name].histogram).all()
        assert m.min_cosine == pytest.approx(report.outputs[name].min_cosine, rel=1e-12)


def test_accuracy_from_labels_and_failing_verdict(pair: tuple[Path, Path, dict], tmp_path: Path,
                                                    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _, weights = pair
    bad = tmp_path / "bad.onnx"
    onnx.save(mlp(noisy(weights, rng, 0.0, planted="w4", planted_scale=3.0)), bad)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    labels = run_ort(onnx.load(ref), {"x": x})[0].argmax(1)
    labels[:40] = (labels[:40] + 1) % 5  # the reference gets 80 % right
    np.save(tmp_path / "labels.npy", labels)
    np.savez(tmp_path / "data.npz", x=x)
    bad_pred = run_ort(onnx.load(bad), {"x": x})[0].argmax(1)
    report = validate(ref, bad, data=tmp_path / "data.npz", labels=tmp_path / "labels.npy", batch_size=64,
                      measure_speed=False, tolerances=Tolerances(min_cosine=None, max_accuracy_drop=0.5))
    assert report.reference.accuracy == pytest.approx(80.0)
    assert report.candidate.accuracy == pytest.approx(100 * np.mean(bad_pred == labels))
    assert report.accuracy_drop > 0.5 and not report.passed
    # metrics folded in many small chunks agree with one big update
    monkeypatch.setattr(sys.modules["onnxpress.runtime.validate"], "METRIC_CHUNK_ELEMENTS", 100)
    chunked = validate(ref, bad, data=tmp_path / "data.npz", labels=tmp_path / "labels.npy", batch_size=16,
                       measure_speed=False, tolerances=Tolerances(min_cosine=None, max_accuracy_drop=0.5))
    assert chunked.candidate.accuracy == report.candidate.accuracy
    assert chunked.outputs["logits"].max_abs_error == report.outputs["logits"].max_abs_error
    assert chunked.outputs["logits"].min_cosine == pytest.approx(report.outputs["logits"].min_cosine, rel=1e-12)
    assert (chunked.outputs["features"].histogram == report.outputs["features"].histogram).all()
    assert [c.name for c in report.checks if not c.passed] == ["accuracy drop (points) <="]
    # the same through the CLI: exit status 4, and the JSON report says why
    status = main(["validate", str(ref), str(bad), "--data", str(tmp_path / "data.npz"), "--labels",
                   str(tmp_path / "labels.npy"), "--max-accuracy-drop", "0.5", "--min-cosine", "none",
                   "--no-speed", "--no-progress", "--report", str(tmp_path / "r.json")])
    assert status == 4
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verdict"] == "fail" and data["accuracy"]["reference"] == pytest.approx(80.0)
    with pytest.raises(InputError, match="150 labels for 200 samples"):
        validate(ref, bad, data=tmp_path / "data.npz", labels=labels[:150], measure_speed=False)


def test_random_inputs_warn_and_need_dims(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[batch, seq] x, int64[batch, seq] mask) => (float[batch, seq] y)
    { m = Cast<to = 1>(mask)
      y = Mul(x, m) }
    """)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    with pytest.raises(InputError, match=r"dimension 'seq' has no size.*--dim seq=VALUE"):
        validate(path, path, measure_speed=False)
    with pytest.raises(InputError, match="no dimension of that name .*batch, seq"):
        validate(path, path, dims={"sequence": 7}, measure_speed=False)
    report = validate(path, path, dims={"seq": 7}, samples=20, batch_size=8)
    assert report.passed and report.samples == 20
    assert any("random inputs are a weak signal" in w for w in report.warnings)
    assert report.outputs["y"].max_abs_error == 0.0
    assert report.speedup is not None and report.reference.samples_per_second > 0
    assert main(["validate", str(path), str(path), "--dim", "seq=5", "--samples", "10", "--no-progress",
                 "--no-speed"]) == 0


def test_localize_ranks_the_planted_node_first(pair: tuple[Path, Path, dict], tmp_path: Path,
                                                rng: np.random.Generator) -> None:
    ref, _, weights = pair
    bad = tmp_path / "planted.onnx"
    onnx.save(mlp(noisy(weights, rng, 0.002, planted="w2", planted_scale=0.3)), bad)
    batches = [{"x": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(3)]
    table = localize(ref, bad, batches)
    assert table[0].node == "mm2" and table[0].op_type == "MatMul" and table[0].output == "h2"
    assert table[0].added_error > 10 * table[1].added_error
    assert table[0].node_sqnr_db < table[1].node_sqnr_db - 10
    assert {e.node for e in table} == {"mm1", "relu1", "mm2", "tanh2", "mm3", "relu3", "mm4"}
    assert len(localize(ref, bad, batches, top=3)) == 3


def test_localize_maps_renamed_values_and_refuses_unrelated_graphs(pair: tuple[Path, Path, dict], tmp_path: Path,
                                                                    rng: np.random.Generator) -> None:
    ref, _, weights = pair
    proto = mlp(noisy(weights, rng, 0.0, planted="w3", planted_scale=0.5))
    renames = {"h3": "renamed_h3", "h2": "renamed_h2"}
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    cand = tmp_path / "renamed.onnx"
    onnx.save(proto, cand)
    batches = [{"x": rng.standard_normal((16, 16)).astype(np.float32)}]
    table = localize(ref, cand, batches, value_map=renames)
    assert table[0].node == "mm3" and table[0].output == "h3"
    # the same map read from a compress report whose steps recorded the renames
    report = {"steps": [{"details": {"renamed": {"h3": "tmp_h3"}}},
                        {"details": {"renamed": {"tmp_h3": "renamed_h3", "h2": "renamed_h2"}}}]}
    (tmp_path / "compress.json").write_text(json.dumps(report))
    assert load_value_map(tmp_path / "compress.json") == renames
    other = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 16] x) => (float[N, 16] q) { q = Neg(x) }
    """)
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(InputError, match="share no intermediate value"):
        localize(ref, tmp_path / "other.onnx", batches)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.external: list[str] = []
        self.rects = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        if tag == "rect":
            self.rects += 1
        for key in ("src", "href"):
            if attributes.get(key):
                self.external.append(attributes[key])


def test_html_report_is_self_contained(pair: tuple[Path, Path, dict], tmp_path: Path, rng: np.random.Generator) -> None:
    ref, cand, _ = pair
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    assert main(["validate", str(ref), str(cand), "--data", str(tmp_path / "data.npz"), "--localize",
                 "--html", str(tmp_path / "r.html"), "--report", str(tmp_path / "r.json"),
                 "--no-progress"]) in (0, 4)
    text = (tmp_path / "r.html").read_text()
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert parser.tags[0] == "html" and not parser.external
    assert {"checks", "outputs", "models", "localization"} <= parser.ids
    assert parser.tags.count("svg") == 4  # two histograms, size bars, throughput bars
    assert parser.rects >= 6
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["localization"]) == 7
    assert all(row["node"] in text for row in report["localization"])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              (tmp_path / "r.html").as_uri()], capture_output=True, text=True, timeout=60)
        assert dom.returncode == 0 and "localization" in dom.stdout


def test_recipe_tolerances(pair: tuple[Path, Path, dict], tmp_path: Path, rng: np.random.Generator) -> None:
    ref, cand, _ = pair
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((40, 16)).astype(np.float32))
    (tmp_path / "strict.yaml").write_text("steps: [prune-dead]\nvalidate:\n  max_abs_error: 0.0\n")
    args = ["validate", str(ref), str(cand), "--data", str(tmp_path / "data.npz"), "--no-speed", "--no-progress"]
    assert main([*args, "--recipe", str(tmp_path / "strict.yaml")]) == 4
    assert main([*args, "--recipe", str(tmp_path / "strict.yaml"), "--max-abs-error", "1e3"]) == 0
    (tmp_path / "typo.yaml").write_text("steps: [prune-dead]\nvalidate:\n  min_cosin: 0.9\n")
    assert main([*args, "--recipe", str(tmp_path / "typo.yaml")]) == 2


def test_localize_follows_onnxruntime_qdq_names(pair: tuple[Path, Path, dict], tmp_path: Path,
                                                rng: np.random.Generator) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    ref, _, _ = pair
    calib = [{"x": rng.standard_normal((16, 16)).astype(np.float32)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    qdq = tmp_path / "qdq.onnx"
    quantize_static(str(ref), str(qdq), Reader(), quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    table = localize(ref, qdq, calib[:2])
    by_output = {e.output: e for e in table}
    assert {"h2", "logits"} <= set(by_output)
    assert all(e.candidate_op_type == "DequantizeLinear" for e in table)
    assert all(e.node in e.span and 0.0 < e.added_error < 1.0 for e in table)
    # the MatMul followed by Relu may be fused by the quantizer: the row of the Relu covers both
    assert all(set(e.span) <= set(NODE_NAMES.values()) for e in table)


def test_artifact_size_counts_external_data(pair: tuple[Path, Path, dict], tmp_path: Path) -> None:
    ref, _, _ = pair
    proto = onnx.load(ref)
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save(proto, external, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
              size_threshold=0)
    data = external.parent / "model.onnx.data"
    assert data.stat().st_size > 0
    assert artifact_bytes(external) == external.stat().st_size + data.stat().st_size
    report = validate(ref, external, data={"x": np.ones((4, 16), np.float32)}, measure_speed=False)
    assert report.candidate.size_bytes == artifact_bytes(external) and report.outputs["logits"].max_abs_error == 0


def test_float16_candidate_validates_on_float32_data(pair: tuple[Path, Path, dict], tmp_path: Path,
                                                     rng: np.random.Generator) -> None:
    ref, _, weights = pair
    proto = onnx.parser.parse_model(MLP.replace("float[", "float16["))
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array.astype(np.float16), name))
    half = tmp_path / "half.onnx"
    onnx.save(proto, half)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    report = validate(ref, half, data={"x": x}, measure_speed=False, localize=True)
    expected = run_ort(proto, {"x": x.astype(np.float16)})[0].astype(np.float32)
    reference = run_ort(onnx.load(ref), {"x": x})[0]
    assert report.outputs["logits"].max_abs_error == pytest.approx(np.abs(reference - expected).max(), rel=1e-6)
    assert 0.999 < report.outputs["logits"].mean_cosine < 1.0 and report.passed
    assert {e.node for e in report.localization} >= {"mm1", "mm4"}
    with pytest.raises(InputError, match="is float32, but the model expects float16"):
        from onnxpress.runtime import BatchRunner

        np.savez(tmp_path / "x.npz", x=x)
        BatchRunner(half).run(tmp_path / "x.npz", tmp_path / "out")


def test_histogram_bins_follow_the_edges_exactly(rng: np.random.Generator) -> None:
    """Bins come from float bit patterns: check them at, just above and just below every edge."""
    edges = HISTOGRAM_EDGES.astype(np.float32)
    scale = np.float32(10.0) ** rng.uniform(-12, 6, 20_000).astype(np.float32)
    values = np.concatenate([
        np.abs(rng.standard_normal(20_000)).astype(np.float32) * scale,
        edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(0)),
        np.array([0.0, 1e-45, 3e38, np.inf], np.float32),
    ])
    expected = np.minimum(np.searchsorted(edges, values, side="left"), len(edges) - 1)
    np.testing.assert_array_equal(histogram_bins(values), expected)
    np.testing.assert_array_equal(histogram_bins(values.astype(np.float64)), expected)
