"""TensorFlow/Keras 3 to ONNX: Sequential, functional, subclassed, tf.function, files, errors."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import onnx_ir as ir  # noqa: E402

from onnxpress.cli import main  # noqa: E402
from onnxpress.converters import ConversionError, from_keras, from_tf  # noqa: E402
from onnxpress.converters.tf_export import convert_tf_source  # noqa: E402
from onnxpress.errors import InputError  # noqa: E402


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _sequential() -> keras.Model:
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def _functional() -> keras.Model:
    left = keras.Input((6,), name="left")
    right = keras.Input((4,), name="right")
    # gelu: Keras 3 computes it with Erfc, which tf2onnx lacks and onnxpress converts
    hidden = keras.layers.Concatenate()([keras.layers.Dense(5, activation="gelu")(left), right])
    scores = keras.layers.Dense(3, name="scores")(hidden)
    prob = keras.layers.Dense(1, activation="sigmoid", name="prob")(hidden)
    return keras.Model([left, right], [scores, prob])


class SubclassedGRU(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.gru = keras.layers.GRU(8)
        self.norm = keras.layers.LayerNormalization()
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.norm(self.gru(x)))


def test_keras_sequential_converts(rng: np.random.Generator) -> None:
    model = _sequential()
    result = from_keras(model)
    assert result.fidelity.passed and result.fidelity.batch_sizes == [1, 4]
    assert "from_function" in result.exporter
    assert [v.name for v in result.model.graph.inputs] == ["input"]
    x = rng.standard_normal((5, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, {"input": x})[0], model(x).numpy(), atol=1e-4, rtol=1e-3)


def test_keras_functional_two_inputs_two_outputs(rng: np.random.Generator) -> None:
    model = _functional()
    result = from_keras(model)
    assert [v.name for v in result.model.graph.inputs] == ["left", "right"]
    assert [v.name for v in result.model.graph.outputs] == ["scores", "prob"]
    assert len(result.fidelity.outputs) == 4 and result.fidelity.passed
    feeds = {"left": rng.standard_normal((3, 6)).astype(np.float32),
             "right": rng.standard_normal((3, 4)).astype(np.float32)}
    got = _run(result.model, feeds)
    expected = model([feeds["left"], feeds["right"]])
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=1e-3)


def test_keras_subclassed_needs_and_uses_input_description(rng: np.random.Generator) -> None:
    model = SubclassedGRU()
    with pytest.raises(InputError, match="--input"):
        from_keras(model)
    result = from_keras(model, inputs=["seq:B,T=10,4:float32"])
    assert result.fidelity.passed
    assert [str(d) for d in result.model.graph.inputs[0].shape] == ["B", "T", "4"]
    x = rng.standard_normal((2, 13, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, {"seq": x})[0], model(x).numpy(), atol=1e-4, rtol=1e-3)


def test_tf_function_with_dict_outputs_and_captured_constant(rng: np.random.Generator) -> None:
    weights = tf.constant(rng.standard_normal((5, 3)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="features")])
    def scores(features):
        return {"probs": tf.nn.softmax(tf.matmul(features, weights)),
                "norm": tf.norm(features, axis=-1)}

    result = from_tf(scores)
    assert [v.name for v in result.model.graph.inputs] == ["features"]  # no captured input
    assert sorted(v.name for v in result.model.graph.outputs) == ["norm", "probs"]
    assert result.fidelity.passed


def test_tf_function_without_signature_takes_descriptions() -> None:
    @tf.function
    def double(a, b):
        return a * 2.0 + tf.cast(b, tf.float32)

    with pytest.raises(InputError, match="no input_signature"):
        from_tf(double)
    result = from_tf(double, inputs=["a:Bx3:float32", "b:Bx3:int32"], opset=18)
    assert result.opset == 18 and result.fidelity.passed


def test_keras_file_and_savedmodel_from_cli(tmp_path: Path) -> None:
    model = _functional()
    keras_file = tmp_path / "model.keras"
    model.save(keras_file)
    out = tmp_path / "k.onnx"
    report = tmp_path / "k.json"
    assert main(["convert", "tf", str(keras_file), "-o", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["conversion"]["fidelity"]["passed"] is True
    assert data["conversion"]["inputs"] == ["left:batchx6:float", "right:batchx4:float"]

    saved = tmp_path / "saved"
    _sequential().export(str(saved), verbose=False)
    result = convert_tf_source(str(saved))
    assert "serving_default" in result.exporter and result.fidelity.passed
    with pytest.raises(InputError, match="no signature 'nope'.*serving_default"):
        convert_tf_source(str(saved), signature="nope")


def test_keras_file_is_loaded_in_safe_mode(tmp_path: Path) -> None:
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(InputError, match="safe mode"):
        convert_tf_source(str(path))


def test_unconvertible_tf_op_is_named(tmp_path: Path, capsys) -> None:
    script = tmp_path / "special.py"
    script.write_text(textwrap.dedent('''
        import tensorflow as tf
        def build():
            @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
            def f(x):
                return tf.math.special.bessel_i0e(x) + 1.0
            return f
    '''))
    with pytest.raises(ConversionError, match="BesselI0e") as info:
        convert_tf_source(f"{script}:build")
    assert info.value.op == "BesselI0e"
    assert "is not supported" in str(info.value)  # tf2onnx's own message is kept
    assert main(["convert", "tf", f"{script}:build", "-o", str(tmp_path / "x.onnx")]) == 3
    assert main(["convert", "tf", f"{script}:missing", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "no callable 'missing'" in capsys.readouterr().err


def test_input_description_that_does_not_fit_names_expected_inputs() -> None:
    model = _functional()
    with pytest.raises(InputError, match=r"expects 2 input\(s\) \(left:\?x6:float32, right:\?x4:float32\)"):
        from_keras(model, inputs=["left:Bx6:float32"])
    with pytest.raises(InputError, match="expects left"):
        from_keras(model, inputs=["left:Bx7:float32", "right:Bx4:float32"])
    with pytest.raises(InputError, match="up to 18"):
        from_keras(model, opset=19)


def test_hdf5_and_string_inputs_are_refused_clearly(tmp_path: Path) -> None:
    legacy = tmp_path / "old.h5"
    legacy.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(InputError, match="HDF5"):
        convert_tf_source(str(legacy))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def lengths(text):
        return tf.strings.length(text)

    with pytest.raises(InputError, match="'text' is a string tensor"):
        from_tf(lengths)


def test_misspelt_keras_input_name_and_raising_factory_are_input_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(InputError, match="rihgt are not inputs of the Keras model; it expects left"):
        from_keras(_functional(), inputs=["left:Bx6:float32", "rihgt:Bx4:float32"])
    script = tmp_path / "broken.py"
    script.write_text("def build():\n    raise ValueError('cannot build')\n")
    out = str(tmp_path / "x.onnx")
    assert main(["convert", "tf", f"{script}:build", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "ValueError: cannot build" in err and "Traceback" not in err


def test_built_subclassed_model_error_suggests_its_shape() -> None:
    model = SubclassedGRU()
    model(np.zeros((1, 7, 4), np.float32))
    with pytest.raises(InputError, match=r"built with input_shape \(1, 7, 4\): e.g. --input x:Bx7x4:float32"):
        from_keras(model)


def test_keras_model_with_nested_dict_outputs(rng: np.random.Generator) -> None:
    x = keras.Input((3,), name="x")
    model = keras.Model(x, {"a": keras.layers.Dense(2)(x), "b": {"c": keras.layers.Dense(1)(x)}})
    result = from_keras(model)
    assert result.fidelity.passed
    assert [v.name for v in result.model.graph.outputs] == ["a", "b_c"]
    feed = rng.standard_normal((2, 3)).astype(np.float32)
    expected = model(feed)
    got = _run(result.model, {"x": feed})
    np.testing.assert_allclose(got[1], expected["b"]["c"].numpy(), atol=1e-5, rtol=1e-4)
