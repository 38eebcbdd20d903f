"""Recipes: a list of pass steps read from YAML or JSON, with command-line overrides.

A recipe reads::

    name: lossless
    steps:
      - pass: prune-dead
      - pass: fold-constants
        with: {size_budget_bytes: 1048576}

``repeat: N`` (default 1) runs the steps again, up to ``N`` rounds in all, while a round changed
the model: one pass can open work for an earlier one (an Identity removed after folding makes
its consumer foldable), and a preset that repeats to a fixed point gives the same model when it
is run again. Presets are recipe files shipped in ``onnxpress/presets``. ``--set`` overrides one option:
``--set 2.size_budget_bytes=1000`` targets step 2 (steps count from 1, as the summary table
prints them) and ``--set fold-constants.size_budget_bytes=1000`` every step of that pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from onnxpress.errors import RecipeError


@dataclass
class RecipeStep:
    """One step: a pass name and its options, with where it came from for error messages."""

    pass_name: str
    options: dict[str, Any] = field(default_factory=dict)
    key: str = ""


@dataclass
class Recipe:
    """An ordered list of steps; ``source`` names the file or preset."""

    steps: list[RecipeStep]
    name: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    repeat: int = 1


def preset_names() -> list[str]:
    """Names of the presets shipped with onnxpress."""
    folder = resources.files("onnxpress") / "presets"
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Recipe:
    """Loads a shipped preset by name.

    Raises:
        RecipeError: No preset has that name; the message lists them.
    """
    path = resources.files("onnxpress") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return parse_recipe(yaml.safe_load(path.read_text()), source=f"preset {name}")


def load_recipe(path: str | Path) -> Recipe:
    """Loads a recipe file (``.yaml``, ``.yml`` or ``.json``).

    Raises:
        RecipeError: The file is missing, unreadable, or not a recipe.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return parse_recipe(data, source=str(path))


def parse_recipe(data: Any, source: str = "") -> Recipe:
    """Checks the recipe's shape (not its pass names or options: the pipeline does that)."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict) or "steps" not in data:
        raise RecipeError(f"{where}a recipe is a mapping with a 'steps' list")
    steps = data["steps"]
    if not isinstance(steps, list) or not steps:
        raise RecipeError(f"{where}steps: expected a non-empty list of {{pass: NAME, with: {{...}}}}")
    parsed = []
    for i, step in enumerate(steps, start=1):
        key = f"steps[{i}]"
        if isinstance(step, str):
            step = {"pass": step}
        if not isinstance(step, dict) or "pass" not in step:
            raise RecipeError(f"{where}{key}: expected {{pass: NAME, with: {{...}}}}, got {step!r}")
        unknown = set(step) - {"pass", "with"}
        if unknown:
            raise RecipeError(f"{where}{key}: unknown keys {sorted(unknown)} (a step has 'pass' and 'with')")
        options = step.get("with") or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where}{key}.with: expected a mapping of options, got {options!r}")
        parsed.append(RecipeStep(str(step["pass"]), dict(options), key))
    repeat = data.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise RecipeError(f"{where}repeat: expected a whole number of rounds >= 1, got {repeat!r}")
    extra = {k: v for k, v in data.items() if k not in ("steps", "name", "repeat")}
    return Recipe(parsed, name=str(data.get("name", "")), source=source, extra=extra, repeat=repeat)


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Applies ``STEP.OPTION=VALUE`` overrides; VALUE is read as YAML (``1000``, ``true``, ``[a, b]``).

    Raises:
        RecipeError: The override is malformed or matches no step.
    """
    for text in overrides:
        target, sep, raw = text.partition("=")
        step_ref, dot, option_name = target.rpartition(".")
        if not sep or not dot or not step_ref or not option_name:
            raise RecipeError(f"--set {text}: expected STEP.OPTION=VALUE, e.g. 2.size_budget_bytes=1000")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {text}: cannot read the value: {exc}") from exc
        if step_ref.isdigit():
            index = int(step_ref)
            if not 1 <= index <= len(recipe.steps):
                raise RecipeError(f"--set {text}: there is no step {index}; the recipe has {len(recipe.steps)} steps")
            targets = [recipe.steps[index - 1]]
        else:
            targets = [s for s in recipe.steps if s.pass_name == step_ref]
            if not targets:
                names = ", ".join(s.pass_name for s in recipe.steps)
                raise RecipeError(f"--set {text}: no step runs pass {step_ref!r} (steps: {names})")
        for step in targets:
            step.options[option_name] = value
    return recipe
