"""Benchmark: onnxpress's quantization presets against onnxruntime's own ``quantize_dynamic``.

MiniLM-L6 (all-MiniLM-L6-v2, real pretrained weights, built by
``onnxpress.models.minilm.build_minilm_onnx``) is compressed with:

- ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` with default settings;
- ``ort-dynamic-per-channel``: the same with ``per_channel=True``;
- ``ort-fused-fp32`` and ``ort-fused-qattention`` (``--skip ort-fused``): the ceiling of
  onnxruntime's own int8 path on this machine. MiniLM exported by TorchScript (the graph
  ``onnxruntime.transformers`` knows how to fuse), fused by ``optimize_model`` (Attention,
  SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), then ``quantize_dynamic``
  per channel (QAttention, DynamicQuantizeMatMul). Both are faster than the plain export, so
  their ratios to ``fp32`` mix the fusion's gain with the quantization's;
- the presets ``int8``, ``int4`` and ``fp16`` (``onnxpress compress --preset P --data CALIB``),
  calibrated on ``--calib`` sentences that are not among the evaluation sentences.

Each row gives the file size, the mean cosine between its sentence embeddings and the float32
model's over ``--sentences`` real sentences (docstrings of Python's standard library, a
different seed from the calibration ones), and throughput at batch 32 x 128 tokens with
``--threads`` intra-op threads. Throughput is measured interleaved: every round runs each
model once, in turn, so load from other processes hits all rows alike; the table gives the
median over rounds and the ratio to float32 in the same run.

The digits CNN rows give test accuracy (450 held-out digits) of the float model and of the
``int8`` preset (calibrated on ``digits_calib.npz``), and of ``quantize-int8-static``.

Usage::

    python benchmarks/quant_bench.py                       # everything
    python benchmarks/quant_bench.py --rounds 8 --skip int4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _session(path: Path, threads: int):
    from onnxpress.sessions import load_session

    return load_session(path, threads=threads)


def _embed(session, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    return np.concatenate([session.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _compress(model: Path, out: Path, preset: str, data: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "onnxpress", "compress", str(model), "-o", str(out), "--preset", preset,
         "--data", str(data), "--force", "--no-progress"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def _ort_fused(work: Path) -> dict[str, tuple[Path, float]]:
    """onnxruntime's best int8 path for BERT-like models, and its fused float32 starting point."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from onnxpress.models.minilm import load_torch_model

    start = time.perf_counter()
    exported = work / "minilm-torchscript.onnx"
    ids = torch.randint(1000, 2000, (2, 16))
    torch.onnx.export(
        load_torch_model().eval(), (ids, torch.ones_like(ids)), str(exported), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                      "embedding": {0: "batch"}},
    )
    fused = work / "ort-fused-fp32.onnx"
    optimize_model(str(exported), model_type="bert", num_heads=12, hidden_size=384, opt_level=0).save_model_to_file(
        str(fused))
    fused_s = time.perf_counter() - start
    quantized = work / "ort-fused-qattention.onnx"
    start = time.perf_counter()
    quantize_dynamic(str(fused), str(quantized), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"ort-fused-fp32": (fused, fused_s), "ort-fused-qattention": (quantized, time.perf_counter() - start)}


