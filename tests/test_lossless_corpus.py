"""The lossless preset on every model onnx ships for its backend tests.

These are models nobody wrote for onnxpress: CNNs (AlexNet, Inception, ResNet-50, SqueezeNet,
VGG-19 and others, with light weights), PyTorch-exported layers and operators at old opsets and
IR versions, sequence ops; and onnx's node test cases, built in memory (control flow,
sequences, optionals, expanded functions, and a sample of single ops). Each must come out
loadable, bit-identical in onnxruntime on the backend test's own inputs (random ones where
none ship), and unchanged by a second run.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxpress.model_io import load_model, save_model
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import load_preset

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODELS = sorted(glob.glob(str(DATA / "light" / "*.onnx")) + glob.glob(str(DATA / "*" / "*" / "model.onnx")))


def _feeds(path: Path, session: ort.InferenceSession, rng: np.random.Generator) -> dict[str, np.ndarray]:
    inputs = session.get_inputs()
    shipped = sorted(path.parent.glob("test_data_set_0/input_*.pb"))
    if path.name == "model.onnx" and len(shipped) == len(inputs):
        arrays = [onnx.numpy_helper.to_array(onnx.TensorProto.FromString(p.read_bytes())) for p in shipped]
        return {i.name: a for i, a in zip(inputs, arrays, strict=True)}
    feeds = {}
    for i in inputs:
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        if i.type == "tensor(float)":
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            pytest.skip(f"no shipped inputs and no random generator for {i.type}")
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("path", MODELS, ids=lambda p: str(Path(p).relative_to(DATA)))
def test_lossless_preset_on_backend_models(path: str, tmp_path: Path, rng) -> None:
    path = Path(path)
    model = load_model(path)
    pipeline = Pipeline.from_recipe(load_preset("lossless"))
    records = pipeline.run(model)
    out = save_model(model, tmp_path / "out.onnx")
    assert records[-1].after.nodes <= records[0].before.nodes
    again = pipeline.run(load_model(out))
    assert not any(r.modified for r in again), [r.pass_name for r in again if r.modified]
    try:
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # old opsets onnxruntime no longer runs: the passes must still cope
        pytest.skip(f"onnxruntime cannot load the original: {str(exc)[:80]}")
    candidate = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = _feeds(path, reference, rng)
    for expected, actual in zip(reference.run(None, feeds), candidate.run(None, feeds), strict=True):
        assert expected.dtype == actual.dtype and expected.shape == actual.shape
        if expected.dtype == object:  # strings: tobytes() would compare pointers
            assert expected.tolist() == actual.tolist()
        else:
            assert expected.tobytes() == actual.tobytes()


def _node_case_sample() -> list:
    """onnx's node test cases (built in memory; the wheel ships no files for them): every one
    with a subgraph, a local function or a non-tensor input or output, and every 16th other."""
    import warnings

    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)

    def special(model: onnx.ModelProto) -> bool:
        graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        return bool(model.functions) or any(
            a.type in graphs for n in model.graph.node for a in n.attribute
        ) or any(not v.type.HasField("tensor_type") for v in [*model.graph.input, *model.graph.output])

    plain = [c for c in cases if not special(c.model)]
    return [c for c in cases if special(c.model)] + plain[::16]


def _same(expected, actual) -> bool:
    """Bit equality through sequences and optionals (None)."""
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            _same(e, a) for e, a in zip(expected, actual, strict=True)
        )
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.dtype != actual.dtype or expected.shape != actual.shape:
        return False
    if expected.dtype == object:
        return expected.tolist() == actual.tolist()
    return expected.tobytes() == actual.tobytes()


def _as_feed(value):
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_as_feed(v) for v in value]
    return np.asarray(value) if isinstance(value, np.generic) else value


@pytest.mark.slow
def test_lossless_preset_on_onnx_node_test_cases() -> None:
    """If, Loop, Scan, sequences, optionals, expanded functions and a sample of single ops:
    the preset never fails, the result loads wherever the original does, outputs stay
    bit-identical on the cases' own inputs, and a second run changes nothing."""
    import onnx_ir as ir

    options = ort.SessionOptions()
    options.log_severity_level = 4
    failures = []
    for case in _node_case_sample():
        try:
            reference = ort.InferenceSession(case.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # types or ops this onnxruntime lacks: the passes must still cope
            reference = None
        model = ir.from_proto(case.model)
        pipeline = Pipeline.from_recipe(load_preset("lossless"))
        try:
            pipeline.run(model)
            again = pipeline.run(ir.from_proto(ir.to_proto(model)))
        except Exception as exc:
            failures.append(f"{case.name}: {exc}")
            continue
        if any(r.modified for r in again):
            failures.append(f"{case.name}: a second run changed {[r.pass_name for r in again if r.modified]}")
        if reference is None:
            continue
        try:
            candidate = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            failures.append(f"{case.name}: the result does not load: {str(exc)[:200]}")
            continue
        inputs = case.data_sets[0][0] if case.data_sets else []
        feeds = {i.name: _as_feed(v) for i, v in zip(case.model.graph.input, inputs)}
        try:
            expected = reference.run(None, feeds)
        except Exception:  # inputs onnxruntime cannot take from Python (float8, bfloat16)
            continue
        actual = candidate.run(None, feeds)
        if not all(_same(e, a) for e, a in zip(expected, actual, strict=True)):
            failures.append(f"{case.name}: outputs differ")
    assert not failures, "\n".join(failures)
