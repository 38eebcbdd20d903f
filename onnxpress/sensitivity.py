"""Per-layer pruning sensitivity, measured through the validator, and ratios chosen from it.

For every layer a pruning pass can touch (each prunable tensor for ``prune-magnitude``, each
channel group for ``prune-channels``) and every level (a sparsity or a channel ratio), the
layer alone is pruned at that level and the result is compared with the original model by
:func:`onnxpress.runtime.validate` on real batches. The *drop* is

- with labels: the accuracy drop in percentage points (reference minus candidate);
- without: ``1 - mean cosine`` of the output that moved most.

:func:`choose_ratios` then gives each layer the highest level whose drop stays within
``max_drop`` (every lower level too), and, when asked to verify, prunes all layers at their
chosen levels together and backs off, one level at a time on the layer that hurt most alone,
until the combined drop is within ``max_drop`` as well (drops of separate layers add up, so
per-layer tolerances alone are optimistic). 
:func:`allocate` answers the other question, a budget rather than a tolerance: which levels
reach a given overall sparsity (or channel ratio), weighted by layer size, with the least
summed drop. Layers differ a lot (in MiniLM-L6 the last block's attention output loses 20 times
what a middle block's key projection loses at the same level), so spending the budget where it
is cheap beats one level everywhere. The choice becomes the pass's ``per_layer``
option, ready for a recipe.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpress.errors import InputError, RecipeError
from onnxpress.model_io import load_model, save_model
from onnxpress.options import build_config
from onnxpress.passes.base import CalibrationBatch
from onnxpress.passes.registry import get_pass
from onnxpress.report import format_table

logger = logging.getLogger(__name__)

#: The passes sensitivity analysis knows, with the option that carries the level.
METHODS: dict[str, str] = {"prune-magnitude": "sparsity", "prune-channels": "ratio"}
DEFAULT_LEVELS: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)

#: ``progress(done, total, message)``.
Progress = Callable[[int, int, str], None]


def glob_escape(name: str) -> str:
    """A glob that matches exactly ``name`` (``[``, ``*`` and ``?`` bracketed)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


@dataclass
class LayerSensitivity:
    """How much one layer's pruning costs at each level."""

    name: str
    op: str
    size: int
    drops: dict[float, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "op": self.op, "size": self.size,
                "drops": {str(level): drop for level, drop in self.drops.items()}}


@dataclass
class SensitivityReport:
    """The sensitivity table and, after :func:`choose_ratios`, the chosen levels."""

    method: str
    metric: str
    levels: tuple[float, ...]
    layers: list[LayerSensitivity]
    reference_accuracy: float | None = None
    max_drop: float | None = None
    target: float | None = None
    chosen: dict[str, float] = field(default_factory=dict)
    combined_drop: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def per_layer(self) -> list[str]:
        """The chosen levels as the pass's ``per_layer`` entries (``'*=0'`` first: the rest stays dense)."""
        return ["*=0"] + [f"{glob_escape(name)}={level:g}" for name, level in self.chosen.items()]

    def recipe(self) -> dict[str, Any]:
        """A one-step recipe that prunes every layer at its chosen level."""
        options = {k: v for k, v in self.options.items() if k not in ("per_layer", METHODS[self.method])}
        options["per_layer"] = self.per_layer()
        if self.method == "prune-magnitude":
            options["scope"] = "per-layer"
        else:
            options["ratio"] = 0.0
        return {"name": f"{self.method}-sensitivity", "steps": [{"pass": self.method, "with": options}]}

    def reached(self) -> float:
        """The chosen levels' mean over all layers, weighted by layer size (0 for a layer left dense)."""
        total = sum(layer.size for layer in self.layers)
        return sum(layer.size * self.chosen.get(layer.name, 0.0) for layer in self.layers) / max(1, total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "metric": self.metric,
            "levels": list(self.levels),
            "reference_accuracy": self.reference_accuracy,
            "layers": [layer.to_dict() for layer in self.layers],
            "max_drop": self.max_drop,
            "target": self.target,
            "reached": self.reached() if self.chosen else None,
            "chosen": self.chosen,
            "combined_drop": self.combined_drop,
            "recipe": self.recipe() if self.chosen else None,
        }

    def table(self) -> str:
        """The table the CLI prints: one row per layer, one column per level, the choice last."""
        unit = "pts" if self.metric == "accuracy" else "1-cos"
        header = ["layer", "op", "size"] + [f"{level:g} ({unit})" for level in self.levels]
        if self.chosen:
            header.append("chosen")
        rows = [header]
        for layer in self.layers:
            row = [layer.name, layer.op, str(layer.size)]
            row += [_fmt(layer.drops.get(level)) for level in self.levels]
            if self.chosen:
                row.append(f"{self.chosen.get(layer.name, 0.0):g}")
            rows.append(row)
        text = format_table(rows)
        if self.target is not None and self.chosen:
            text += f"\n\nchosen levels: {self.reached():.4g} of the weights by size (target {self.target:g})"
        if self.combined_drop is not None:
            limit = f" (max {self.max_drop:g})" if self.max_drop is not None else ""
            text += f"\n\nall chosen levels together: drop {_fmt(self.combined_drop)} {unit}{limit}"
        return text


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


class _Evaluator:
    """Prunes a fresh copy of the model with given options and measures the drop."""

    def __init__(
        self,
        model_path: Path,
        method: str,
        base_options: Mapping[str, Any],
        data: Mapping[str, np.ndarray],
        labels: np.ndarray | None,
        calibration: list[CalibrationBatch] | None,
        batch_size: int,
        workdir: Path,
    ) -> None:
        self.model_path = model_path
        self.pass_cls = get_pass(method)
        self.base_options = dict(base_options)
        self.data = data
        self.labels = labels
        self.calibration = calibration
        self.batch_size = batch_size
        self.workdir = workdir
        self.reference_accuracy: float | None = None
        self.count = 0

    def prune(self, options: Mapping[str, Any]) -> tuple[ir.Model, dict[str, Any]]:
        config = build_config(self.pass_cls.Config, {**self.base_options, **options}, "options")
        model = load_model(self.model_path)
        instance = self.pass_cls(config, calibration=self.calibration)
        instance(model)
        return model, dict(getattr(instance, "details", {}))

    def drop(self, options: Mapping[str, Any]) -> float:
        from onnxpress.runtime import Tolerances, validate

        model, _ = self.prune(options)
        self.count += 1
        candidate = self.workdir / f"candidate_{self.count}.onnx"
        save_model(model, candidate, force=True)
        report = validate(
            self.model_path, candidate, data=self.data, labels=self.labels, batch_size=self.batch_size,
            tolerances=Tolerances(min_cosine=None, max_accuracy_drop=None), measure_speed=False,
        )
        candidate.unlink(missing_ok=True)
        if report.accuracy_drop is not None:
            self.reference_accuracy = report.reference.accuracy
            return float(report.accuracy_drop)
        return float(max(1.0 - m.mean_cosine for m in report.outputs.values()))


def _layers(evaluator: _Evaluator, method: str) -> list[LayerSensitivity]:
    """The layers the pass would prune with its current options."""
    if method == "prune-magnitude":
        _, details = evaluator.prune({"sparsity": 0.0})
        return [LayerSensitivity(name, t["op"], t["elements"]) for name, t in details["tensors"].items()]
    _, details = evaluator.prune({"ratio": 0.5, "compensation": "none", "criterion": "l1"})
    return [LayerSensitivity(name, "group", g["channels_before"]) for name, g in details["groups"].items()]


def _only(method: str, name: str, level: float) -> dict[str, Any]:
    """Options that prune only ``name`` at ``level``."""
    per_layer = ("*=0", f"{glob_escape(name)}={level:g}")
    if method == "prune-magnitude":
        return {"per_layer": per_layer, "scope": "per-layer", "sparsity": None, "pattern": None}
    return {"per_layer": per_layer, "ratio": 0.0}


def analyze(
    model_path: str | Path,
    data: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    method: str = "prune-magnitude",
    levels: Iterable[float] = DEFAULT_LEVELS,
    options: Mapping[str, Any] | None = None,
    calibration: list[CalibrationBatch] | None = None,
    batch_size: int = 64,
    max_drop: float | None = None,
    target: float | None = None,
    verify: bool = True,
    progress: Progress | None = None,
) -> SensitivityReport:
    """Measures each layer's drop at each level; with ``max_drop`` or ``target``, chooses per-layer levels.

    Args:
        model_path: The model file.
        data: Validation inputs by input name (a ``label`` array there is used as labels).
        labels: Class labels per sample; accuracy drop (points) is the metric when given.
        method: ``prune-magnitude`` (levels are sparsities) or ``prune-channels`` (ratios).
        levels: The levels to try, each in ``(0, 1)``.
        options: Other options of the pass (e.g. ``{"score": "activation"}``).
        calibration: Calibration batches, for options that need them.
        batch_size: Validation batch size.
        max_drop: The tolerance; None measures only.
        target: Instead of ``max_drop``, the size-weighted mean level to reach (see :func:`allocate`).
        verify: With ``max_drop``, check the chosen levels together and back off; with
            ``target``, measure the chosen levels together.
        progress: Called after each evaluation.

    Raises:
        InputError: Unknown method, bad levels, or the model has nothing to prune.
        RecipeError: An option the pass does not have.
    """
    if method not in METHODS:
        raise InputError(f"sensitivity: unknown method {method!r}; choose from {', '.join(METHODS)}")
    levels = tuple(sorted({float(level) for level in levels}))
    if not levels or any(not 0.0 < level < 1.0 for level in levels):
        raise InputError(f"sensitivity: levels must be fractions in (0, 1), got {list(levels)}")
    if max_drop is not None and target is not None:
        raise InputError("sensitivity: give a tolerance (max_drop) or a target level, not both")
    if target is not None:
        _check_target(target, levels)
    options = dict(options or {})
    for key in ("per_layer", METHODS[method]):
        if key in options:
            raise RecipeError(f"sensitivity: option {key!r} is set by the analysis; leave it out")
    model_path = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="onnxpress-sensitivity-") as tmp:
        evaluator = _Evaluator(model_path, method, options, data, labels, calibration, batch_size, Path(tmp))
        layers = _layers(evaluator, method)
        if not layers:
            raise InputError(f"{model_path}: {method} finds nothing to prune in this model")
        total = len(layers) * len(levels)
        done = 0
        for layer in layers:
            for level in levels:
                layer.drops[level] = evaluator.drop(_only(method, layer.name, level))
                done += 1
                logger.info("sensitivity %s at %g: drop %.4g", layer.name, level, layer.drops[level])
                if progress is not None:
                    progress(done, total, f"{layer.name} at {level:g}")
        has_labels = labels is not None or "label" in data
        report = SensitivityReport(
            method=method, metric="accuracy" if has_labels else "cosine", levels=levels, layers=layers,
            reference_accuracy=evaluator.reference_accuracy, options=options,
        )
        if max_drop is not None:
            choose_ratios(report, max_drop, evaluator if verify else None, progress)
        if target is not None:
            allocate(report, target)
            if verify and report.chosen:
                report.combined_drop = evaluator.drop(_together(report))
                if progress is not None:
                    progress(total, total, f"all chosen levels together: drop {report.combined_drop:.4g}")
    return report


