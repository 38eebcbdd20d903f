"""Trains the bundled Keras digits CNN and converts it with onnxpress's TF converter.

Run ``python -m onnxpress.models.train_keras_digits`` to rebuild ``keras_digits_cnn.onnx``.

Data: the same 75/25 split of :func:`sklearn.datasets.load_digits` as the PyTorch digits CNN
(:func:`onnxpress.models.train_digits_cnn.load_split`), so ``digits_test.npz`` serves both
models. The model takes the same layout, ``image`` float32 ``[N, 1, 8, 8]`` in ``[0, 1]``
(a ``Permute`` layer turns it to Keras's channels-last), and returns ``logits`` ``[N, 10]``.

Training is seeded (``keras.utils.set_random_seed``) with TensorFlow's deterministic ops on one
thread. The export goes through :func:`onnxpress.converters.from_keras`, whose fidelity check
runs on the real test images at batch size 1 and 450 (the whole test split), and the script
then reports the ONNX model's test accuracy next to Keras's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

SEED = 20240521
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
MODEL_FILENAME = "keras_digits_cnn.onnx"


def build_model():  # -> keras.Model (keras is imported lazily)
    """A small functional CNN: two 3x3 convolutions, 2x2 max pooling, two dense layers."""
    import keras

    image = keras.Input((1, 8, 8), name="image")
    x = keras.layers.Permute((2, 3, 1))(image)  # NCHW -> NHWC
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(image, logits, name="keras_digits_cnn")


def train(x_train: np.ndarray, y_train: np.ndarray):  # -> keras.Model
    """Adam on cross-entropy, seeded and deterministic."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=EPOCHS, batch_size=BATCH_SIZE, verbose=0, shuffle=True)
    return model


def main(argv: list[str] | None = None) -> int:
    """Trains, converts and checks the model; prints the accuracies and the fidelity."""
    parser = argparse.ArgumentParser(
        prog="python -m onnxpress.models.train_keras_digits",
        description=f"Train the bundled Keras digits CNN and write {MODEL_FILENAME}.",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent,
        help="folder for the model (default: the onnxpress.models package folder)",
    )
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        print(f"error: {args.out_dir}: no such folder", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from onnxpress.converters import from_keras
    from onnxpress.model_io import save_model
    from onnxpress.models.train_digits_cnn import load_split
    from onnxpress.sessions import load_session

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_split()
    model = train(x_train, y_train)
    keras_accuracy = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    train_seconds = time.perf_counter() - start

    result = from_keras(
        model,
        output_names=["logits"],
        data={"image": x_test},
        batch_sizes=(1, len(x_test)),
    )
    path = args.out_dir / MODEL_FILENAME
    save_model(result.model, path, force=True, external_data=False)
    logits = load_session(path).run(None, {"image": x_test})[0]
    onnx_accuracy = float((logits.argmax(1) == y_test).mean())

    print(f"trained in {train_seconds:.1f}s on {len(x_train)} images")
    print(f"test accuracy: Keras {keras_accuracy:.4f}, ONNX {onnx_accuracy:.4f} ({len(x_test)} images)")
    print(result.fidelity.summary())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
