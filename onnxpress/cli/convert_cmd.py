"""``onnxpress convert torch|tf SOURCE -o OUT.onnx``: export to ONNX and check the export.

Every conversion runs the framework model and onnxruntime on the same inputs at batch size 1
and a larger one and prints the per-output errors. A mismatch beyond ``--atol``/``--rtol``
exits with status 4 and writes no model (unless ``--keep-failed``); ``--report`` always gets
the full record.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from onnxpress import __version__
from onnxpress.errors import InputError, ValidationFailedError
from onnxpress.report import write_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from onnxpress.converters.fidelity import DEFAULT_ATOL, DEFAULT_RTOL

    parser = subparsers.add_parser(
        "convert",
        help="convert a PyTorch or TensorFlow/Keras model to ONNX, checking the export",
        description="Convert a PyTorch or TensorFlow/Keras model to ONNX. Every export is run "
        "against the framework at batch size 1 and a larger one; a mismatch beyond the "
        "tolerance exits with status 4.",
    )
    frameworks = parser.add_subparsers(dest="framework", metavar="FRAMEWORK", required=True)

    torch_parser = frameworks.add_parser(
        "torch",
        help="PyTorch: package.module:callable, path/file.py:callable, or a .pt2 file",
        description="SPEC is package.module:callable or path/file.py:callable (returning an "
        "nn.Module, or a module and example inputs), or a torch.export .pt2 file. The dynamo "
        "exporter runs first; if it fails, the TorchScript exporter is tried.",
    )
    torch_parser.add_argument("spec", metavar="SPEC", help="what to convert")
    torch_parser.add_argument(
        "--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
        help="auto: dynamo, then TorchScript if dynamo fails (default)",
    )

    tf_parser = frameworks.add_parser(
        "tf",
        help="TensorFlow/Keras: a SavedModel folder, a .keras file, or package.module:callable",
        description="SOURCE is a SavedModel folder, a .keras file (loaded in safe mode), or "
        "package.module:callable / path/file.py:callable returning a Keras model, a tf.Module "
        "or a tf.function. Converted with tf2onnx (opset <= 18).",
    )
    tf_parser.add_argument("spec", metavar="SOURCE", help="what to convert")
    tf_parser.add_argument(
        "--signature", default=None,
        help="SavedModel signature to convert (default: serving_default)",
    )

    for sub in (torch_parser, tf_parser):
        sub.add_argument("-o", "--output", required=True, help="the .onnx file to write")
        sub.add_argument(
            "--input", dest="inputs", action="append", default=[], metavar="NAME:SHAPE:DTYPE",
            help="an input, e.g. input_ids:Bx128:int64 (letters = dynamic dimension; the "
            "first dimension is dynamic by default; optional 4th field LOW..HIGH bounds "
            "generated integers); repeatable",
        )
        sub.add_argument(
            "--output-name", dest="output_names", action="append", default=[], metavar="NAME",
            help="name of an ONNX output, in the model's order; repeatable",
        )
        sub.add_argument("--static-batch", action="store_true", help="keep the first dimension fixed")
        sub.add_argument("--opset", type=int, default=None, help="target ONNX opset")
        sub.add_argument("--data", help="check inputs from an .npz (keys = input names, rows = batch)")
        sub.add_argument(
            "--batch-sizes", default="1,4", metavar="N,M",
            help="batch sizes of the fidelity check (default 1,4)",
        )
        sub.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                         help=f"absolute tolerance of the check (default {DEFAULT_ATOL:g})")
        sub.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                         help=f"relative tolerance of the check (default {DEFAULT_RTOL:g})")
        sub.add_argument("--min-cosine", type=float, default=None,
                         help="also require at least this cosine per output")
        sub.add_argument("--seed", type=int, default=0, help="seed of generated check inputs")
        sub.add_argument("--report", help="write the conversion and fidelity record as JSON")
        sub.add_argument("--force", action="store_true", help="replace OUT if it exists")
        sub.add_argument("--keep-failed", action="store_true",
                         help="write OUT even when the fidelity check fails (still exits 4)")
        sub.add_argument("--no-progress", action="store_true",
                         help="do not print the stages as they start")
    return parser


def _stage_printer() -> Callable[[str], None]:
    """Prints each stage with the seconds since the conversion began, on stderr."""
    start = time.perf_counter()

    def show(stage: str) -> None:
        print(f"  [{time.perf_counter() - start:6.1f}s] {stage}", file=sys.stderr, flush=True)

    return show


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise InputError(f"--batch-sizes '{text}': expected numbers like 1,4") from exc
    if not sizes or any(s <= 0 for s in sizes):
        raise InputError(f"--batch-sizes '{text}': expected positive numbers like 1,4")
    return sizes


def run(args: argparse.Namespace) -> int:
    from onnxpress.converters.specs import load_npz, parse_inputs
    from onnxpress.model_io import save_model

    out = Path(args.output)
    if out.exists() and not args.force:
        raise InputError(f"{out}: the output already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InputError(f"{out}: the output folder {out.parent} does not exist")
    specs = parse_inputs(args.inputs, static_batch=args.static_batch)
    data = load_npz(args.data) if args.data else None
    common: dict[str, Any] = {
        "inputs": specs or None,
        "output_names": args.output_names or None,
        "opset": args.opset,
        "data": data,
        "batch_sizes": _batch_sizes(args.batch_sizes),
        "atol": args.atol,
        "rtol": args.rtol,
        "min_cosine": args.min_cosine,
        "static_batch": args.static_batch,
        "seed": args.seed,
        "check": False,
        "progress": None if args.no_progress else _stage_printer(),
    }
    if not args.no_progress:
        print(f"converting {args.spec} ({args.framework}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if common["progress"] is not None:
        common["progress"](f"loading {args.spec}")
    if args.framework == "torch":
        from onnxpress.converters.torch_export import from_torch, load_torch_spec

        module, example = load_torch_spec(args.spec)
        result = from_torch(module, example, exporter=args.exporter, **common)
    else:
        from onnxpress.converters.tf_export import convert_tf_source

        result = convert_tf_source(args.spec, signature=args.signature, **common)
    record = result.fidelity
    print(f"exporter: {result.exporter}: {result.exporter_note}")
    print(f"opset {result.opset}; inputs {', '.join(result.inputs)}; outputs {', '.join(result.outputs)}")
    print()
    print(record.table())
    print()
    print(record.summary())
    written = False
    if record.passed or args.keep_failed:
        save_model(result.model, out, force=args.force)
        written = True
    seconds = time.perf_counter() - start
    if args.report:
        write_json(args.report, {
            "onnxpress": __version__,
            "python": platform.python_version(),
            "command": "convert",
            "framework": args.framework,
            "source": args.spec,
            "output": str(out) if written else None,
            "conversion": result.to_dict(),
            "seconds": round(seconds, 3),
        })
    if not record.passed:
        raise ValidationFailedError(
            "the ONNX export does not match the framework model: "
            + "; ".join(record.failures())
            + ("" if written else f"; {out} was not written (--keep-failed writes it anyway)")
        )
    print(f"\nwrote {out} in {seconds:.1f}s")
    return 0