def minilm_rows(args: argparse.Namespace, work: Path) -> list[dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxpress.models.minilm import build_minilm_onnx, sample_sentences, tokenize

    fp32 = build_minilm_onnx()
    evaluation = tokenize(sample_sentences(args.sentences, seed=1), max_length=128, pad_to_max=True)
    calib = work / "calib.npz"
    np.savez(calib, **tokenize(sample_sentences(args.calib, seed=7), max_length=128, pad_to_max=True))
    models: dict[str, tuple[Path, float]] = {"fp32": (fp32, 0.0)}
    for name, per_channel in (("ort-dynamic", False), ("ort-dynamic-per-channel", True)):
        if name in args.skip:
            continue
        out = work / f"{name}.onnx"
        start = time.perf_counter()
        quantize_dynamic(str(fp32), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)
        models[name] = (out, time.perf_counter() - start)
    if "ort-fused" not in args.skip:
        models.update(_ort_fused(work))
    for preset in ("int8", "int4", "fp16"):
        if preset in args.skip:
            continue
        out = work / f"{preset}.onnx"
        models[preset] = (out, _compress(fp32, out, preset, calib))
        print(f"  compressed {preset} in {models[preset][1]:.0f}s", file=sys.stderr)
    sessions = {name: _session(path, args.threads) for name, (path, _) in models.items()}
    reference = _embed(sessions["fp32"], evaluation)
    rows = []
    for name, (path, seconds) in models.items():
        rows.append({"model": name, "bytes": path.stat().st_size + sum(
            p.stat().st_size for p in path.parent.glob(path.name + ".data")),
            "cosine": _cosine(reference, _embed(sessions[name], evaluation)), "compress_s": seconds})
    bench = tokenize(sample_sentences(32, seed=3), max_length=128, pad_to_max=True)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, bench)  # warm up
    for _ in range(args.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, bench)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    for row in rows:
        median = statistics.median(times[row["model"]])
        row["ms"] = median * 1000
        row["speedup"] = base / median
    return rows


def digits_rows(work: Path) -> list[dict]:
    from onnxpress.calibration import CalibrationData
    from onnxpress.model_io import load_model, save_model
    from onnxpress.models.digits import digits_calib_path, digits_cnn_path, load_digits_test
    from onnxpress.passes.quantize_int8_static import QuantizeInt8StaticPass

    images, labels = load_digits_test()

    def accuracy(path: Path) -> float:
        session = _session(path, 2)
        return float((session.run(None, {"image": images})[0].argmax(1) == labels).mean())

    rows = [{"model": "digits fp32", "path": digits_cnn_path()}]
    out = work / "digits-int8.onnx"
    _compress(digits_cnn_path(), out, "int8", digits_calib_path())
    rows.append({"model": "digits int8 preset", "path": out})
    model = load_model(digits_cnn_path())
    QuantizeInt8StaticPass(calibration=CalibrationData(digits_calib_path(), model, batch_size=64))(model)
    static = work / "digits-int8-static.onnx"
    save_model(model, static)
    rows.append({"model": "digits quantize-int8-static", "path": static})
    for row in rows:
        row["accuracy"] = accuracy(row["path"])
        row["bytes"] = Path(row["path"]).stat().st_size
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512, help="evaluation sentences")
    parser.add_argument("--calib", type=int, default=64, help="calibration sentences (another seed)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to skip: ort-dynamic, ort-fused, int8, int4, fp16, digits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        work = Path(tmp)
        rows = minilm_rows(args, work)
        print(f"MiniLM-L6, {args.sentences} sentences, batch 32 x 128 tokens, {args.threads} threads, "
              f"median of {args.rounds} interleaved rounds")
        print(f"{'model':26s} {'file MB':>8s} {'cosine':>8s} {'ms/batch':>9s} {'vs fp32':>8s} {'compress s':>11s}")
        for r in rows:
            print(f"{r['model']:26s} {r['bytes'] / 1e6:8.2f} {r['cosine']:8.5f} {r['ms']:9.0f} "
                  f"{r['speedup']:7.2f}x {r['compress_s']:11.1f}")
        if "digits" not in args.skip:
            print()
            digits = digits_rows(work)
            base = digits[0]["accuracy"]
            print(f"{'digits CNN':30s} {'file KB':>8s} {'accuracy':>9s} {'drop (points)':>14s}")
            for r in digits:
                print(f"{r['model']:30s} {r['bytes'] / 1e3:8.1f} {100 * r['accuracy']:8.2f}% "
                      f"{100 * (base - r['accuracy']):14.2f}")


if __name__ == "__main__":
    main()
