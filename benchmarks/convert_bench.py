"""Benchmark: export time and fidelity of each bundled model through onnxpress's converters.

Rows:

- ``minilm-l6-v2`` (PyTorch, dynamo exporter): the package's weights, checked on 8 real
  sentences (tokenized stdlib docstrings) at batch sizes 1 and 8, cosine >= 0.99999 required.
- ``digits_cnn`` (PyTorch): trained first with ``onnxpress.models.train_digits_cnn``, checked
  on the 450 held-out test digits at batch sizes 1 and 450.
- ``keras_digits_cnn`` (Keras 3 via tf2onnx): trained first with
  ``onnxpress.models.train_keras_digits``, checked on the same test digits.

Export time is the ``from_torch`` / ``from_keras`` call: tracing, conversion, the fidelity
runs on both sides, not the training and not loading the weights. The first export in a
process also pays for importing the exporter (``torch.onnx``/onnxscript, tf2onnx), which is
part of what a user waits for, so it is included. Numbers depend on the machine and on what
else runs on it; report them as measured.

Usage::

    python benchmarks/convert_bench.py                    # all three
    python benchmarks/convert_bench.py --models minilm    # one
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _minilm() -> tuple[Any, float]:
    from onnxpress.converters import from_torch
    from onnxpress.converters.specs import InputSpec
    from onnxpress.models import minilm

    module = minilm.load_torch_model()
    data = minilm.tokenize(minilm.sample_sentences(8, seed=1))
    start = time.perf_counter()
    result = from_torch(
        module,
        inputs=[InputSpec.parse("input_ids:batchxseq:int64"),
                InputSpec.parse("attention_mask:batchxseq:int64")],
        output_names=["sentence_embedding"],
        data=data,
        batch_sizes=(1, 8),
        min_cosine=minilm.MIN_COSINE,
        check=False,
    )
    return result, time.perf_counter() - start


def _digits_torch() -> tuple[Any, float]:
    import torch

    from onnxpress.converters import from_torch
    from onnxpress.models import train_digits_cnn

    torch.manual_seed(train_digits_cnn.SEED)
    x_train, y_train, x_test, _ = train_digits_cnn.load_split()
    module = train_digits_cnn.train(x_train, y_train)
    start = time.perf_counter()
    result = from_torch(
        module, inputs=["image:Nx1x8x8:float32"], output_names=["logits"],
        data={"image": x_test}, batch_sizes=(1, len(x_test)), check=False,
    )
    return result, time.perf_counter() - start


def _digits_keras() -> tuple[Any, float]:
    from onnxpress.converters import from_keras
    from onnxpress.models import train_keras_digits
    from onnxpress.models.train_digits_cnn import load_split

    x_train, y_train, x_test, _ = load_split()
    model = train_keras_digits.train(x_train, y_train)
    start = time.perf_counter()
    result = from_keras(
        model, output_names=["logits"], data={"image": x_test},
        batch_sizes=(1, len(x_test)), check=False,
    )
    return result, time.perf_counter() - start


MODELS: dict[str, tuple[str, Callable[[], tuple[Any, float]]]] = {
    "minilm": ("minilm-l6-v2", _minilm),
    "digits": ("digits_cnn", _digits_torch),
    "keras-digits": ("keras_digits_cnn", _digits_keras),
}


def _size(model: Any) -> int:
    from onnxpress.model_io import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        save_model(model, path)
        return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: all)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    header = ["model", "exporter", "opset", "MB", "export s", "batches", "max abs err",
              "rel L2 err", "min cosine", "fidelity"]
    rows = [header]
    for name in names:
        label, run = MODELS[name]
        print(f"converting {label} ...", file=sys.stderr, flush=True)
        result, seconds = run()
        record = result.fidelity
        rows.append([
            label, result.exporter.split(" (")[0], str(result.opset),
            f"{_size(result.model) / 1e6:.1f}", f"{seconds:.1f}",
            ",".join(map(str, record.batch_sizes)), f"{record.worst_max_abs_error:.2e}",
            f"{record.worst_rel_l2_error:.2e}", f"{record.min_cosine_seen:.7f}",
            "pass" if record.passed else "FAIL",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    return 0 if all(r[-1] == "pass" for r in rows[1:]) else 4


if __name__ == "__main__":
    sys.exit(main())
