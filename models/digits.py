"""The bundled digits CNN and its data, found through importlib.resources.

The files ship as package data of ``onnxpress.models`` (see ``train_digits_cnn`` for how they
are made), so these functions find them in a source checkout and in an installed wheel alike.

- ``digits_cnn.onnx``: input ``image`` float32 ``[N, 1, 8, 8]`` (pixels in ``[0, 1]``), output
  ``logits`` float32 ``[N, 10]``.
- ``digits_test.npz``: the held-out 25% split, ``image`` and ``label`` (int64).
- ``digits_calib.npz``: ``image``, 256 training samples for calibration.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from onnxpress.errors import InputError

_PACKAGE = "onnxpress.models"


def _resource(name: str) -> Path:
    """A real file path for a package data file (wheels and source checkouts are unpacked)."""
    path = Path(str(resources.files(_PACKAGE).joinpath(name)))
    if not path.is_file():
        raise InputError(
            f"{path}: the bundled file {name} is missing from {_PACKAGE}; "
            "reinstall onnxpress or run `python -m onnxpress.models.train_digits_cnn`"
        )
    return path


def digits_cnn_path() -> Path:
    """Path of ``digits_cnn.onnx``, the bundled CNN."""
    return _resource("digits_cnn.onnx")


def digits_test_path() -> Path:
    """Path of ``digits_test.npz`` (keys ``image``, ``label``)."""
    return _resource("digits_test.npz")


def digits_calib_path() -> Path:
    """Path of ``digits_calib.npz`` (key ``image``)."""
    return _resource("digits_calib.npz")


def load_digits_test() -> tuple[np.ndarray, np.ndarray]:
    """The held-out test split.

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 8, 8]`` in ``[0, 1]`` and int64 ``[N]``.
    """
    with np.load(digits_test_path()) as data:
        return data["image"], data["label"]


def load_digits_calib() -> np.ndarray:
    """The calibration images, float32 ``[256, 1, 8, 8]`` in ``[0, 1]``."""
    with np.load(digits_calib_path()) as data:
        return data["image"]
