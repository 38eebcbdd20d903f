"""The pipeline: check every step of a recipe, then run the passes and record each one.

Preflight happens before any work: an unknown pass, an unknown or mistyped option, a need the
caller cannot meet (calibration data, an opset) is reported with the recipe key at fault.
While running, each step records its wall time, node count, op histogram and constant bytes
before and after, and whether it changed the model; a failing pass is reported with its name,
the passes before it and the node it was working on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from onnxpress.errors import NodeError, PassFailedError, RecipeError
from onnxpress.options import build_config, config_to_dict
from onnxpress.passes.base import CalibrationBatch, OnnxpressPass
from onnxpress.passes.registry import get_pass
from onnxpress.recipes import Recipe, RecipeStep
from onnxpress.stats import ModelStats, model_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """A checked step: the pass class, its config and the recipe key it came from."""

    pass_cls: type[OnnxpressPass]
    config: Any
    key: str

    @property
    def name(self) -> str:
        return self.pass_cls.name


@dataclass
class StepRecord:
    """What one step did to the model."""

    index: int
    pass_name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    before: ModelStats
    after: ModelStats
    details: dict[str, Any] = field(default_factory=dict)
    round: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "round": self.round,
            "pass": self.pass_name,
            "options": self.options,
            "seconds": round(self.seconds, 6),
            "modified": self.modified,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "details": self.details,
        }


#: ``on_step(index, total, pass_name, record)``: called with ``record=None`` when a step
#: starts and with its record when it ends.
StepCallback = Callable[[int, int, str, "StepRecord | None"], None]
#: ``on_progress(pass_name, done, total, message)``: progress inside a long step.
ProgressCallback = Callable[[str, int, int, str], None]


class Pipeline:
    """An ordered, checked list of passes."""

    def __init__(self, steps: list[Step], *, rounds: int = 1) -> None:
        self.steps = steps
        self.rounds = rounds

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Pipeline:
        """Resolves pass names and builds configs.

        Raises:
            RecipeError: An unknown pass or option, or a value of the wrong type, naming the key.
        """
        where = f"{recipe.source}: " if recipe.source else ""
        steps = []
        for step in recipe.steps:
            try:
                pass_cls = get_pass(step.pass_name)
            except KeyError as exc:
                raise RecipeError(f"{where}{step.key}.pass: {exc.args[0]}") from None
            try:
                config = build_config(pass_cls.Config, step.options, f"{step.key}.with")
            except RecipeError as exc:
                raise RecipeError(f"{where}{exc}") from None
            steps.append(Step(pass_cls, config, step.key))
        return cls(steps, rounds=recipe.repeat)

    @classmethod
    def from_names(cls, *names: str) -> Pipeline:
        """A pipeline of passes with default options, for the Python API and tests."""
        return cls.from_recipe(
            Recipe([RecipeStep(n, {}, f"steps[{i}]") for i, n in enumerate(names, start=1)])
        )

    def preflight(self, model: ir.Model, *, has_calibration: bool = False) -> None:
        """Checks every step's needs against the model and the data at hand, before any work.

        Raises:
            RecipeError: A step needs calibration data that was not given, or an opset the
                model does not import; the message names the step.
        """
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        for step in self.steps:
            needs = step.pass_cls.needs_for(step.config)
            if needs.calibration and not has_calibration:
                why = f" for {needs.calibration_when}" if needs.calibration_when and not step.pass_cls.needs.calibration else ""
                raise RecipeError(
                    f"{step.key} ({step.name}) needs calibration data{why}: pass --data FILE.npz"
                )
            if needs.min_opset is not None and opset < needs.min_opset:
                raise RecipeError(
                    f"{step.key} ({step.name}) needs opset >= {needs.min_opset}; "
                    f"the model imports opset {opset}"
                )

    def run(
        self,
        model: ir.Model,
        *,
        calibration: Iterable[CalibrationBatch] | None = None,
        on_step: StepCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[StepRecord]:
        """Runs every step in order on ``model`` (in place) and returns the step records.

        With ``rounds`` above 1 the steps run again while the last round changed the model, up
        to ``rounds`` rounds; each record says its round.

        Raises:
            RecipeError: Preflight failed; nothing ran.
            PassFailedError: A pass raised; its cause is the original exception.
        """
        self.preflight(model, has_calibration=calibration is not None)
        records: list[StepRecord] = []
        stats = model_stats(model)
        for round_ in range(1, self.rounds + 1):
            model, changed = self._run_round(model, round_, calibration, on_step, on_progress, records, stats)
            stats = records[-1].after
            if not changed:
                break
            if round_ == self.rounds and self.rounds > 1:
                logger.info("the steps still changed the model in round %d of %d", round_, self.rounds)
        return records

    def _run_round(
        self,
        model: ir.Model,
        round_: int,
        calibration: Iterable[CalibrationBatch] | None,
        on_step: StepCallback | None,
        on_progress: ProgressCallback | None,
        records: list[StepRecord],
        stats: ModelStats,
    ) -> tuple[ir.Model, bool]:
        """One pass over the steps; returns the model and whether any step changed it."""
        total = len(self.steps)
        changed = False
        for index, step in enumerate(self.steps, start=1):
            if on_step is not None:
                on_step(index, total, step.name, None)
            progress = None
            if on_progress is not None:
                def progress(done: int, count: int, message: str, _name: str = step.name) -> None:
                    on_progress(_name, done, count, message)
            instance = step.pass_cls(step.config, calibration=calibration, progress=progress)
            start = time.perf_counter()
            try:
                result = instance(model)
            except Exception as exc:
                previous = [r.pass_name for r in records]
                node = getattr(exc, "node_desc", None)
                cause = exc.__cause__ if isinstance(exc, ir.passes.PassError) and exc.__cause__ else exc
                node = node or getattr(cause, "node_desc", None)
                raise PassFailedError(
                    step.name, previous, f"{type(cause).__name__}: {cause}", node
                ) from exc
            seconds = time.perf_counter() - start
            model = result.model
            after = model_stats(model)
            record = StepRecord(
                index=index,
                pass_name=step.name,
                options=config_to_dict(step.config),
                seconds=seconds,
                modified=result.modified,
                before=stats,
                after=after,
                details=dict(getattr(instance, "details", {}) or {}),
                round=round_,
            )
            records.append(record)
            changed = changed or bool(result.modified)
            logger.info(
                "step %d/%d %s: %.3fs, nodes %d -> %d, constant bytes %d -> %d",
                index, total, step.name, seconds, stats.nodes, after.nodes,
                stats.constant_bytes, after.constant_bytes,
            )
            stats = after
            if on_step is not None:
                on_step(index, total, step.name, record)
        return model, changed


__all__ = ["NodeError", "Pipeline", "Step", "StepRecord"]
