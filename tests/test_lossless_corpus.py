"""The lossless preset on every model onnx ships for its backend tests.

These are models nobody wrote for onnxpress: CNNs (AlexNet, Inception, ResNet-50, SqueezeNet,
VGG-19 and others, with light weights), PyTorch-exported layers and operators at old opsets and
IR versions, sequence ops. Each must come out loadable, bit-identical in onnxruntime on the
backend test's own inputs (random ones where none ship), and unchanged by a second run.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxpress.model_io import load_model, save_model
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import load_preset

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODELS = sorted(glob.glob(str(DATA / "light" / "*.onnx")) + glob.glob(str(DATA / "*" / "*" / "model.onnx")))


def _feeds(path: Path, session: ort.InferenceSession, rng: np.random.Generator) -> dict[str, np.ndarray]:
    inputs = session.get_inputs()
    shipped = sorted(path.parent.glob("test_data_set_0/input_*.pb"))
    if path.name == "model.onnx" and len(shipped) == len(inputs):
        arrays = [onnx.numpy_helper.to_array(onnx.TensorProto.FromString(p.read_bytes())) for p in shipped]
        return {i.name: a for i, a in zip(inputs, arrays, strict=True)}
    feeds = {}
    for i in inputs:
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        if i.type == "tensor(float)":
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            pytest.skip(f"no shipped inputs and no random generator for {i.type}")
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("path", MODELS, ids=lambda p: str(Path(p).relative_to(DATA)))
def test_lossless_preset_on_backend_models(path: str, tmp_path: Path, rng) -> None:
    path = Path(path)
    model = load_model(path)
    pipeline = Pipeline.from_recipe(load_preset("lossless"))
    records = pipeline.run(model)
    out = save_model(model, tmp_path / "out.onnx")
    assert records[-1].after.nodes <= records[0].before.nodes
    again = pipeline.run(load_model(out))
    assert not any(r.modified for r in again), [r.pass_name for r in again if r.modified]
    try:
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # old opsets onnxruntime no longer runs: the passes must still cope
        pytest.skip(f"onnxruntime cannot load the original: {str(exc)[:80]}")
    candidate = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = _feeds(path, reference, rng)
    for expected, actual in zip(reference.run(None, feeds), candidate.run(None, feeds), strict=True):
        assert expected.dtype == actual.dtype and expected.shape == actual.shape
        if expected.dtype == object:  # strings: tobytes() would compare pointers
            assert expected.tolist() == actual.tolist()
        else:
            assert expected.tobytes() == actual.tobytes()
