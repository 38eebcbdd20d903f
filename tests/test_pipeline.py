"""Pipeline and recipes: preflight names the bad key; steps are recorded; failures name the pass."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import pytest

from conftest import parse
from onnxpress.errors import PassFailedError, RecipeError
from onnxpress.passes.base import Needs, OnnxpressPass, option
from onnxpress.passes.registry import _REGISTRY, available_passes, register
from onnxpress.pipeline import Pipeline
from onnxpress.recipes import apply_overrides, load_preset, load_recipe, parse_recipe

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y)
<float[2] w = {1.0, 2.0}, float[2] w2 = {1.0, 2.0}>
{
  a = Identity(x)
  b = Add(a, w)
  dead = Neg(x)
  y = Mul(b, w2)
}
"""


def _recipe(steps: list) -> Pipeline:
    return Pipeline.from_recipe(parse_recipe({"steps": steps}, source="r.yaml"))


def test_unknown_pass_is_named_with_its_key() -> None:
    with pytest.raises(RecipeError, match=r"steps\[2\]\.pass: unknown pass 'fold-everything'.*known passes"):
        _recipe([{"pass": "prune-dead"}, {"pass": "fold-everything"}])


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(RecipeError, match=r"steps\[1\]\.with\.budget: unknown option.*size_budget_bytes"):
        _recipe([{"pass": "fold-constants", "with": {"budget": 10}}])


@pytest.mark.parametrize("value", ["10", 1.5, True, None, [1]])
def test_mistyped_option_is_refused(value: object) -> None:
    with pytest.raises(RecipeError, match=r"steps\[1\]\.with\.size_budget_bytes: expected int"):
        _recipe([{"pass": "fold-constants", "with": {"size_budget_bytes": value}}])


def test_config_validation_errors_name_the_step() -> None:
    with pytest.raises(RecipeError, match=r"steps\[1\].*size_budget_bytes must be >= 0"):
        _recipe([{"pass": "fold-constants", "with": {"size_budget_bytes": -1}}])


def test_overrides_by_step_number_and_pass_name() -> None:
    recipe = load_preset("lossless")
    apply_overrides(recipe, ["2.size_budget_bytes=1000", "fold-constants.fold_shapes=false"])
    pipeline = Pipeline.from_recipe(recipe)
    assert pipeline.steps[1].config.size_budget_bytes == 1000
    assert pipeline.steps[1].config.fold_shapes is False
    with pytest.raises(RecipeError, match="there is no step 99"):
        apply_overrides(load_preset("lossless"), ["99.x=1"])
    with pytest.raises(RecipeError, match="no step runs pass 'nope'"):
        apply_overrides(load_preset("lossless"), ["nope.x=1"])
    with pytest.raises(RecipeError, match="expected STEP.OPTION=VALUE"):
        apply_overrides(load_preset("lossless"), ["size_budget_bytes"])


def test_recipe_files_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("steps:\n  - pass: prune-dead\n  - {pass: fold-constants, with: {size_budget_bytes: 5}}\n")
    (tmp_path / "r.json").write_text(json.dumps({"steps": ["prune-dead", {"pass": "cse"}]}))
    (tmp_path / "bad.yaml").write_text("steps: [ {pass: \n")
    assert [s.name for s in Pipeline.from_recipe(load_recipe(tmp_path / "r.yaml")).steps] == ["prune-dead", "fold-constants"]
    assert [s.name for s in Pipeline.from_recipe(load_recipe(tmp_path / "r.json")).steps] == ["prune-dead", "cse"]
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="unknown preset 'nope'; presets: .*lossless"):
        load_preset("nope")


def test_records_describe_each_step() -> None:
    model = ir.from_proto(parse(MODEL))
    records = Pipeline.from_recipe(load_preset("lossless")).run(model)
    names = [s.pass_name for s in load_preset("lossless").steps]
    # round 1 changed the model, so the preset ran a second round, which changed nothing and ended
    assert [r.pass_name for r in records] == names * 2
    assert [r.round for r in records] == [1] * len(names) + [2] * len(names)
    assert any(r.modified for r in records[: len(names)]) and not any(r.modified for r in records[len(names):])
    first = records[0]
    assert first.before.nodes == 4 and first.after.nodes == 3
    assert first.before.op_histogram["Neg"] == 1 and "Neg" not in first.after.op_histogram
    assert records[-1].after.constant_bytes == 8  # w and w2 deduplicated
    assert all(r.seconds >= 0 for r in records)
    assert json.loads(json.dumps([r.to_dict() for r in records]))[0]["pass"] == "prune-dead"


