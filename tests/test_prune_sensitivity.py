"""Sensitivity analysis: the per-layer table through the validator, the --max-drop choice, the recipe."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
import yaml

from onnxpress.cli import main
from onnxpress.errors import InputError
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import parse_recipe
from onnxpress.sensitivity import (
    LayerSensitivity,
    SensitivityReport,
    allocate,
    analyze,
    choose_ratios,
    glob_escape,
)


def _mlp(rng: np.random.Generator, path) -> None:
    inits = [
        nh.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
        nh.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2"),
    ]
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
         oh.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]), path)


def _data(rng: np.random.Generator, path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    x = rng.standard_normal((200, 16)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {"x": x, "label": session.run(None, {"x": x})[0].argmax(axis=1)}


def test_analyze_measures_every_layer_at_every_level_and_the_choice_holds(rng, tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp(rng, path)
    data = _data(rng, path)
    report = analyze(path, data, levels=(0.5, 0.95), options={"min_elements": 0}, max_drop=10.0, batch_size=50)
    assert report.metric == "accuracy" and report.reference_accuracy == 100.0
    assert [layer.name for layer in report.layers] == ["w1", "w2"]
    for layer in report.layers:
        assert set(layer.drops) == {0.5, 0.95}
        assert all(-100.0 <= d <= 100.0 for d in layer.drops.values())
    assert report.combined_drop is not None and report.combined_drop <= 10.0
    for name, level in report.chosen.items():
        layer = next(lay for lay in report.layers if lay.name == name)
        assert all(layer.drops[lv] <= 10.0 for lv in report.levels if lv <= level)
    # The recipe prunes exactly the chosen levels and leaves the others dense.
    model = ir.from_proto(onnx.load(path))
    (record,) = Pipeline.from_recipe(parse_recipe(report.recipe())).run(model)
    for name in ("w1", "w2"):
        assert record.details["tensors"][name]["sparsity"] == pytest.approx(report.chosen.get(name, 0.0), abs=0.01)


def test_without_labels_the_drop_is_one_minus_cosine(rng, tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp(rng, path)
    data = {"x": _data(rng, path)["x"]}
    report = analyze(path, data, levels=(0.5,), options={"min_elements": 0})
    assert report.metric == "cosine"
    assert all(0.0 <= layer.drops[0.5] <= 2.0 for layer in report.layers)
    assert not report.chosen


def test_choose_ratios_takes_the_highest_level_whose_lower_levels_all_hold():
    report = SensitivityReport(
        method="prune-magnitude", metric="accuracy", levels=(0.25, 0.5, 0.75),
        layers=[
            LayerSensitivity("a", "Conv", 10, {0.25: 0.1, 0.5: 0.4, 0.75: 3.0}),
            LayerSensitivity("b", "Gemm", 10, {0.25: 2.0, 0.5: 0.0, 0.75: 0.0}),  # not monotonic: stop at the first miss
            LayerSensitivity("c[0]", "Gemm", 10, {0.25: 0.0, 0.5: 0.0, 0.75: 0.5}),
        ],
    )
    assert choose_ratios(report, 0.5) == {"a": 0.5, "c[0]": 0.75}
    assert report.per_layer() == ["*=0", "a=0.5", "c[[]0[]]=0.75"]
    with pytest.raises(InputError):
        choose_ratios(report, -1.0)


def _budget_report(rng: np.random.Generator, layers: int, levels: tuple[float, ...]) -> SensitivityReport:
    """Random sizes and drops that grow with the level, each layer at its own rate."""
    table = []
    for i in range(layers):
        rate, power = rng.uniform(0.01, 5.0), rng.uniform(1.0, 3.0)
        table.append(LayerSensitivity(f"w{i}", "MatMul", int(rng.integers(10, 1000)),
                                      {level: rate * level**power for level in levels}))
    return SensitivityReport(method="prune-magnitude", metric="cosine", levels=levels, layers=table)


def test_allocate_meets_the_budget_and_no_assignment_meets_it_cheaper_on_its_hull(rng):
    import itertools

    levels = (0.25, 0.5, 0.75)
    for _ in range(20):
        report = _budget_report(rng, 4, levels)
        target = float(rng.uniform(0.1, 0.7))
        chosen = allocate(report, target)
        assert report.reached() >= target - 1e-9
        cost = sum(layer.drops[chosen[layer.name]] for layer in report.layers if layer.name in chosen)
        # Brute force: the cheapest assignment that meets the budget. Lagrangian relaxation is
        # exact on the convex hull of the choices; off it, it may pay more, but never more than
        # the cheapest assignment that reaches at least what it reached.
        best = min(
            sum(layer.drops[v] for layer, v in zip(report.layers, combo, strict=True) if v)
            for combo in itertools.product((0.0, *levels), repeat=4)
            if sum(layer.size * v for layer, v in zip(report.layers, combo, strict=True))
            >= report.reached() * sum(layer.size for layer in report.layers) - 1e-9
        )
        assert cost <= best + 1e-9


def test_allocate_spends_the_budget_where_it_is_cheap():
    report = SensitivityReport(
        method="prune-magnitude", metric="cosine", levels=(0.25, 0.5, 0.75),
        layers=[
            LayerSensitivity("fragile", "MatMul", 100, {0.25: 0.01, 0.5: 0.04, 0.75: 0.2}),
            LayerSensitivity("robust", "MatMul", 100, {0.25: 0.001, 0.5: 0.002, 0.75: 0.005}),
        ],
    )
    assert allocate(report, 0.5) == {"fragile": 0.25, "robust": 0.75}
    assert report.reached() == pytest.approx(0.5)
    assert report.per_layer() == ["*=0", "fragile=0.25", "robust=0.75"]
    with pytest.raises(InputError, match="target"):
        allocate(report, 0.8)


def test_cli_target_writes_a_recipe_that_reaches_the_target(rng, tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    _mlp(rng, path)
    np.savez(tmp_path / "data.npz", x=_data(rng, path)["x"])
    recipe = tmp_path / "recipe.yaml"
    code = main([
        "sensitivity", str(path), "--data", str(tmp_path / "data.npz"), "--levels", "0.25,0.5,0.75",
        "--target", "0.5", "--set", "min_elements=0", "--report", str(tmp_path / "s.json"),
        "--recipe-out", str(recipe), "--no-progress",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "target 0.5" in out and "all chosen levels together" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["target"] == 0.5 and saved["reached"] >= 0.5 and saved["combined_drop"] is not None
    pruned = tmp_path / "pruned.onnx"
    assert main(["compress", str(path), "-o", str(pruned), "--recipe", str(recipe), "--no-progress"]) == 0
    weights = {i.name: nh.to_array(i) for i in onnx.load(pruned).graph.initializer}
    zeros = sum(int(np.count_nonzero(weights[n] == 0)) for n in ("w1", "w2"))
    assert zeros / (weights["w1"].size + weights["w2"].size) >= 0.5 - 0.01
    assert main(["sensitivity", str(path), "--data", str(tmp_path / "data.npz"), "--target", "0.5",
                 "--max-drop", "1", "--no-progress"]) == 2
    assert "not both" in capsys.readouterr().err


def test_glob_escape_matches_only_the_name():
    import fnmatch

    for name in ("conv[1].weight", "a*b", "q?k", "plain.weight"):
        assert fnmatch.fnmatchcase(name, glob_escape(name))
    assert not fnmatch.fnmatchcase("conv1.weight", glob_escape("conv[1].weight"))


def test_cli_writes_the_table_report_and_a_recipe_compress_can_run(rng, tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    _mlp(rng, path)
    np.savez(tmp_path / "data.npz", **_data(rng, path))
    recipe = tmp_path / "recipe.yaml"
    code = main([
        "sensitivity", str(path), "--data", str(tmp_path / "data.npz"), "--levels", "0.5,0.9",
        "--max-drop", "100", "--set", "min_elements=0", "--report", str(tmp_path / "s.json"),
        "--recipe-out", str(recipe), "--no-progress",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "w1" in out and "0.9 (pts)" in out and "per_layer:" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["chosen"] == {"w1": 0.9, "w2": 0.9}
    assert yaml.safe_load(recipe.read_text())["steps"][0]["pass"] == "prune-magnitude"
    pruned = tmp_path / "pruned.onnx"
    assert main(["compress", str(path), "-o", str(pruned), "--recipe", str(recipe), "--no-progress"]) == 0
    weights = {i.name: nh.to_array(i) for i in onnx.load(pruned).graph.initializer}
    assert np.mean(weights["w1"] == 0) == pytest.approx(0.9, abs=0.01)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["sensitivity", str(tmp_path / "missing.onnx"), "--data", str(tmp_path / "none.npz")]) == 2
    assert "no such data file" in capsys.readouterr().err
