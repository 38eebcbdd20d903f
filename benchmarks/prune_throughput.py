"""Batch throughput of model files, interleaved, for the pruning benchmark (numpy + onnxruntime only).

Each model runs the same random batch; runs are interleaved model by model so that machine
noise hits every model alike, and the median of the timed runs is reported per batch size and
thread count, with the ratio to the first model. It imports nothing from onnxpress, so it runs
on a quiet machine with only onnxruntime installed:

    python benchmarks/prune_throughput.py REFERENCE.onnx CANDIDATE.onnx ... [--batch 256 1024] [--threads 1 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def _session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        feeds[inp.name] = rng.random(shape, dtype=np.float32)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'threads':>7} {'batch':>6}  " + "  ".join(f"{m.rsplit('/', 1)[-1]:>28}" for m in args.models))
    for threads in args.threads:
        sessions = [_session(m, threads) for m in args.models]
        for batch in args.batch:
            feeds = _feeds(sessions[0], batch, rng)
            times: list[list[float]] = [[] for _ in sessions]
            for s in sessions:
                for _ in range(3):
                    s.run(None, feeds)
            for _ in range(args.repeats):
                for i, s in enumerate(sessions):
                    start = time.perf_counter()
                    s.run(None, feeds)
                    times[i].append(time.perf_counter() - start)
            rates = [batch / statistics.median(t) for t in times]
            cells = [f"{r:>14.0f} samples/s x{r / rates[0]:.2f}" for r in rates]
            print(f"{threads:>7} {batch:>6}  " + "  ".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