@dataclass(frozen=True)
class _NeedyConfig:
    level: int = option(1, "a level")


def test_missing_needs_are_refused_before_any_work() -> None:
    @register
    class NeedsData(OnnxpressPass):
        """Needs calibration data and opset 21."""

        name = "test-needs-data"
        Config = _NeedyConfig
        needs = Needs(calibration=True, min_opset=21)

        def call(self, model: ir.Model) -> ir.passes.PassResult:
            raise AssertionError("must not run")

    try:
        model = ir.from_proto(parse(MODEL))
        pipeline = _recipe([{"pass": "prune-dead"}, {"pass": "test-needs-data"}])
        with pytest.raises(RecipeError, match=r"steps\[2\] \(test-needs-data\) needs calibration data"):
            pipeline.run(model)
        assert len(list(model.graph)) == 4  # prune-dead did not run either
        with pytest.raises(RecipeError, match="needs opset >= 21; the model imports opset 17"):
            pipeline.run(model, calibration=[{"x": None}])
        assert "test-needs-data" in available_passes()
    finally:
        _REGISTRY.pop("test-needs-data", None)


def test_failing_pass_names_itself_the_passes_before_and_the_node() -> None:
    from onnxpress.errors import NodeError
    from onnxpress.graphs import describe_node

    @register
    class Broken(OnnxpressPass):
        """Fails on the first Add."""

        name = "test-broken"

        def call(self, model: ir.Model) -> ir.passes.PassResult:
            for node in model.graph:
                if node.op_type == "Add":
                    raise NodeError(describe_node(node), "cannot handle this Add")
            return ir.passes.PassResult(model, False)

    try:
        pipeline = _recipe([{"pass": "prune-dead"}, {"pass": "eliminate-noop"}, {"pass": "test-broken"}])
        with pytest.raises(PassFailedError) as info:
            pipeline.run(ir.from_proto(parse(MODEL)))
        message = str(info.value)
        assert "pass 'test-broken' failed at node <unnamed> (Add)" in message
        assert "cannot handle this Add" in message
        assert "passes run before it: prune-dead, eliminate-noop" in message
        assert info.value.exit_code == 3
        assert info.value.__cause__ is not None
    finally:
        _REGISTRY.pop("test-broken", None)


def test_long_steps_report_progress() -> None:
    nodes = "\n".join(f"  v{i + 1} = Add(v{i}, w)" for i in range(300))
    proto = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] v0) => (float[2] v300)
    <float[2] w = {{1.0, 2.0}}>
    {{
    {nodes}
    }}
    """)
    seen = []
    Pipeline.from_names("fold-constants").run(ir.from_proto(proto), on_progress=lambda *a: seen.append(a))
    assert seen[0] == ("fold-constants", 256, 300, "nodes")
    assert seen[-1] == ("fold-constants", 300, 300, "nodes")


def test_needs_that_depend_on_options_are_checked_in_preflight() -> None:
    model = ir.from_proto(parse(MODEL))
    plain = _recipe([{"pass": "prune-magnitude", "with": {"sparsity": 0.5}}])
    plain.preflight(model)  # magnitude scores need no data
    needy = _recipe([{"pass": "prune-dead"}, {"pass": "prune-magnitude", "with": {"sparsity": 0.5, "score": "activation"}}])
    with pytest.raises(RecipeError, match=r"steps\[2\] \(prune-magnitude\) needs calibration data for score is activation"):
        needy.run(model)
    assert len(list(model.graph)) == 4


def test_repeat_runs_rounds_until_nothing_changes() -> None:
    # Identity elimination makes Abs foldable only after fold-constants ran: round 2 folds it.
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y, float[2] k) {
            c = Constant <value = float[2] {-1.0, 2.0}> ()
            k = Identity (c)
            a = Abs (k)
            y = Add (a, x)
        }
    """
    steps = {"steps": ["fold-constants", "eliminate-noop"]}
    once = ir.from_proto(parse(text))
    one_round = Pipeline.from_recipe(parse_recipe(steps)).run(once)
    assert [r.round for r in one_round] == [1, 1]
    assert "Abs" in {n.op_type for n in once.graph}
    model = ir.from_proto(parse(text))
    records = Pipeline.from_recipe(parse_recipe({**steps, "repeat": 5})).run(model)
    assert "Abs" not in {n.op_type for n in model.graph}
    assert records[-1].round == 3 and not any(r.modified for r in records if r.round == 3)
    assert Pipeline.from_recipe(parse_recipe({**steps, "repeat": 5})).run(model)[-1].round == 1  # a fixed point
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(RecipeError, match="repeat"):
            parse_recipe({**steps, "repeat": bad})
