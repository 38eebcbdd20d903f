"""The int8 and int4 presets on MiniLM-L6 with its real weights (slow: about two minutes)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress.model_io import load_model, save_model
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import load_preset
from onnxpress.sessions import load_session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from onnxpress.models.minilm import build_minilm_onnx, sample_sentences, tokenize

    path = build_minilm_onnx()
    held_out = tokenize(sample_sentences(64, seed=11), max_length=128)
    calib = tokenize(sample_sentences(32, seed=12), max_length=128, pad_to_max=True)
    batches = [{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, 32, 8)]
    reference = load_session(path).run(None, held_out)[0]
    return path, held_out, batches, reference


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_int8_preset_meets_its_targets(minilm, tmp_path):
    path, held_out, batches, reference = minilm
    model = load_model(path)
    records = Pipeline.from_recipe(load_preset("int8")).run(model, calibration=batches)
    out = save_model(model, tmp_path / "int8.onnx")
    assert out.stat().st_size <= 24e6
    got = load_session(out).run(None, held_out)[0]
    assert _cosine(reference, got) >= 0.995, records[-1].details


def test_int4_shrinks_the_embedding_too(minilm, tmp_path):
    """Without auto-exclude (it is the slow part): every MatMul and the 47 MB embedding in 4 bits."""
    path, held_out, _, reference = minilm
    model = load_model(path)
    recipe = load_preset("int4")
    recipe.steps[-1].options["auto_exclude"] = False
    Pipeline.from_recipe(recipe).run(model)
    out = save_model(model, tmp_path / "int4.onnx")
    assert out.stat().st_size <= 16e6
    assert sum(n.op_type == "GatherBlockQuantized" for n in model.graph) >= 1
    got = load_session(out).run(None, held_out)[0]
    assert _cosine(reference, got) >= 0.965
