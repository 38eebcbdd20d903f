"""The bundled Keras digits CNN: present, well-formed, and accurate on the held-out digits."""

from __future__ import annotations

import numpy as np
import onnx

from onnxpress.models.digits import load_digits_test
from onnxpress.models.keras_digits import keras_digits_path
from onnxpress.sessions import load_session


def test_keras_digits_cnn_is_bundled_and_accurate() -> None:
    path = keras_digits_path()
    onnx.checker.check_model(str(path))
    session = load_session(path)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape[1:] == [1, 8, 8]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    images, labels = load_digits_test()
    logits = session.run(None, {"image": images})[0]
    assert logits.shape == (len(images), 10)
    assert (logits.argmax(1) == labels).mean() >= 0.98
    # batch size does not change the answer
    one = np.concatenate([session.run(None, {"image": images[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(one, logits[:8], atol=1e-5)
