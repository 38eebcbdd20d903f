"""The bundled Keras digits CNN, converted to ONNX by onnxpress's TF converter.

``keras_digits_cnn.onnx`` ships as package data of ``onnxpress.models`` (rebuild it with
``python -m onnxpress.models.train_keras_digits``). It takes the same input as the PyTorch
digits CNN, ``image`` float32 ``[N, 1, 8, 8]`` with pixels in ``[0, 1]``, and returns
``logits`` float32 ``[N, 10]``, so ``digits_test.npz`` and ``digits_calib.npz`` serve both.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from onnxpress.errors import InputError

#: File name of the bundled model.
MODEL_FILENAME = "keras_digits_cnn.onnx"


def keras_digits_path() -> Path:
    """Path of ``keras_digits_cnn.onnx``."""
    path = Path(str(resources.files("onnxpress.models").joinpath(MODEL_FILENAME)))
    if not path.is_file():
        raise InputError(
            f"{path}: the bundled {MODEL_FILENAME} is missing; reinstall onnxpress or run "
            "`python -m onnxpress.models.train_keras_digits`"
        )
    return path
