"""The bundled digits CNN: it loads, is accurate, survives the lossless preset, and retrains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxpress
from onnxpress.models.digits import (
    digits_calib_path,
    digits_cnn_path,
    digits_test_path,
    load_digits_calib,
    load_digits_test,
)
from onnxpress.sessions import load_session

from conftest import assert_bit_identical, run_ort


def _accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    (logits,) = load_session(model_path).run(["logits"], {"image": images})
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def test_bundled_files_have_the_documented_shapes() -> None:
    images, labels = load_digits_test()
    assert images.dtype == np.float32 and images.ndim == 4 and images.shape[1:] == (1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (images.shape[0],)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(np.unique(labels)) == set(range(10))
    calib = load_digits_calib()
    assert calib.dtype == np.float32 and calib.shape == (256, 1, 8, 8)
    for path in (digits_cnn_path(), digits_test_path(), digits_calib_path()):
        assert path.is_file() and path.stat().st_size < 1_000_000


def test_bundled_model_loads_and_has_the_documented_interface() -> None:
    model = onnxpress.load_model(digits_cnn_path())
    assert [v.name for v in model.graph.inputs] == ["image"]
    assert [v.name for v in model.graph.outputs] == ["logits"]
    image = model.graph.inputs[0]
    assert image.dtype == ir.DataType.FLOAT
    assert isinstance(image.shape[0], ir.SymbolicDim) and list(image.shape[1:]) == [1, 8, 8]
    assert list(model.graph.outputs[0].shape)[1:] == [10]
    ops = [node.op_type for node in model.graph]
    assert ops.count("Conv") >= 2 and ops.count("Gemm") >= 1
    assert model.opset_imports[""] == 18


def test_bundled_model_is_accurate_on_the_held_out_split() -> None:
    images, labels = load_digits_test()
    assert _accuracy(digits_cnn_path(), images, labels) >= 0.95


def test_bundled_model_runs_any_batch_size(rng: np.random.Generator) -> None:
    session = load_session(digits_cnn_path())
    for batch in (1, int(rng.integers(2, 40))):
        (logits,) = session.run(None, {"image": rng.random((batch, 1, 8, 8), dtype=np.float32)})
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()


def test_lossless_preset_keeps_outputs_bit_identical(rng: np.random.Generator) -> None:
    images, _ = load_digits_test()
    noise = rng.random((7, 1, 8, 8), dtype=np.float32)
    original = onnxpress.load_model(digits_cnn_path())
    expected = run_ort(original, {"image": images}) + run_ort(original, {"image": noise})
    model = onnxpress.load_model(digits_cnn_path())
    onnxpress.Pipeline.from_recipe(onnxpress.load_preset("lossless")).run(model)
    onnx.checker.check_model(ir.to_proto(model))
    actual = run_ort(model, {"image": images}) + run_ort(model, {"image": noise})
    assert_bit_identical(expected, actual)


@pytest.mark.slow
def test_training_script_reproduces_the_bundled_accuracy(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "onnxpress.models.train_digits_cnn", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "digits_test.npz") as data:
        images, labels = data["image"], data["label"]
    bundled_images, bundled_labels = load_digits_test()
    np.testing.assert_array_equal(labels, bundled_labels)
    np.testing.assert_array_equal(images, bundled_images)
    retrained = _accuracy(tmp_path / "digits_cnn.onnx", images, labels)
    bundled = _accuracy(digits_cnn_path(), images, labels)
    assert retrained >= 0.95
    assert abs(retrained - bundled) <= 0.01
    assert f"test accuracy: {retrained:.4f}" in result.stdout
