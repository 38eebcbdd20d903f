"""Sequential SparseGPT reads each layer input from where the last read stopped (IncrementalReader)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
from onnxpress.passes import pruning_common
from onnxpress.passes.pruning_common import (
    IncrementalReader,
    run_with_outputs,
    set_constant,
)
from onnxpress.passes.registry import get_pass

PruneMagnitude = get_pass("prune-magnitude")
WIDTH = 24


def _residual_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """Three MatMul+bias layers on a residual stream: the stream is read far from where it is made."""
    inits, nodes, stream = [], [], "x"
    for i in range(3):
        inits += [nh.from_array((rng.standard_normal((WIDTH, WIDTH)) / 4).astype(np.float32), f"w{i}"),
                  nh.from_array(rng.standard_normal(WIDTH).astype(np.float32), f"b{i}")]
        nodes += [
            oh.make_node("MatMul", [stream, f"w{i}"], [f"m{i}"]),
            oh.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            oh.make_node("Relu", [f"a{i}"], [f"r{i}"]),
            oh.make_node("Add", [f"r{i}", stream], [f"s{i}"]),
        ]
        stream = f"s{i}"
    nodes.append(oh.make_node("Identity", [stream], ["y"]))
    model = oh.make_model(
        oh.make_graph(
            nodes, "residual",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "S", WIDTH])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", "S", WIDTH])],
            inits,
        ),
        opset_imports=[oh.make_opsetid("", 18)],
    )
    onnx.checker.check_model(model)
    return model


def _batches(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((4, length, WIDTH)).astype(np.float32)} for length in (3, 7, 5)]


def test_reads_match_whole_model_runs_while_later_layers_change(rng):
    model = ir.from_proto(_residual_mlp(rng))
    batches = _batches(rng)
    reader = IncrementalReader(batches)
    assert all(np.array_equal(a, b["x"]) for a, b in zip(reader.read(model, "x"), batches, strict=True))
    for i in range(3):
        # rewrite the layer that reads the value just read, as the pass does, then read the next input
        weight = model.graph.initializers[f"w{i}"]
        set_constant(weight, (weight.const_value.numpy() * rng.uniform(0, 2, (WIDTH, WIDTH))).astype(np.float32))
        name = f"s{i}"
        got = reader.read(model, name)
        expected = [v[name] for v in run_with_outputs(model, [name], batches)]
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        # the cut keeps what later nodes still need and nothing they do not
        assert set(reader.cut[0]) == {name}


def test_sequential_pass_is_the_same_with_incremental_reads(rng, monkeypatch):
    proto = _residual_mlp(rng)
    batches = _batches(rng)
    options = {"sparsity": 0.5, "scope": "per-layer", "granularity": "row", "min_elements": 0,
               "score": "sparsegpt", "sequential": True, "refit_bias": True}
    results = []
    for whole in (False, True):
        if whole:  # every read through a whole-model run, the path before IncrementalReader
            monkeypatch.setattr(
                IncrementalReader, "read",
                lambda self, model, name: [v[name] for v in pruning_common.run_with_outputs(model, [name], self.batches)],
            )
        model = ir.from_proto(proto)
        PruneMagnitude(PruneMagnitude.Config(**options), calibration=batches)(model)
        results.append({k: v.const_value.numpy() for k, v in model.graph.initializers.items()})
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)
    assert np.mean(results[0]["w1"] == 0) == pytest.approx(0.5)


def test_refit_kept_solves_the_kept_weights_for_the_same_mask(rng):
    w = rng.standard_normal((48, 32)).astype(np.float32)
    proto = oh.make_model(
        oh.make_graph(
            [oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 48])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
            [nh.from_array(w, "w")],
        ),
        opset_imports=[oh.make_opsetid("", 18)],
    )
    mixing = (np.eye(48) + 0.5 * rng.standard_normal((48, 48))) * np.exp(rng.uniform(-1, 1, 48))[None, :]
    calibration = [{"x": (rng.standard_normal((256, 48)) @ mixing).astype(np.float32)} for _ in range(2)]
    x = np.concatenate([b["x"] for b in calibration]).astype(np.float64)
    options = {"sparsity": 0.6, "scope": "per-layer", "granularity": "row", "min_elements": 0,
               "score": "sparsegpt", "damping": 1e-6, "block_size": 16}
    pruned = {}
    for refit in (False, True):
        model = ir.from_proto(proto)
        PruneMagnitude(PruneMagnitude.Config(refit_kept=refit, **options), calibration=calibration)(model)
        pruned[refit] = model.graph.initializers["w"].const_value.numpy().astype(np.float64)
    np.testing.assert_array_equal(pruned[True] == 0, pruned[False] == 0)  # same mask
    errors = {k: np.linalg.norm(x @ v - x @ w, axis=0) for k, v in pruned.items()}
    # the refit is the least-squares optimum of each output column for its mask
    assert (errors[True] <= errors[False] * (1 + 1e-5)).all()
    assert errors[True].sum() < 0.99 * errors[False].sum()
    with pytest.raises(ValueError, match="refit_kept"):
        PruneMagnitude.Config(score="activation", refit_kept=True)
