"""prune-magnitude: exact sparsity, what is never touched, N:M, Wanda scores, bias correction, recipes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
import yaml
from conftest import assert_bit_identical, parse, random_feeds, run_ort
from onnxpress.passes.registry import get_pass

from onnxpress.cli import main
from onnxpress.errors import RecipeError
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import parse_recipe

PruneMagnitude = get_pass("prune-magnitude")


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv(8->16, 3x3) + ReLU + Flatten + Gemm(1024->32) + ReLU + MatMul(32->48) + Add bias."""
    inits = {
        "conv_w": rng.standard_normal((16, 8, 3, 3)),
        "conv_b": rng.standard_normal(16),
        "fc_w": rng.standard_normal((32, 16 * 8 * 8)) * 0.05,
        "fc_b": rng.standard_normal(32),
        "mm_w": rng.standard_normal((32, 48)),
        "mm_b": rng.standard_normal(48),
        "tiny_w": rng.standard_normal((48, 4)),
    }
    nodes = [
        oh.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node("Flatten", ["r"], ["f"]),
        oh.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], transB=1),
        oh.make_node("Relu", ["g"], ["h"]),
        oh.make_node("MatMul", ["h", "mm_w"], ["m"]),
        oh.make_node("Add", ["m", "mm_b"], ["a"]),
        oh.make_node("MatMul", ["a", "tiny_w"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes, "net",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8, 8, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [nh.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _sparsity(array: np.ndarray) -> float:
    return float(np.mean(array == 0))


def _run_pass(proto: onnx.ModelProto, calibration=None, **options) -> tuple[ir.Model, PruneMagnitude]:
    model = ir.from_proto(proto)
    instance = PruneMagnitude(PruneMagnitude.Config(**options), calibration=calibration)
    instance(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    return model, instance


@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_reaches_the_exact_sparsity_and_leaves_biases_and_small_tensors(rng, scope):
    proto = _model(rng)
    before = _weights(ir.from_proto(proto))
    model, instance = _run_pass(proto, sparsity=0.75, scope=scope, min_elements=1000)
    after = _weights(model)
    prunable = ["conv_w", "fc_w", "mm_w"]
    zeros = sum(int(np.sum(after[n] == 0)) for n in prunable)
    total = sum(after[n].size for n in prunable)
    assert zeros == round(0.75 * total) or (scope == "per-layer" and abs(zeros - 0.75 * total) <= len(prunable))
    if scope == "per-layer":
        for name in prunable:
            assert after[name].size * 0.75 - 1 <= np.sum(after[name] == 0) <= after[name].size * 0.75 + 1
    for name in ("conv_b", "fc_b", "mm_b", "tiny_w"):  # biases and the 192-element tensor stay
        assert after[name].tobytes() == before[name].tobytes()
    for name in prunable:  # what is left is the original weights, the largest ones
        kept = after[name] != 0
        assert np.array_equal(after[name][kept], before[name][kept])
        assert np.abs(before[name][~kept]).max() <= np.abs(before[name][kept]).min() or scope == "global"
    reported = instance.details["tensors"]
    assert set(reported) == set(prunable)
    for name in prunable:
        assert reported[name]["sparsity"] == pytest.approx(_sparsity(after[name]), abs=1e-6)
    assert instance.details["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert instance.details["skipped"]["tiny_w"].startswith("192 elements")
    feeds = random_feeds(proto, rng)
    assert run_ort(model, feeds)[0].shape == run_ort(proto, feeds)[0].shape


def test_global_scope_ranks_across_tensors(rng):
    proto = _model(rng)
    before = _weights(ir.from_proto(proto))
    model, _ = _run_pass(proto, sparsity=0.5, scope="global", min_elements=1000)
    after = _weights(model)
    names = ["conv_w", "fc_w", "mm_w"]
    largest_pruned = max(np.abs(before[n][after[n] == 0]).max() for n in names)
    smallest_kept = min(np.abs(before[n][after[n] != 0]).min() for n in names)
    assert largest_pruned <= smallest_kept
    # fc_w was drawn 20x smaller: the global threshold takes its zeros from it, not the others
    assert _sparsity(after["fc_w"]) > 0.5
    assert _sparsity(after["conv_w"]) < 0.05 and _sparsity(after["mm_w"]) < 0.05


def test_zero_sparsity_is_bit_identical(rng):
    proto = _model(rng)
    feeds = random_feeds(proto, rng)
    model, instance = _run_pass(proto, sparsity=0.0)
    assert_bit_identical(run_ort(proto, feeds), run_ort(model, feeds))
    original = _weights(ir.from_proto(proto))
    assert {k: v.tobytes() for k, v in _weights(model).items()} == {k: v.tobytes() for k, v in original.items()}
    assert instance.details["pruned_tensors"] == 0


def test_per_layer_pins_a_tensor_and_the_others_share_the_rest(rng):
    proto = _model(rng)
    model, instance = _run_pass(proto, sparsity=0.6, scope="per-layer", per_layer=("conv*=0.1",), min_elements=1000)
    after = _weights(model)
    assert _sparsity(after["conv_w"]) == pytest.approx(0.1, abs=1 / after["conv_w"].size)
    total = sum(after[n].size for n in ("conv_w", "fc_w", "mm_w"))
    assert instance.details["sparsity"] == pytest.approx(0.6, abs=3 / total)
    assert _sparsity(after["fc_w"]) > 0.6


def test_two_of_four_pattern(rng):
    proto = _model(rng)
    model, instance = _run_pass(proto, pattern="2:4", min_elements=1000)
    after = _weights(model)
    groups = {
        "conv_w": np.moveaxis(after["conv_w"], 1, -1).reshape(-1, 4),  # along input channels
        "fc_w": after["fc_w"].reshape(-1, 4),  # [out, in] with transB
        "mm_w": after["mm_w"].T.reshape(-1, 4),  # [in, out]
    }
    for name, grouped in groups.items():
        assert (np.count_nonzero(grouped, axis=1) <= 2).all(), name
        assert instance.details["tensors"][name]["sparsity"] == pytest.approx(0.5)


def test_row_granularity_gives_every_output_channel_the_same_sparsity(rng):
    proto = _model(rng)
    model, _ = _run_pass(proto, sparsity=0.5, scope="per-layer", granularity="row", min_elements=1000)
    after = _weights(model)
    assert set(np.sum(after["mm_w"] == 0, axis=0)) == {16}  # 32 inputs per output column
    assert set(np.sum(after["conv_w"].reshape(16, -1) == 0, axis=1)) == {36}


def test_model_without_prunable_weights_is_left_alone_with_a_message(rng, caplog):
    proto = parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 4] x, float[4, 3] w) => (float[N, 3] y) {
            h = Relu(x)
            y = MatMul(h, w)
        }
        """
    )
    model = ir.from_proto(proto)
    with caplog.at_level("INFO", logger="onnxpress.passes.prune_magnitude"):
        result = PruneMagnitude(PruneMagnitude.Config(sparsity=0.9))(model)
    assert not result.modified
    assert "no prunable weight" in caplog.text
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "w": rng.standard_normal((4, 3)).astype(np.float32)}
    assert_bit_identical(run_ort(proto, feeds), run_ort(model, feeds))


def test_activation_score_needs_calibration_and_keeps_weights_that_read_loud_channels(rng):
    w = rng.uniform(0.5, 1.0, (64, 32)).astype(np.float32) * rng.choice([-1, 1], (64, 32)).astype(np.float32)
    w[:8] *= 0.01  # small weights on the first 8 input channels ...
    proto = oh.make_model(
        oh.make_graph(
            [oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
            [nh.from_array(w, "w")],
        ),
        opset_imports=[oh.make_opsetid("", 18)],
    )
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        PruneMagnitude(PruneMagnitude.Config(score="activation"))(ir.from_proto(proto))
    calibration = []
    for _ in range(2):
        x = rng.standard_normal((16, 64)).astype(np.float32)
        x[:, :8] *= 1000.0  # ... that read loud channels
        calibration.append({"x": x})
    by_magnitude, _ = _run_pass(proto, sparsity=0.25, scope="per-layer", min_elements=0)
    by_activation, instance = _run_pass(
        proto, calibration, sparsity=0.25, score="activation", scope="per-layer", min_elements=0
    )
    assert instance.details["tensors"]["w"]["score"] == "activation"
    assert (_weights(by_magnitude)["w"][:8] == 0).all()
    assert (_weights(by_activation)["w"][:8] != 0).all()
    assert _sparsity(_weights(by_activation)["w"]) == 0.25
    feeds = {"x": calibration[0]["x"]}
    reference = run_ort(proto, feeds)[0]
    error = {k: np.linalg.norm(run_ort(m, feeds)[0] - reference) for k, m in [("mag", by_magnitude), ("act", by_activation)]}
    assert error["act"] < error["mag"]


def test_bias_correction_brings_output_means_back(rng):
    proto = _model(rng)
    # 512 calibration rows and 512 fresh ones: with 64 and 64 the means are noisy enough that
    # the correction lost in 6 draws of 200 (0 of 600 now)
    calibration = [random_feeds(proto, rng, {"N": 64}) for _ in range(8)]
    plain, _ = _run_pass(proto, sparsity=0.8, min_elements=1000)
    corrected, instance = _run_pass(proto, calibration, sparsity=0.8, min_elements=1000, bias_correction=True)
    assert instance.details["bias_correction"]["conv_w"] == "corrected"
    feeds = random_feeds(proto, rng, {"N": 512})
    reference = run_ort(proto, feeds)[0]
    shift_plain = np.abs(run_ort(plain, feeds)[0].mean(0) - reference.mean(0)).mean()
    shift_corrected = np.abs(run_ort(corrected, feeds)[0].mean(0) - reference.mean(0)).mean()
    assert shift_corrected < shift_plain
    for name in ("conv_w", "fc_w", "mm_w"):  # only biases move: the zeros stay where they were
        assert _weights(corrected)[name].tobytes() == _weights(plain)[name].tobytes()


def test_weights_inside_subgraphs_are_pruned(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    branch = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y1"])], "then", [],
        [oh.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, [2, 32])], [nh.from_array(w, "w")],
    )
    other = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["y2"])], "else", [], [oh.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [2, 64])]
    )
    graph = oh.make_graph(
        [oh.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)], "g",
        [oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []), oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, "D"])],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    model, instance = _run_pass(proto, sparsity=0.5)
    assert instance.details["tensors"]["w"]["sparsity"] == 0.5
    feeds = {"cond": np.array(True), "x": rng.standard_normal((2, 64)).astype(np.float32)}
    then = next(a.g for a in ir.to_proto(model).graph.node[0].attribute if a.name == "then_branch")
    pruned = then.initializer[0]
    assert np.mean(nh.to_array(pruned) == 0) == 0.5
    np.testing.assert_allclose(run_ort(model, feeds)[0], feeds["x"] @ nh.to_array(pruned), rtol=1e-5, atol=1e-5)


def test_recipe_step_and_option_errors(rng):
    proto = _model(rng)
    recipe = parse_recipe({"steps": [{"pass": "prune-magnitude", "with": {"sparsity": 0.8}}]})
    model = ir.from_proto(proto)
    records = Pipeline.from_recipe(recipe).run(model)
    assert records[0].details["sparsity"] == pytest.approx(0.8, abs=1e-3)
    for bad, match in [
        ({"sparsity": 1.5}, "sparsity must be in"),
        ({"pattern": "4:2"}, "pattern must read N:M"),
        ({"pattern": "2:4", "sparsity": 0.8}, "conflicts with pattern"),
        ({"per_layer": ["conv_w"]}, "PATTERN=FRACTION"),
        ({"ops": ["Relu"]}, "cannot be pruned"),
        ({"sparsity": "high"}, "expected"),
    ]:
        with pytest.raises(RecipeError, match=match):
            Pipeline.from_recipe(parse_recipe({"steps": [{"pass": "prune-magnitude", "with": bad}]}))
    with pytest.raises(RecipeError, match=r"steps\[1\] \(prune-magnitude\) needs calibration data"):
        Pipeline.from_recipe(
            parse_recipe({"steps": [{"pass": "prune-magnitude", "with": {"bias_correction": True}}]})
        ).run(ir.from_proto(proto))


def test_cli_compress_with_a_recipe(rng, tmp_path):
    proto = _model(rng)
    source = tmp_path / "model.onnx"
    onnx.save(proto, source)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"pass": "prune-magnitude", "with": {"sparsity": 0.8}}]}))
    out = tmp_path / "pruned.onnx"
    assert main(["compress", str(source), "-o", str(out), "--recipe", str(recipe), "--no-progress"]) == 0
    pruned = onnx.load(out)
    weights = {i.name: nh.to_array(i) for i in pruned.graph.initializer}
    prunable = [weights[n] for n in ("conv_w", "fc_w", "mm_w")]
    assert sum(int(np.sum(w == 0)) for w in prunable) / sum(w.size for w in prunable) == pytest.approx(0.8, abs=1e-3)
    feeds = random_feeds(proto, rng)
    assert run_ort(pruned, feeds)[0].shape == run_ort(proto, feeds)[0].shape


@pytest.mark.parametrize("extra", [{"granularity": "row", "scope": "per-layer"}, {"pattern": "2:4"}, {}])
def test_sparsegpt_compensates_the_pruned_weights(rng, extra):
    w = rng.standard_normal((64, 48)).astype(np.float32)
    proto = oh.make_model(
        oh.make_graph(
            [oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 48])],
            [nh.from_array(w, "w")],
        ),
        opset_imports=[oh.make_opsetid("", 18)],
    )
    # Correlated inputs of very different scales: what the inverse Hessian sees and |W| does not.
    mixing = (np.eye(64) + 0.3 * rng.standard_normal((64, 64))) * np.exp(rng.uniform(-2, 2, 64))[None, :]
    calibration = [{"x": (rng.standard_normal((128, 64)) @ mixing).astype(np.float32)} for _ in range(4)]
    sparsity = None if "pattern" in extra else 0.5
    plain, _ = _run_pass(proto, sparsity=sparsity, min_elements=0, **extra)
    obs, instance = _run_pass(proto, calibration, sparsity=sparsity, min_elements=0, score="sparsegpt", **extra)
    pruned = _weights(obs)["w"]
    assert instance.details["tensors"]["w"]["score"] == "sparsegpt"
    assert _sparsity(pruned) == pytest.approx(0.5, abs=0.01)
    if "pattern" in extra:
        assert (np.count_nonzero(pruned.T.reshape(-1, 4), axis=1) <= 2).all()
    if extra.get("granularity") == "row":
        assert set(np.sum(pruned == 0, axis=0)) == {32}
    kept = pruned != 0
    assert not np.array_equal(pruned[kept], w[kept])  # the kept weights moved to compensate
    feeds = {"x": (rng.standard_normal((256, 64)) @ mixing).astype(np.float32)}
    reference = run_ort(proto, feeds)[0]
    error_plain = np.linalg.norm(run_ort(plain, feeds)[0] - reference)
    error_obs = np.linalg.norm(run_ort(obs, feeds)[0] - reference)
    assert error_obs < 0.7 * error_plain


def test_sequential_sparsegpt_fits_the_original_outputs_from_pruned_inputs(rng):
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 16)).astype(np.float32)
    proto = oh.make_model(
        oh.make_graph(
            [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("MatMul", ["r", "w2"], ["y"])],
            "g",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
            [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")],
        ),
        opset_imports=[oh.make_opsetid("", 18)],
    )
    mixing = (np.eye(32) + 0.3 * rng.standard_normal((32, 32))) * np.exp(rng.uniform(-1, 1, 32))[None, :]
    calibration = [{"x": (rng.standard_normal((256, 32)) @ mixing).astype(np.float32)} for _ in range(4)]
    feeds = {"x": (rng.standard_normal((1024, 32)) @ mixing).astype(np.float32)}
    reference = run_ort(proto, feeds)[0]
    errors = {}
    for sequential in (False, True):
        model, instance = _run_pass(
            proto, calibration, sparsity=0.6, scope="per-layer", min_elements=0, score="sparsegpt", sequential=sequential
        )
        assert instance.details["sparsity"] == pytest.approx(0.6, abs=0.01)
        errors[sequential] = np.linalg.norm(run_ort(model, feeds)[0] - reference)
    assert errors[True] < errors[False]


def test_refit_bias_fits_biases_with_the_kept_weights(rng):
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    b1 = rng.standard_normal(64).astype(np.float32)
    w2 = rng.standard_normal((64, 16)).astype(np.float32)
    proto = oh.make_model(
        oh.make_graph(
            [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Add", ["h", "b1"], ["hb"]),
             oh.make_node("Relu", ["hb"], ["r"]), oh.make_node("MatMul", ["r", "w2"], ["y"])],
            "g",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
            [nh.from_array(w1, "w1"), nh.from_array(b1, "b1"), nh.from_array(w2, "w2")],
        ),
        opset_imports=[oh.make_opsetid("", 18)],
    )
    # Inputs with a large common offset: the part of the error a bias can take.
    offset = rng.uniform(4, 8, 32)
    calibration = [{"x": (rng.standard_normal((256, 32)) + offset).astype(np.float32)} for _ in range(4)]
    feeds = {"x": np.concatenate([batch["x"] for batch in calibration])}  # the fit is judged where it was made
    reference = run_ort(proto, feeds)[0]
    errors = {}
    options = {"sparsity": 0.75, "scope": "per-layer", "granularity": "row", "min_elements": 0, "score": "sparsegpt", "sequential": True}
    for refit in (False, True):
        model, instance = _run_pass(proto, calibration, refit_bias=refit, **options)
        weights = _weights(model)
        assert _sparsity(weights["w1"]) == pytest.approx(0.75, abs=0.01) and _sparsity(weights["w2"]) == pytest.approx(0.75, abs=0.01)
        if refit:
            assert instance.details["refit_biases"] == 2
            assert not np.allclose(weights["b1"], b1, atol=1e-3)  # the existing bias was refit
            assert sum(node.op_type == "Add" for node in model.graph) == 2  # w2 got a bias Add
        error = run_ort(ir.to_proto(model), feeds)[0] - reference
        errors[refit] = (np.linalg.norm(error), np.linalg.norm(error.mean(axis=0)))
    # The refit bias is the least-squares intercept of the last layer's fit, so the error it leaves
    # on the calibration rows has (almost) no mean: 0.3-2.7 % of the per-row RMS error over 180 seeds
    # (damping keeps it from 0). Without the refit the mean is whatever the mask left, 0.6-60 %;
    # comparing the two per draw failed 1 draw in 6, so the bound is on the refit alone.
    rms = errors[True][0] / np.sqrt(len(feeds["x"]))
    assert errors[True][1] < 0.05 * rms
    # The total error is that of a different greedy mask: lower in most draws, never much higher.
    assert errors[True][0] < 1.25 * errors[False][0]
    with pytest.raises(ValueError, match="refit_bias"):
        PruneMagnitude.Config(score="activation", refit_bias=True)


def test_sparsegpt_solves_only_the_layers_that_lose_weights(rng, monkeypatch):
    """Pinning every other layer at 0 (what sensitivity analysis does) costs no Hessian for them."""
    import onnxpress.passes.prune_magnitude as module

    proto = _model(rng)
    calibration = [{"x": rng.standard_normal((16, 8, 8, 8)).astype(np.float32)} for _ in range(2)]
    asked: list[list[str]] = []
    real = module.input_grams

    def recording(model, layers, batches):
        asked.append([layer.name for layer in layers])
        return real(model, layers, batches)

    monkeypatch.setattr(module, "input_grams", recording)
    original = _weights(ir.from_proto(proto))
    model, instance = _run_pass(proto, calibration, scope="per-layer", per_layer=("*=0", "mm_w=0.5"),
                                score="sparsegpt", refit_kept=True, min_elements=0)
    assert asked == [["mm_w"]]
    weights = _weights(model)
    assert _sparsity(weights["mm_w"]) == pytest.approx(0.5, abs=0.02)
    assert instance.details["tensors"]["mm_w"]["score"] == "sparsegpt"
    for name in ("conv_w", "fc_w", "tiny_w"):
        assert np.array_equal(weights[name], original[name])
