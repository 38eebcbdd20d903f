"""Calibration data (onnxpress.calibration) and the compress CLI's --data / --auto-exclude."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_ort
from quant_models import embed_mlp, mlp, rel_error, to_ir

from onnxpress.calibration import CalibrationData, check_batch, checked_batches
from onnxpress.cli import main
from onnxpress.errors import InputError


def test_batches_stream_in_order_and_repeat(tmp_path, rng):
    x = rng.standard_normal((10, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = CalibrationData(tmp_path / "calib.npz", to_ir(mlp(rng)), batch_size=4)
    assert len(data) == 3
    for _ in range(2):  # iterable more than once: static calibration may read it twice
        batches = list(data)
        assert [len(b["x"]) for b in batches] == [4, 4, 2]
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


def test_narrower_ints_are_widened_to_the_models_dtype(tmp_path, rng):
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, 100, size=(6, 5)).astype(np.int32))
    data = CalibrationData(tmp_path / "ids.npz", to_ir(embed_mlp(rng)), batch_size=4)
    assert all(b["ids"].dtype == np.int64 for b in data)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((4, 64), np.float32)}, "needs input 'x'"),
        ({"x": np.zeros((4, 32), np.float32)}, "'x' has size 32 on axis 1, but the model expects"),
        ({"x": np.zeros((4, 64), np.float64)}, "'x' is float64, but the model expects float32"),
        ({"x": np.zeros((4, 8, 64), np.float32)}, "rank 3 with the sample axis"),
    ],
)
def test_data_that_does_not_fit_is_a_clear_error(tmp_path, rng, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message):
        CalibrationData(tmp_path / "bad.npz", to_ir(mlp(rng)))
    with pytest.raises(InputError, match=message):
        check_batch(to_ir(mlp(rng)), arrays)


def test_missing_or_empty_data(tmp_path, rng):
    with pytest.raises(InputError, match="no such data file"):
        CalibrationData(tmp_path / "none.npz", to_ir(mlp(rng)))
    with pytest.raises(InputError, match="no batch"):
        list(checked_batches(to_ir(mlp(rng)), []))


@pytest.fixture
def files(tmp_path, rng):
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(rng), model)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 64)).astype(np.float32))
    return model, tmp_path / "calib.npz"


@pytest.mark.parametrize("preset", ["int8", "int4", "fp16"])
def test_compress_presets_with_data(files, tmp_path, rng, preset, capsys):
    model, calib = files
    out = tmp_path / f"{preset}.onnx"
    assert main(["compress", str(model), "-o", str(out), "--preset", preset, "--data", str(calib), "--no-progress"]) == 0
    x = rng.standard_normal((5, 64)).astype(np.float32)
    (ref,), (got,) = run_ort(onnx.load(model), {"x": x}), run_ort(onnx.load(out), {"x": x})
    assert rel_error(ref, got) < {"int8": 0.03, "int4": 0.2, "fp16": 0.01}[preset]
    assert out.stat().st_size < model.stat().st_size


def test_compress_auto_exclude_needs_data(files, tmp_path, capsys):
    model, _ = files
    code = main(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--preset", "int8", "--auto-exclude", "--no-progress"])
    assert code == 2  # refused before any work, as a recipe error
    assert "needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_compress_rejects_data_that_does_not_fit(files, tmp_path, capsys):
    model, _ = files
    np.savez(tmp_path / "bad.npz", image=np.zeros((4, 1, 8, 8), np.float32))
    code = main(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--preset", "int8",
                 "--data", str(tmp_path / "bad.npz"), "--no-progress"])
    assert code == 2
    assert "needs input 'x'" in capsys.readouterr().err


def test_recipe_names_its_calibration_file(files, tmp_path, capsys):
    model, calib = files
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - pass: quantize-int8-static\ncalibration: calib.npz\n")
    out = tmp_path / "static.onnx"
    assert main(["compress", str(model), "-o", str(out), "--recipe", str(recipe), "--no-progress"]) == 0
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
