"""prune-channels: shapes stay consistent, the followed ops, residual groups, what is left alone.

Most tests plant channels whose weights and biases are exactly zero: removing them changes no
output, so the pruned model must match the original to float rounding (atol 1e-5), which
checks every slice the pass makes (producer, BatchNorm, consumer rows, Flatten blocks).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
from conftest import assert_bit_identical, random_feeds, run_ort
from onnxpress.passes.registry import get_pass

from onnxpress.errors import RecipeError
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import parse_recipe

PruneChannels = get_pass("prune-channels")
FLOAT = onnx.TensorProto.FLOAT


def _build(nodes, inits: dict[str, np.ndarray], inputs, outputs) -> onnx.ModelProto:
    graph = oh.make_graph(
        nodes, "net",
        [oh.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
        [oh.make_tensor_value_info(n, FLOAT, s) for n, s in outputs],
        [nh.from_array(np.asarray(v, dtype=np.float32) if v.dtype != np.int64 else v, k) for k, v in inits.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _zero_out(w: np.ndarray, b: np.ndarray | None, channels: list[int], axis: int = 0) -> None:
    index = [slice(None)] * w.ndim
    index[axis] = channels
    w[tuple(index)] = 0.0
    if b is not None:
        b[channels] = 0.0


def _prune(proto: onnx.ModelProto, calibration=None, **options):
    model = ir.from_proto(proto)
    instance = PruneChannels(PruneChannels.Config(**options), calibration=calibration)
    result = instance(model)
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    return pruned, instance, result.modified


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in proto.graph.initializer}


def _assert_same_outputs(proto, pruned, rng, batch: int = 5) -> None:
    feeds = random_feeds(proto, rng, {"N": batch})
    for expected, actual in zip(run_ort(proto, feeds), run_ort(pruned, feeds), strict=True):
        assert expected.shape == actual.shape
        # Removing zero channels only changes float32 summation order, so the rounding error
        # scales with the output's magnitude, not with each element's (a 0.07 logit beside a
        # 700 one can move by 5e-5).
        atol = 1e-6 * float(np.abs(expected).max())
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


def _cnn(rng: np.random.Generator, reshape: str) -> onnx.ModelProto:
    """Conv(3->8)+BN+ReLU+MaxPool, Conv(8->8)+ReLU, Flatten/Reshape, Gemm(128->10)."""
    w1, b1 = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    w2, b2 = rng.standard_normal((8, 8, 3, 3)), rng.standard_normal(8)
    scale, beta = rng.uniform(0.5, 2, 8), rng.standard_normal(8)
    mean, var = rng.standard_normal(8), rng.uniform(0.5, 2, 8)
    _zero_out(w1, b1, [1, 4, 6])
    beta[[1, 4, 6]] = 0.0
    mean[[1, 4, 6]] = 0.0
    _zero_out(w2, b2, [0, 5, 7])
    inits = {
        "w1": w1, "b1": b1, "scale": scale, "beta": beta, "mean": mean, "var": var, "w2": w2, "b2": b2,
        "fc_w": rng.standard_normal((10, 8 * 4 * 4)), "fc_b": rng.standard_normal(10),
    }
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["c1", "scale", "beta", "mean", "var"], ["bn"]),
        oh.make_node("Relu", ["bn"], ["r1"]),
        oh.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c2"], ["r2"]),
    ]
    if reshape == "flatten":
        nodes.append(oh.make_node("Flatten", ["r2"], ["flat"], axis=1))
    else:
        inits["target"] = np.array([-1, 128] if reshape == "reshape-explicit" else [0, -1], dtype=np.int64)
        nodes.append(oh.make_node("Reshape", ["r2", "target"], ["flat"]))
    nodes.append(oh.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1))
    return _build(nodes, inits, [("x", ["N", 3, 8, 8])], [("y", ["N", 10])])


@pytest.mark.parametrize("reshape", ["flatten", "reshape-explicit", "reshape-zero"])
def test_conv_bn_pool_flatten_gemm_chain(rng, reshape):
    proto = _cnn(rng, reshape)
    pruned, instance, modified = _prune(proto, ratio=0.375, criterion="l1", ops=("Conv",))
    assert modified
    shapes = _shapes(pruned)
    assert shapes["w1"] == (5, 3, 3, 3) and shapes["b1"] == (5,)
    assert shapes["scale"] == shapes["beta"] == shapes["mean"] == shapes["var"] == (5,)
    assert shapes["w2"] == (5, 5, 3, 3) and shapes["b2"] == (5,)
    assert shapes["fc_w"] == (10, 5 * 16)
    if reshape == "reshape-explicit":
        target = next(nh.to_array(i) for i in pruned.graph.initializer if i.name == "target")
        assert target.tolist() == [-1, 80]
    _assert_same_outputs(proto, pruned, rng)
    details = instance.details
    assert details["groups"]["w1"] == {"producers": ["w1"], "consumers": ["w2"], "channels_before": 8, "channels_after": 5}
    assert details["groups"]["w2"]["consumers"] == ["fc_w"]
    assert details["channels_removed"] == 6
    assert details["macs_after"] < details["macs_before"]


def test_zero_ratio_is_bit_identical(rng):
    proto = _cnn(rng, "flatten")
    pruned, instance, modified = _prune(proto, ratio=0.0)
    assert not modified and instance.details["message"].startswith("no prunable channel group")
    feeds = random_feeds(proto, rng)
    assert_bit_identical(run_ort(proto, feeds), run_ort(pruned, feeds))


def test_residual_add_prunes_both_producers_alike(rng):
    wa, ba = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    wb, bb = rng.standard_normal((8, 8, 3, 3)), rng.standard_normal(8)
    _zero_out(wa, ba, [2, 3])
    _zero_out(wb, bb, [2, 3])
    inits = {"wa": wa, "ba": ba, "wb": wb, "bb": bb, "wc": rng.standard_normal((4, 8, 1, 1))}
    nodes = [
        oh.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["a"], ["ra"]),
        oh.make_node("Conv", ["ra", "wb", "bb"], ["b"], pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["b", "ra"], ["s"]),
        oh.make_node("Relu", ["s"], ["rs"]),
        oh.make_node("Conv", ["rs", "wc"], ["c"]),
        oh.make_node("GlobalAveragePool", ["c"], ["y"]),
    ]
    proto = _build(nodes, inits, [("x", ["N", 3, 6, 6])], [("y", ["N", 4, 1, 1])])
    pruned, instance, modified = _prune(proto, ratio=0.25, criterion="l1")
    assert modified
    (group,) = instance.details["groups"].values()
    assert sorted(group["producers"]) == ["wa", "wb"] and group["channels_after"] == 6
    shapes = _shapes(pruned)
    assert shapes["wa"] == (6, 3, 3, 3) and shapes["wb"] == (6, 6, 3, 3) and shapes["wc"] == (4, 6, 1, 1)
    assert "graph output" in instance.details["left_alone"]["wc"]
    _assert_same_outputs(proto, pruned, rng)


def test_residual_with_an_input_that_is_not_a_group_is_left_alone(rng):
    inits = {"w": rng.standard_normal((8, 8, 3, 3)), "w2": rng.standard_normal((4, 8, 1, 1))}
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["x", "c"], ["s"]),
        oh.make_node("Conv", ["s", "w2"], ["y"]),
    ]
    proto = _build(nodes, inits, [("x", ["N", 8, 5, 5])], [("y", ["N", 4, 5, 5])])
    pruned, instance, modified = _prune(proto, ratio=0.5)
    assert not modified
    assert "come from elsewhere ('x')" in instance.details["left_alone"]["w"]
    feeds = random_feeds(proto, rng)
    assert_bit_identical(run_ort(proto, feeds), run_ort(pruned, feeds))


def test_concat_is_left_alone(rng):
    inits = {"wa": rng.standard_normal((8, 3, 1, 1)), "wb": rng.standard_normal((8, 3, 1, 1)), "wc": rng.standard_normal((4, 16, 1, 1))}
    nodes = [
        oh.make_node("Conv", ["x", "wa"], ["a"]),
        oh.make_node("Conv", ["x", "wb"], ["b"]),
        oh.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        oh.make_node("Conv", ["cat", "wc"], ["y"]),
    ]
    proto = _build(nodes, inits, [("x", ["N", 3, 4, 4])], [("y", ["N", 4, 4, 4])])
    _, instance, modified = _prune(proto, ratio=0.5)
    assert not modified
    assert "Concat" in instance.details["left_alone"]["wa"] and "Concat" in instance.details["left_alone"]["wb"]


def test_transformer_mlp_through_bias_and_erf_gelu(rng):
    w1, b1 = rng.standard_normal((16, 32)), rng.standard_normal(32)
    _zero_out(w1, b1, [0, 9, 17, 30, 31, 5, 6, 7], axis=1)
    inits = {
        "w1": w1, "b1": b1, "w2": rng.standard_normal((32, 16)), "b2": rng.standard_normal(16),
        "sqrt2": np.array(np.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5),
    }
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"]),
        oh.make_node("Add", ["h", "b1"], ["hb"]),
        oh.make_node("Div", ["hb", "sqrt2"], ["d"]),
        oh.make_node("Erf", ["d"], ["e"]),
        oh.make_node("Add", ["e", "one"], ["e1"]),
        oh.make_node("Mul", ["hb", "e1"], ["m"]),
        oh.make_node("Mul", ["m", "half"], ["g"]),
        oh.make_node("MatMul", ["g", "w2"], ["o"]),
        oh.make_node("Add", ["o", "b2"], ["y"]),
    ]
    proto = _build(nodes, inits, [("x", ["N", 7, 16])], [("y", ["N", 7, 16])])
    pruned, _, modified = _prune(proto, ratio=0.25, criterion="l1")
    assert modified
    shapes = _shapes(pruned)
    assert shapes["w1"] == (16, 24) and shapes["b1"] == (24,) and shapes["w2"] == (24, 16) and shapes["b2"] == (16,)
    _assert_same_outputs(proto, pruned, rng)


def test_depthwise_conv_carries_the_channels(rng):
    w1, b1 = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    dw, db = rng.standard_normal((8, 1, 3, 3)), rng.standard_normal(8)
    _zero_out(w1, b1, [0, 7])
    db[[0, 7]] = 0.0
    inits = {"w1": w1, "b1": b1, "dw": dw, "db": db, "w3": rng.standard_normal((4, 8, 1, 1))}
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["a"], ["r"]),
        oh.make_node("Conv", ["r", "dw", "db"], ["d"], pads=[1, 1, 1, 1], group=8),
        oh.make_node("Clip", ["d"], ["dc"]),
        oh.make_node("Conv", ["dc", "w3"], ["y"]),
    ]
    proto = _build(nodes, inits, [("x", ["N", 3, 6, 6])], [("y", ["N", 4, 6, 6])])
    pruned, instance, modified = _prune(proto, ratio=0.25, criterion="l1")
    assert modified
    shapes = _shapes(pruned)
    assert shapes["w1"] == (6, 3, 3, 3) and shapes["dw"] == (6, 1, 3, 3) and shapes["db"] == (6,) and shapes["w3"] == (4, 6, 1, 1)
    depthwise = pruned.graph.node[2]
    assert onnx.helper.get_attribute_value(next(a for a in depthwise.attribute if a.name == "group")) == 6
    assert "grouped convolution" in instance.details["left_alone"]["dw"]
    _assert_same_outputs(proto, pruned, rng)


def test_no_prunable_layer_is_left_alone_with_a_message(rng, caplog):
    proto = _build(
        [oh.make_node("Gemm", ["x", "w"], ["y"])], {"w": rng.standard_normal((4, 6))},
        [("x", ["N", 4])], [("y", ["N", 6])],
    )
    with caplog.at_level("INFO", logger="onnxpress.passes.prune_channels"):
        pruned, instance, modified = _prune(proto)
    assert not modified
    assert "no prunable channel group" in caplog.text
    assert "graph output" in instance.details["left_alone"]["w"]
    feeds = random_feeds(proto, rng)
    assert_bit_identical(run_ort(proto, feeds), run_ort(pruned, feeds))


def _random_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    inits = {
        "w1": rng.standard_normal((16, 3, 3, 3)) * 0.5, "b1": rng.standard_normal(16) * 0.1,
        "w2": rng.standard_normal((16, 16, 3, 3)) * 0.2, "b2": rng.standard_normal(16) * 0.1,
        "fc": rng.standard_normal((16 * 36, 10)) * 0.1,
    }
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c1"], ["r1"]),
        oh.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c2"], ["r2"]),
        oh.make_node("Flatten", ["r2"], ["f"]),
        oh.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    return _build(nodes, inits, [("x", ["N", 3, 6, 6])], [("y", ["N", 10])])


def test_compensation_needs_calibration_and_reduces_the_error(rng):
    proto = _random_cnn(rng)
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        PruneChannels(PruneChannels.Config(compensation="bias"))(ir.from_proto(proto))
    calibration = [{"x": rng.standard_normal((64, 3, 6, 6)).astype(np.float32) + 0.5} for _ in range(8)]
    feeds = {"x": rng.standard_normal((512, 3, 6, 6)).astype(np.float32) + 0.5}
    reference = run_ort(proto, feeds)[0]
    errors = {}
    for compensation in ("none", "bias", "weights"):
        pruned, instance, _ = _prune(proto, calibration, ratio=0.5, criterion="activation", compensation=compensation)
        assert _shapes(pruned)["w2"] == (8, 8, 3, 3) and _shapes(pruned)["fc"] == (8 * 36, 10)
        errors[compensation] = float(np.linalg.norm(run_ort(pruned, feeds)[0] - reference))
        if compensation == "weights":
            assert instance.details["compensation"] == {"w1": "refit", "w2": "refit", "fc": "refit"}
    assert errors["weights"] < errors["none"] and errors["bias"] < errors["none"]


def test_recipe_step_and_option_errors(rng):
    proto = _cnn(rng, "flatten")
    model = ir.from_proto(proto)
    recipe = parse_recipe({"steps": [{"pass": "prune-channels", "with": {"ratio": 0.375, "criterion": "l1", "ops": ["Conv"]}}]})
    (record,) = Pipeline.from_recipe(recipe).run(model)
    assert record.details["channels_removed"] == 6 and record.after.constant_bytes < record.before.constant_bytes
    for bad, match in [
        ({"ratio": 1.0}, "ratio must be in"),
        ({"compensation": "magic"}, "expected one of"),
        ({"per_layer": ["w1=2"]}, "fraction must be in"),
        ({"round_to": 0}, "round_to must be >= 1"),
    ]:
        with pytest.raises(RecipeError, match=match):
            Pipeline.from_recipe(parse_recipe({"steps": [{"pass": "prune-channels", "with": bad}]}))


def test_round_to_keeps_a_multiple_of_the_width(rng):
    proto = _cnn(rng, "flatten")
    pruned, instance, _ = _prune(proto, ratio=0.375, criterion="l1", ops=("Conv",), round_to=4)
    shapes = _shapes(pruned)
    assert shapes["w1"][0] == 4 and shapes["w2"][:2] == (4, 4) and shapes["fc_w"] == (10, 4 * 16)
    assert all(g["channels_after"] % 4 == 0 for g in instance.details["groups"].values())
    feeds = random_feeds(proto, rng)
    assert run_ort(pruned, feeds)[0].shape == run_ort(proto, feeds)[0].shape


@pytest.mark.parametrize("keepdims", [1, 0])
def test_global_pooling_as_reduce_mean_then_gemm(rng, keepdims):
    w1, b1 = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    _zero_out(w1, b1, [3, 6])
    inits = {"w1": w1, "b1": b1, "axes": np.array([2, 3], dtype=np.int64), "fc": rng.standard_normal((5, 8))}
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=keepdims),
    ]
    if keepdims:
        inits["shape"] = np.array([-1, 8], dtype=np.int64)
        nodes.append(oh.make_node("Reshape", ["m", "shape"], ["flat"]))
    else:
        nodes.append(oh.make_node("Identity", ["m"], ["flat"]))
    nodes.append(oh.make_node("Gemm", ["flat", "fc"], ["y"], transB=1))
    proto = _build(nodes, inits, [("x", ["N", 3, 5, 5])], [("y", ["N", 5])])
    pruned, _, modified = _prune(proto, ratio=0.25, criterion="l1")
    assert modified
    assert _shapes(pruned)["w1"] == (6, 3, 3, 3) and _shapes(pruned)["fc"] == (5, 6)
    if keepdims:
        assert next(nh.to_array(i) for i in pruned.graph.initializer if i.name == "shape").tolist() == [-1, 6]
    _assert_same_outputs(proto, pruned, rng)
