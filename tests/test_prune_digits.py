"""The pruning targets on the bundled digits CNN, post-training: checked in CI, not only in the benchmark."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_ort
from onnxpress.models.digits import digits_cnn_path, load_digits_calib, load_digits_test
from onnxpress.passes.registry import get_pass

from onnxpress.model_io import load_model


def _accuracy(model: ir.Model) -> float:
    images, labels = load_digits_test()
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    (logits,) = run_ort(proto, {"image": images})
    return 100.0 * float(np.mean(logits.argmax(axis=1) == labels))


@pytest.fixture(scope="module")
def calibration() -> list[dict[str, np.ndarray]]:
    images = load_digits_calib()
    return [{"image": images[i : i + 64]} for i in range(0, len(images), 64)]


def test_eighty_percent_sparsity_within_one_point(calibration):
    reference = _accuracy(load_model(digits_cnn_path()))
    model = load_model(digits_cnn_path())
    pass_cls = get_pass("prune-magnitude")
    instance = pass_cls(
        pass_cls.Config(sparsity=0.8, scope="global", min_elements=0, bias_correction=True), calibration=calibration
    )
    instance(model)
    assert instance.details["sparsity_all_weights"] == pytest.approx(0.8, abs=1e-4)
    assert reference - _accuracy(model) <= 1.0


def test_thirty_percent_of_conv_channels_within_one_point(calibration):
    reference = _accuracy(load_model(digits_cnn_path()))
    model = load_model(digits_cnn_path())
    pass_cls = get_pass("prune-channels")
    config = pass_cls.Config(ratio=0.3, ops=("Conv",), round_to=16, criterion="activation", compensation="weights")
    instance = pass_cls(config, calibration=calibration)
    instance(model)
    groups = instance.details["groups"]
    removed = sum(g["channels_before"] - g["channels_after"] for g in groups.values())
    assert removed / 48 >= 0.3
    assert instance.details["macs_after"] < 0.6 * instance.details["macs_before"]
    assert reference - _accuracy(model) <= 1.0
