"""``onnxpress compress MODEL -o OUT``: run a preset or a recipe over a model."""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from onnxpress import __version__
from onnxpress.calibration import DEFAULT_BATCH_SIZE, CalibrationData
from onnxpress.errors import InputError
from onnxpress.model_io import load_model, save_model, saved_size
from onnxpress.packing import pack
from onnxpress.pipeline import Pipeline, StepRecord
from onnxpress.recipes import apply_overrides, load_preset, load_recipe
from onnxpress.report import model_file_bytes, steps_table, summary_table, write_json
from onnxpress.stats import model_stats


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compress",
        help="run a preset or recipe of passes over a model",
        description="Run the steps of a preset or recipe over MODEL and write the result to OUT. "
        "Prints a before/after table; --report writes every step's record as JSON.",
    )
    parser.add_argument("model", help="the input .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a shipped preset (see `onnxpress passes`)")
    source.add_argument("--recipe", help="a recipe file, YAML or JSON")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="STEP.OPTION=VALUE",
        help="override an option; STEP is a step number (from 1) or a pass name; repeatable",
    )
    parser.add_argument("--report", help="write the step records to this JSON file")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--external-data", action="store_true",
        help="write the constants to OUT.data (automatic above 1.5 GB)",
    )
    parser.add_argument(
        "--pack", action="store_true",
        help="last step: also pack the result into OUT with suffix .onnxz (see `onnxpress pack`); "
        "implied when OUT ends in .onnxz, which then writes only the packed file",
    )
    parser.add_argument(
        "--data", metavar="FILE",
        help="calibration data: .npz with one array per model input (first axis = samples), .npy, "
        ".parquet or a folder of them; read a batch at a time. A recipe may name it as 'calibration: FILE'",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
        help=f"samples per calibration batch (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--auto-exclude", action="store_true",
        help="quantizers keep the nodes that hurt fidelity most in float until their target is met (needs --data)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def _calibration_path(args: argparse.Namespace, recipe) -> Path | None:
    """--data, else the recipe's ``calibration:`` key (relative to the recipe file)."""
    if args.data:
        return Path(args.data)
    named = recipe.extra.get("calibration")
    if not named:
        return None
    path = Path(str(named))
    return path if path.is_absolute() or not args.recipe else Path(args.recipe).parent / path


def _set_auto_exclude(recipe) -> None:
    import dataclasses

    from onnxpress.passes.registry import get_pass

    for step in recipe.steps:
        try:
            fields = {f.name for f in dataclasses.fields(get_pass(step.pass_name).Config)}
        except KeyError:
            continue  # the pipeline reports the unknown pass
        if "auto_exclude" in fields:
            step.options["auto_exclude"] = True


def run(args: argparse.Namespace) -> int:
    recipe = load_preset(args.preset) if args.preset else load_recipe(args.recipe)
    apply_overrides(recipe, args.overrides)
    if args.auto_exclude:
        _set_auto_exclude(recipe)
    pipeline = Pipeline.from_recipe(recipe)
    out = Path(args.output)
    packed_only = out.suffix == ".onnxz"
    packed = out if packed_only else out.with_suffix(".onnxz") if args.pack else None
    for target in (out, packed):
        if target is not None and target.exists() and not args.force:
            raise InputError(f"{target}: the output already exists; pass --force to replace it")
    model = load_model(args.model)
    data = _calibration_path(args, recipe)
    calibration = CalibrationData(data, model, batch_size=args.batch_size) if data is not None else None
    pipeline.preflight(model, has_calibration=calibration is not None)
    before = model_stats(model)
    file_before = model_file_bytes(args.model, model)
    start = time.perf_counter()
    bar = tqdm(total=len(pipeline.steps), unit="step", disable=args.no_progress or None, leave=False)

    def on_step(index: int, total: int, name: str, record: StepRecord | None) -> None:
        if record is None:
            if index == 1 and bar.n:  # the recipe repeats: a new round of steps
                bar.reset(total=total)
            bar.set_description(f"{index}/{total} {name}")
        else:
            bar.update(1)

    def on_progress(name: str, done: int, total: int, message: str) -> None:
        bar.set_postfix_str(f"{message} {done}/{total}", refresh=True)

    try:
        records = pipeline.run(model, calibration=calibration, on_step=on_step, on_progress=on_progress)
    finally:
        bar.close()
    pack_report = None
    if packed_only:  # the .onnx exists only in a temporary folder beside OUT
        with tempfile.TemporaryDirectory(prefix=".onnxpress-", dir=out.parent) as tmp:
            plain = Path(tmp) / (out.stem + ".onnx")
            save_model(model, plain, external_data=args.external_data or None)
            pack_report = pack(plain, out, force=args.force)
    else:
        save_model(model, out, force=args.force, external_data=args.external_data or None, source=args.model)
        if packed is not None:
            pack_report = pack(out, packed, force=args.force)
    seconds = time.perf_counter() - start
    after = model_stats(model)
    file_after = pack_report.packed_bytes if packed_only else saved_size(out)
    print(steps_table(records))
    print()
    print(summary_table(before, after, file_before, file_after))
    if pack_report is not None and not packed_only:
        print(f"\npacked {packed}: {pack_report.packed_bytes} bytes ({pack_report.ratio:.2f}x smaller than {out})")
    print(f"\nwrote {out} in {seconds:.2f}s")
    if args.report:
        write_json(args.report, {
            "onnxpress": __version__,
            "python": platform.python_version(),
            "input": str(args.model),
            "output": str(out),
            "recipe": {"name": recipe.name, "source": recipe.source},
            "steps": [r.to_dict() for r in records],
            "before": before.to_dict() | {"file_bytes": file_before},
            "after": after.to_dict() | {"file_bytes": file_after},
            "seconds": round(seconds, 3),
        } | ({"packed": {"output": str(pack_report.output), "file_bytes": pack_report.packed_bytes,
                         "codecs": pack_report.codecs}} if pack_report else {}))
    return 0
