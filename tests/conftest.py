"""Shared test helpers: parse ONNX text, run in onnxruntime, compare outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import settings

# Hypothesis draws its examples from a hash of each test, like the ``rng`` fixture below, unless
# ONNXPRESS_TEST_SEED=random asks for fresh ones: what passes here passes in CI.
settings.register_profile("onnxpress", derandomize=os.environ.get("ONNXPRESS_TEST_SEED") != "random")
settings.load_profile("onnxpress")


def parse(text: str) -> onnx.ModelProto:
    """Parses and checks a model written in ONNX text."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


def run_ort(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Runs a model in onnxruntime on the CPU."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(proto: onnx.ModelProto, rng: np.random.Generator, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Fresh random inputs for every graph input that is not an initializer."""
    dims = dims or {}
    inits = {i.name for i in proto.graph.initializer}
    feeds = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tensor_type = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 3) for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[inp.name] = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[inp.name] = rng.integers(0, 5, size=shape).astype(dtype)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_bit_identical(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    """Every output has the same dtype, shape and bytes."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.dtype == a.dtype and e.shape == a.shape
        assert e.tobytes() == a.tobytes()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's id, so a run (CI's included) is reproducible.

    ``ONNXPRESS_TEST_SEED=random`` draws fresh seeds (to explore), ``ONNXPRESS_TEST_SEED=N``
    uses N for every test. The seed is printed, so a failing test's report shows it.
    """
    chosen = os.environ.get("ONNXPRESS_TEST_SEED", "")
    if chosen == "random":
        seed = int(np.random.SeedSequence().entropy % 2**32)
    elif chosen:
        seed = int(chosen)
    else:
        seed = zlib.crc32(request.node.nodeid.encode())
    print(f"rng seed: {seed} (rerun with ONNXPRESS_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def apply_passes(proto: onnx.ModelProto, *names: str) -> tuple[onnx.ModelProto, list]:
    """Runs passes by name on a copy of ``proto``; returns the checked result and the records."""
    from onnxpress.pipeline import Pipeline

    model = ir.from_proto(proto)
    records = Pipeline.from_names(*names).run(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return out, records


def assert_same_outputs(
    before: onnx.ModelProto, after: onnx.ModelProto, rng: np.random.Generator, trials: int = 3, **kw
) -> None:
    """Both models give bit-identical outputs on fresh random inputs."""
    for _ in range(trials):
        feeds = random_feeds(before, rng, **kw)
        assert_bit_identical(run_ort(before, feeds), run_ort(after, feeds))


def op_types(proto: onnx.ModelProto) -> list[str]:
    """Op types of the main graph's nodes, in order."""
    return [n.op_type for n in proto.graph.node]


def python_stdout(code: str) -> str:
    """Runs ``code`` in a fresh interpreter (imports start from nothing) and returns its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout
