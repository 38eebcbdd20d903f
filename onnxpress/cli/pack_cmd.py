"""``onnxpress pack MODEL.onnx -o MODEL.onnxz``: one lossless, entropy-coded model file."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from onnxpress.errors import InputError
from onnxpress.packing import DEFAULT_LEVEL, DEFAULT_MIN_TENSOR_BYTES, PackReport, pack
from onnxpress.report import format_table, human_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pack",
        help="pack a model into one lossless, entropy-coded .onnxz file",
        description="Pack MODEL (and its external data) into one .onnxz file: every large "
        "tensor is coded with the best of zstd, byte-grouped zstd (floats) and a sparse codec; "
        "identical tensors are stored once. `onnxpress unpack` gives back the .onnx bit for "
        "bit, and every onnxpress command runs the .onnxz directly.",
    )
    parser.add_argument("model", help="the .onnx file (never modified)")
    parser.add_argument("-o", "--output", help="the .onnxz to write (default: MODEL with suffix .onnxz)")
    parser.add_argument(
        "--level", type=int, default=DEFAULT_LEVEL, metavar="N",
        help=f"zstd level 1 (fast) .. 22 (smallest) (default {DEFAULT_LEVEL})",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="chunks coded at once (default: all cores)")
    parser.add_argument(
        "--min-bytes", type=int, default=DEFAULT_MIN_TENSOR_BYTES, metavar="N",
        help=f"tensors smaller than this stay in the graph (default {DEFAULT_MIN_TENSOR_BYTES})",
    )
    parser.add_argument("--force", action="store_true", help="replace the output if it exists")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def default_output(model: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnxz``."""
    return Path(model).with_suffix(".onnxz")


def print_report(report: PackReport) -> None:
    """Prints what a pack did: sizes, ratio and the codecs chosen."""
    rows = [
        ["", "bytes"],
        ["source (.onnx + external data)", human_bytes(report.source_bytes)],
        [".onnxz", human_bytes(report.packed_bytes)],
        ["  tensors, coded", human_bytes(report.coded_bytes)],
        ["  graph, coded", human_bytes(report.graph_bytes)],
    ]
    print(format_table(rows))
    codecs = ", ".join(f"{name} {n}" for name, n in Counter(report.codecs).most_common())
    dupes = report.tensors - report.streams
    print(
        f"\n{report.tensors} tensors ({codecs}){f', {dupes} duplicates stored once' if dupes else ''}; "
        f"{report.ratio:.2f}x smaller; round trip "
        f"{'byte-exact' if report.byte_exact else 'exact per tensor (source not in canonical protobuf form)'}"
    )
    print(f"wrote {report.output} in {report.seconds:.2f}s")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    output = Path(args.output) if args.output else default_output(args.model)
    bar = tqdm(unit="tensor", disable=args.no_progress or None, leave=False, desc="packing")

    def progress(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.update(1)

    try:
        report = pack(
            args.model, output, level=args.level, threads=args.threads,
            min_bytes=args.min_bytes, force=args.force, progress=progress,
        )
    finally:
        bar.close()
    print_report(report)
    return 0
