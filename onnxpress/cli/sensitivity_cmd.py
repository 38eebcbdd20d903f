"""``onnxpress sensitivity MODEL --data DATA``: per-layer pruning sensitivity, and ratios within a tolerance or for a budget."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from tqdm import tqdm

from onnxpress.errors import InputError, RecipeError
from onnxpress.report import write_json
from onnxpress.sensitivity import DEFAULT_LEVELS, METHODS, analyze, batches_of, load_npz


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sensitivity",
        help="measure each layer's accuracy or fidelity drop when pruned, and choose per-layer ratios",
        description="Prune one layer at a time at each level and validate against the original on "
        "DATA. The drop is in accuracy points with labels, 1 - mean cosine without. With --max-drop, "
        "each layer gets the highest level within the tolerance and the levels are checked together; "
        "with --target, the levels that reach that overall sparsity (by layer size) with the least "
        "summed drop are chosen and measured together. --recipe-out writes the recipe that applies them.",
    )
    parser.add_argument("model", help="the .onnx model (never modified)")
    parser.add_argument("--data", required=True, help="validation inputs (.npz keyed by input name; a 'label' array is used)")
    parser.add_argument("--labels", help="class indices, one per sample (.npy); the metric becomes accuracy")
    parser.add_argument("--pass", dest="method", choices=sorted(METHODS), default="prune-magnitude",
                        help="the pruning pass (default prune-magnitude)")
    parser.add_argument("--levels", default=",".join(f"{x:g}" for x in DEFAULT_LEVELS),
                        help="comma-separated sparsities or channel ratios (default %(default)s)")
    parser.add_argument("--max-drop", type=float, metavar="X",
                        help="tolerance per layer and for all together (points with labels, else 1-cosine)")
    parser.add_argument("--target", type=float, metavar="S",
                        help="instead of --max-drop: the overall sparsity (or channel ratio), weighted by "
                        "layer size, to reach with the least summed drop")
    parser.add_argument("--no-verify", action="store_true", help="skip the combined check of the chosen levels")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="OPTION=VALUE",
                        help="another option of the pass, e.g. score=activation; repeatable")
    parser.add_argument("--calibration", metavar="FILE.npz", help="calibration inputs for options that need them")
    parser.add_argument("--samples", type=int, help="validate on the first N samples")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch (default 64)")
    parser.add_argument("--report", help="write the table and the choice as JSON here")
    parser.add_argument("--recipe-out", help="with --max-drop or --target, write the recipe applying the chosen levels here")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def _options(pairs: list[str]) -> dict[str, object]:
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {pair}: expected OPTION=VALUE, e.g. score=activation")
        options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return options


def run(args: argparse.Namespace) -> int:
    try:
        levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--levels {args.levels}: expected comma-separated fractions, e.g. 0.5,0.75,0.9") from None
    if args.recipe_out and args.max_drop is None and args.target is None:
        raise InputError("--recipe-out needs --max-drop or --target (the recipe applies the levels they choose)")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    data = load_npz(args.data)
    if args.samples is not None:
        data = {k: v[: args.samples] for k, v in data.items()}
    labels = None
    if args.labels:
        labels_path = Path(args.labels)
        if not labels_path.is_file():
            raise InputError(f"{labels_path}: no such labels file")
        import numpy as np

        labels = np.load(labels_path, allow_pickle=False)[: args.samples]
    calibration = batches_of(load_npz(args.calibration), args.batch_size) if args.calibration else None
    bar = tqdm(unit="run", disable=args.no_progress or None, leave=False)

    def progress(done: int, total: int, message: str) -> None:
        bar.total = max(total, bar.total or 0)
        bar.n = done
        bar.set_description(message)
        bar.refresh()

    try:
        report = analyze(
            args.model, data, labels=labels, method=args.method, levels=levels, options=_options(args.options),
            calibration=calibration, batch_size=args.batch_size, max_drop=args.max_drop, target=args.target,
            verify=not args.no_verify, progress=progress,
        )
    finally:
        bar.close()
    print(report.table())
    if report.chosen:
        print("\nper_layer: " + ", ".join(report.per_layer()))
    if args.report:
        write_json(args.report, report.to_dict())
    if args.recipe_out:
        Path(args.recipe_out).write_text(yaml.safe_dump(report.recipe(), sort_keys=False))
        print(f"wrote {args.recipe_out}")
    return 0
