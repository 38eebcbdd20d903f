"""Trains the bundled reference CNN on scikit-learn's 8x8 digits and exports it to ONNX.

The model is small on purpose (about 40k parameters, a few seconds to train on one CPU thread)
but has the shapes the lossy passes care about: two Conv+BatchNorm+ReLU blocks with 16 and 32
channels, a max-pool, and a two-layer Linear (Gemm) head. It is the reference model for the
tests and benchmarks of pruning, quantization and packing.

Data: the 1797 digits of :func:`sklearn.datasets.load_digits`, pixels scaled from ``0..16`` to
``[0, 1]`` (divided by 16) and shaped ``[N, 1, 8, 8]``; a stratified 25% test split is held out.
Training is seeded and runs on one thread with deterministic algorithms, so a rerun on the same
software reproduces the same weights.

Outputs, written to ``--out-dir`` (this package's folder by default):

- ``digits_cnn.onnx``: opset 18, input ``image`` float32 ``[N, 1, 8, 8]``, output ``logits``
  float32 ``[N, 10]``, exported with torch's dynamo exporter into one self-contained file and
  checked against PyTorch in onnxruntime. BatchNorm is exported in eval mode, where it is an
  affine map that the exporter's optimizer folds into the convolution before it
  (``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``),
  so the graph is ``Conv, Relu, Conv, Relu, MaxPool, Reshape, Gemm, Relu, Gemm``.
- ``digits_test.npz``: the held-out split, ``image`` float32 ``[N, 1, 8, 8]`` and ``label`` int64.
- ``digits_calib.npz``: ``image``, 256 training samples for calibrating quantization.

Run it as ``python -m onnxpress.models.train_digits_cnn [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SEED = 20240521
TEST_FRACTION = 0.25
CALIB_SAMPLES = 256
EPOCHS = 30
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
#: Largest difference allowed between PyTorch and onnxruntime on the test split.
EXPORT_TOLERANCE = 1e-4


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits as ``[N, 1, 8, 8]`` float32 in ``[0, 1]``, split 75/25 stratified by label.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``; labels are int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    return x_train, y_train, x_test, y_test


def build_model():  # -> torch.nn.Module (torch is imported lazily)
    """Conv(1->16)+BN+ReLU, Conv(16->32)+BN+ReLU, MaxPool 2, Linear(512->64)+ReLU, Linear(64->10).

    All convolutions are 3x3 with padding 1, so the 8x8 image stays 8x8 until the pool.
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(x_train: np.ndarray, y_train: np.ndarray):  # -> torch.nn.Module
    """Trains :func:`build_model` with Adam and cross-entropy; returns it in eval mode."""
    import torch

    torch.manual_seed(SEED)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = torch.nn.CrossEntropyLoss()
    images = torch.from_numpy(x_train)
    labels = torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        scheduler.step()
        logger.debug("epoch %d: loss %.4f", epoch + 1, total / len(images))
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is at the label."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def export(model, path: Path, example: np.ndarray) -> None:
    """Exports with torch's dynamo exporter: opset 18, dynamic batch, one self-contained file."""
    import torch

    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        dynamo=True,
        opset_version=18,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    # Write through a temporary name so an interrupted export never leaves a broken model.
    tmp = path.with_name(f".{path.name}.tmp")
    program.save(str(tmp), external_data=False)
    os.replace(tmp, path)


def check_export(model, path: Path, images: np.ndarray) -> float:
    """Largest |PyTorch - onnxruntime| over ``images``; raises if above the tolerance."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"image": images})
    error = float(np.max(np.abs(expected - actual)))
    if not error < EXPORT_TOLERANCE:
        raise RuntimeError(
            f"{path}: onnxruntime differs from PyTorch by {error:.3g} (allowed {EXPORT_TOLERANCE})"
        )
    return error


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Trains, exports and checks the model; prints the test accuracy."""
    parser = argparse.ArgumentParser(
        prog="python -m onnxpress.models.train_digits_cnn",
        description="Train the bundled digits CNN and write digits_cnn.onnx, digits_test.npz "
        "and digits_calib.npz.",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent,
        help="folder for the three files (default: the onnxpress.models package folder)",
    )
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        print(f"error: {args.out_dir}: no such folder", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_split()
    model = train(x_train, y_train)
    with torch.no_grad():
        test_accuracy = accuracy(model(torch.from_numpy(x_test)).numpy(), y_test)
    train_seconds = time.perf_counter() - start

    onnx_path = args.out_dir / "digits_cnn.onnx"
    export(model, onnx_path, x_test[:2])
    error = check_export(model, onnx_path, x_test)

    calib = np.random.default_rng(SEED).choice(len(x_train), CALIB_SAMPLES, replace=False)
    _save_npz(args.out_dir / "digits_test.npz", image=x_test, label=y_test)
    _save_npz(args.out_dir / "digits_calib.npz", image=x_train[np.sort(calib)])

    print(f"trained in {train_seconds:.1f}s on {len(x_train)} images")
    print(f"test accuracy: {test_accuracy:.4f} ({len(x_test)} images)")
    print(f"onnxruntime vs PyTorch max abs error: {error:.2e}")
    print(f"wrote {onnx_path}, digits_test.npz, digits_calib.npz in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