def _together(report: SensitivityReport) -> dict[str, Any]:
    """Options that prune every layer at its chosen level and leave the others dense."""
    options: dict[str, Any] = {"per_layer": tuple(report.per_layer())}
    if report.method == "prune-magnitude":
        options.update({"scope": "per-layer", "sparsity": None, "pattern": None})
    else:
        options["ratio"] = 0.0
    return options


def _check_target(target: float, levels: tuple[float, ...]) -> None:
    if not 0.0 < target <= max(levels):
        raise InputError(f"sensitivity: target {target:g} must be in (0, {max(levels):g}], the highest level tried")


def allocate(report: SensitivityReport, target: float) -> dict[str, float]:
    r"""Per-layer levels that reach ``target`` overall with the least summed drop.

    With layer sizes :math:`n_l`, levels :math:`s_l \in \{0\} \cup L` (0: left dense, no
    drop) and measured drops :math:`d_l(s)`, it solves

    .. math:: \min \sum_l d_l(s_l) \quad \text{s.t.} \quad \sum_l n_l s_l \ge t \sum_l n_l

    by Lagrangian relaxation: at a price :math:`\lambda` per pruned weight every layer takes
    :math:`\arg\min_s d_l(s) - \lambda n_l s` on its own, and :math:`\lambda` is bisected to
    the lowest price whose choice meets the budget. The levels are discrete, so the choice may
    pass the target a little; drops of separate layers add up only roughly, which is why
    :func:`analyze` measures the chosen levels together.

    Raises:
        InputError: ``target`` is not in ``(0, highest level]``.
    """
    _check_target(target, report.levels)
    total = sum(layer.size for layer in report.layers)
    options = (0.0, *report.levels)

    def choice(price: float) -> dict[str, float]:
        chosen = {}
        for layer in report.layers:
            cost = {level: (layer.drops[level] if level else 0.0) - price * layer.size * level / total for level in options}
            best = min(options, key=lambda level: (cost[level], level))
            if best:
                chosen[layer.name] = best
        return chosen

    def reached(chosen: dict[str, float]) -> float:
        return sum(layer.size * chosen.get(layer.name, 0.0) for layer in report.layers) / total

    low, high = 0.0, 1.0
    while reached(choice(high)) < target - 1e-12:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if reached(choice(middle)) < target - 1e-12:
            low = middle
        else:
            high = middle
    report.target = target
    report.chosen = choice(high)
    logger.info("sensitivity: levels reaching %.4g of the weights (target %g), summed drop %.4g",
                reached(report.chosen), target, sum(layer.drops[report.chosen[layer.name]]
                                                     for layer in report.layers if layer.name in report.chosen))
    return report.chosen


