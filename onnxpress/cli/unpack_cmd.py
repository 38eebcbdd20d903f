"""``onnxpress unpack MODEL.onnxz -o MODEL.onnx``: give back the packed model bit for bit."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from onnxpress.errors import InputError
from onnxpress.packing import DEFAULT_LIMITS, Limits, unpack
from onnxpress.report import human_bytes


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-bytes`` and ``--max-ratio``: the decompression-bomb guard, for any command."""
    parser.add_argument(
        "--max-bytes", type=float, metavar="GB", default=DEFAULT_LIMITS.max_total_bytes / 1024**3,
        help="refuse a packed file that declares more decoded GiB than this "
        f"(default {DEFAULT_LIMITS.max_total_bytes / 1024**3:g})",
    )
    parser.add_argument(
        "--max-ratio", type=float, metavar="X", default=DEFAULT_LIMITS.max_ratio,
        help="refuse a packed file that declares more than X decoded bytes per byte of file "
        f"(default {DEFAULT_LIMITS.max_ratio:g})",
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    try:
        return Limits(max_total_bytes=int(args.max_bytes * 1024**3), max_ratio=args.max_ratio)
    except ValueError as exc:
        raise InputError(f"bad limit: {exc}") from exc


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "unpack",
        help="unpack an .onnxz back into the .onnx it was packed from",
        description="Unpack MODEL.onnxz into the .onnx (and external-data files, written "
        "beside it under their original names, subfolders included) it was packed from. "
        "Every tensor's sha256 is checked, and the whole file's when the container records "
        "a byte-exact source.",
    )
    parser.add_argument("model", help="the .onnxz file")
    parser.add_argument("-o", "--output", help="the .onnx to write (default: MODEL with suffix .onnx)")
    parser.add_argument("--threads", type=int, metavar="N", help="chunks decoded at once (default: all cores)")
    parser.add_argument("--force", action="store_true", help="replace outputs that exist")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    add_limit_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".onnx")
    bar = tqdm(unit="tensor", disable=args.no_progress or None, leave=False, desc="unpacking")

    def progress(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.update(1)

    try:
        report = unpack(
            args.model, output, force=args.force, limits=limits_from_args(args),
            threads=args.threads, progress=progress,
        )
    finally:
        bar.close()
    extra = "".join(f" + {p}" for p in report.external_files)
    check = "sha256 of the whole file matches the source" if report.byte_exact else "every tensor's sha256 checked"
    print(
        f"wrote {report.output}{extra} ({human_bytes(report.bytes_written)}, {report.tensors} "
        f"tensors; {check}) in {report.seconds:.2f}s"
    )
    return 0
