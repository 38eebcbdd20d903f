"""``onnxpress validate REFERENCE CANDIDATE``: compare two models on the same batches; exit 4 on failure."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tqdm import tqdm

from onnxpress.errors import EXIT_VALIDATION_FAILED, InputError
from onnxpress.recipes import load_recipe
from onnxpress.runtime.validate import Tolerances, validate

#: Flags that set a tolerance: (flag, Tolerances field, help).
TOLERANCE_FLAGS = (
    ("--min-cosine", "min_cosine", "every floating output's mean cosine must reach this (default 0.99)"),
    ("--min-worst-cosine", "min_worst_cosine", "every floating output's minimum per-sample cosine must reach this"),
    ("--max-abs-error", "max_abs_error", "every output's maximum absolute error must stay within this"),
    ("--max-mean-abs-error", "max_mean_abs_error", "every output's mean absolute error must stay within this"),
    ("--max-rel-l2", "max_rel_l2", "every output's relative L2 error must stay within this"),
    ("--min-top1-agreement", "min_top1_agreement", "percent of samples whose top-1 class agrees (class-score outputs)"),
    ("--min-equal-values", "min_equal_values",
     "integer and bool outputs: percent of values equal in both models (default 99; they take no cosine check)"),
    ("--max-accuracy-drop", "max_accuracy_drop", "accuracy drop in percentage points, with labels (default 1.0)"),
    ("--min-speedup", "min_speedup", "candidate/reference throughput must reach this"),
    ("--max-size-ratio", "max_size_ratio", "candidate/reference size on disk must stay within this"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "validate",
        help="compare a candidate model with its reference; exit 4 when it misses a tolerance",
        description="Run REFERENCE and CANDIDATE over the same batches and report per-output error, "
        "accuracy (with labels), size and throughput, and a verdict against the tolerances (flags, "
        "or a recipe's 'validate:' section; flags win; 'none' switches a check off). Exit status 4 "
        "when the verdict fails.",
    )
    parser.add_argument("reference", help="the reference model file")
    parser.add_argument("candidate", help="the candidate model file")
    parser.add_argument("--data", help="real inputs (.npz/.npy/.parquet/folder); random inputs when absent")
    parser.add_argument("--labels", help="class indices, one per sample (.npy)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    parser.add_argument("--samples", type=int, help="use the first N samples (random data: draw N, default 128)")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                        help="size of a named input dimension for random inputs; repeatable")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads of the timed runs; the comparison gives each model half")
    parser.add_argument("--recipe", help="read tolerances from this recipe's 'validate:' section")
    for flag, _, help_text in TOLERANCE_FLAGS:
        parser.add_argument(flag, type=_number_or_none, default=argparse.SUPPRESS, metavar="X", help=help_text)
    parser.add_argument("--no-speed", action="store_true", help="do not time the models")
    parser.add_argument("--localize", action="store_true", help="rank nodes by the error they add")
    parser.add_argument("--localize-batches", type=int, default=4, help="batches localization runs (default 4)")
    parser.add_argument("--value-map", metavar="FILE.json",
                        help="reference -> candidate value names for localization: a JSON mapping, or a "
                        "compress --report whose steps record renames")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--html", help="write a self-contained HTML report here")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def _number_or_none(text: str) -> float | None:
    if text.lower() in ("none", "off", "null"):
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from exc
    if math.isnan(value):  # every comparison with NaN fails, so the check could never pass
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}")
    return value


def _check_writable(flag: str, path: str | None) -> None:
    """Refuses an output path that cannot be written before the models run (not after).

    Raises:
        InputError: The path is a folder, or its folder does not exist.
    """
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path}: is a folder; expected a file name to write")
    if not target.parent.is_dir():
        raise InputError(f"{flag} {path}: the folder {target.parent} does not exist")


def parse_dims(items: list[str]) -> dict[str, int]:
    """``["seq=128"]`` -> ``{"seq": 128}``.

    Raises:
        InputError: An item is not NAME=INTEGER.
    """
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"--dim {item}: expected NAME=VALUE with a positive integer, e.g. --dim seq=128")
        dims[name.strip()] = int(value)
    return dims


def tolerances_from(args: argparse.Namespace) -> Tolerances:
    """Defaults, then the recipe's ``validate:`` section, then the flags."""
    values = Tolerances().to_dict()
    if getattr(args, "recipe", None):
        recipe = load_recipe(args.recipe)
        section = recipe.extra.get("validate") or {}
        if not isinstance(section, dict):
            raise InputError(f"{args.recipe}: 'validate' must be a mapping of tolerances")
        parsed = Tolerances.from_mapping(section, f"{args.recipe}: validate").to_dict()
        values |= {k: parsed[k] for k in (str(key).replace("-", "_") for key in section)}
    for _, field_name, _ in TOLERANCE_FLAGS:
        if hasattr(args, field_name):
            values[field_name] = getattr(args, field_name)
    return Tolerances(**values)


def _value_map(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    from onnxpress.runtime.localize import load_value_map  # imports onnx-ir (0.6 s)

    return load_value_map(path)


def run(args: argparse.Namespace) -> int:
    tolerances = tolerances_from(args)
    _check_writable("--report", args.report)
    _check_writable("--html", args.html)
    bar = tqdm(unit="sample", unit_scale=True, dynamic_ncols=True, disable=args.no_progress or None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = validate(
            args.reference, args.candidate, data=args.data, labels=args.labels, batch_size=args.batch_size,
            samples=args.samples, tolerances=tolerances, dims=parse_dims(args.dim),
            measure_speed=not args.no_speed, localize=args.localize, threads=args.threads,
            localize_batches=args.localize_batches, progress=progress,
            value_map=_value_map(args.value_map),
        )
    finally:
        bar.close()
    print(report.summary())
    try:
        if args.report:
            report.write_json(args.report)
            print(f"\nwrote {args.report}")
        if args.html:
            from onnxpress.runtime.html_report import write_html

            write_html(report, Path(args.html))
            print(f"wrote {args.html}")
    except OSError as exc:
        raise InputError(f"cannot write the report: {exc}") from exc
    return 0 if report.passed else EXIT_VALIDATION_FAILED