def choose_ratios(
    report: SensitivityReport,
    max_drop: float,
    evaluator: _Evaluator | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Gives each layer the highest level whose drop, and every lower level's, is within ``max_drop``.

    With an evaluator, the levels are then checked together and lowered one step at a time on
    the layer whose own drop at its level is largest, until the combined drop is within too.
    """
    if max_drop < 0:
        raise InputError(f"--max-drop must be >= 0, got {max_drop}")
    report.max_drop = max_drop
    chosen: dict[str, float] = {}
    for layer in report.layers:
        level = 0.0
        for candidate in report.levels:
            if layer.drops[candidate] > max_drop:
                break
            level = candidate
        if level > 0:
            chosen[layer.name] = level
    report.chosen = chosen
    if evaluator is None:
        return chosen
    by_name = {layer.name: layer for layer in report.layers}
    steps = 0
    while chosen:
        report.combined_drop = evaluator.drop(_together(report))
        steps += 1
        if progress is not None:
            progress(steps, steps, f"all chosen levels together: drop {report.combined_drop:.4g}")
        if report.combined_drop <= max_drop:
            break
        worst = max(chosen, key=lambda n: by_name[n].drops[chosen[n]])
        lower = [level for level in report.levels if level < chosen[worst]]
        if lower:
            chosen[worst] = lower[-1]
        else:
            del chosen[worst]
        logger.info("sensitivity: combined drop %.4g > %g, %s lowered to %g", report.combined_drop, max_drop, worst, chosen.get(worst, 0.0))
    if not chosen:
        report.combined_drop = 0.0
    return chosen


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file by key.

    Raises:
        InputError: The file is missing or not an ``.npz``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file: {exc}") from exc


def batches_of(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Splits arrays (first axis = samples) into calibration batches."""
    rows = min(len(a) for a in arrays.values())
    return [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, rows, batch_size)]


__all__ = [
    "DEFAULT_LEVELS",
    "LayerSensitivity",
    "SensitivityReport",
    "analyze",
    "batches_of",
    "choose_ratios",
    "glob_escape",
    "load_npz",
]
