"""``onnxpress run MODEL --input DATA --output OUT``: batch inference with resumable, atomic shards."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from onnxpress.report import format_table
from onnxpress.runtime.runner import BatchRunner


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        help="run a model over a dataset in batches (resumable)",
        description="Run MODEL over every row of DATA and write the outputs to OUT: a folder of shards "
        "plus manifest.json (each shard written atomically), or one Parquet file when OUT ends in "
        ".parquet. After a crash, a kill or Ctrl-C, --resume continues where the run stopped; the "
        "result is identical to an uninterrupted run.",
    )
    parser.add_argument("model", help="the model file")
    parser.add_argument("--input", required=True, metavar="DATA",
                        help=".npz (arrays named by input), .npy (single-input models), .parquet, or a folder of them")
    parser.add_argument("--output", required=True, metavar="OUT", help="output folder, or a .parquet file")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--resume", action="store_true", help="continue a run that stopped in OUT")
    parser.add_argument("--force", action="store_true", help="replace the outputs of an earlier run in OUT")
    parser.add_argument("--format", choices=("npz", "parquet"), default="npz", help="shard format (default npz)")
    parser.add_argument("--shard-rows", type=int, default=None,
                        help="rows per shard, rounded up to a multiple of the batch size (default: about 1/64 of the output, 1 to 64 MiB a shard)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    runner = BatchRunner(args.model, batch_size=args.batch_size, threads=args.threads)
    bar = tqdm(unit="sample", unit_scale=True, dynamic_ncols=True, disable=args.no_progress or None, smoothing=0.1)
    state = {"done": 0}

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.n = done
            bar.last_print_n = done
            bar.refresh()
        else:
            bar.update(done - state["done"])
        state["done"] = done

    try:
        result = runner.run(
            args.input, args.output, resume=args.resume, force=args.force, output_format=args.format,
            shard_rows=args.shard_rows, progress=progress,
        )
    except KeyboardInterrupt:
        bar.close()
        print(f"onnxpress run: interrupted after {state['done']} samples; committed shards are kept, "
              "rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        bar.close()
    rows = [["", "value"],
            ["samples", str(result.rows)],
            ["computed now", str(result.rows_computed)],
            ["resumed at", str(result.resumed_from)],
            ["batch size", str(runner.batch_size)],
            ["shards", str(result.shards)],
            ["seconds", f"{result.seconds:.2f}"],
            ["samples/s", f"{result.samples_per_second:.1f}"]]
    print(format_table(rows))
    print(f"\nwrote {result.output}")
    return 0
