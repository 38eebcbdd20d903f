"""Benchmarks of onnxpress.runtime, printed as tables.

1. Runner overhead: ``BatchRunner.run`` (reading the input file, checking, writing shards and
   manifest) against a bare ``session.run`` loop over the same file, memory-mapped.
   Goal: at most 3 %. Wall time: the best of each side, and the median (with quartiles)
   of runner / bare over the pairs, each pair run in a random order. On the shared 2-core
   machine the best of each side can be one lucky run, and in a fixed order two runs of
   the same bare loop differed by about 5 % by their place in the cycle; the paired median
   is the figure to judge. Also the process's CPU time (all threads), and for context a bare
   loop that keeps its outputs and writes them with ``numpy.save`` at the end (what a script
   that keeps its results does; the goal is judged against the loop that discards them).
2. Resident memory over an input file larger than 4 GB (``--big-gb``; written to a temporary
   folder and deleted afterwards): sampled from ``/proc/self/status`` while the runner works.
   Goal: flat, a few batches.
3. Validation cost: ``validate(...)`` (opening both models, running them, metrics; no speed
   timing, no localization) against opening one model and a bare run over the same batches.
   Goal: at most 2.2x.
4. Why ``validate`` runs both models at once: two models over the same batches, alternating
   (intra-op spinning on and off) or at once on half the threads each, against one alone.

Run: ``.venv/bin/python benchmarks/runtime_bench.py [--skip-big] [--big-gb 4.2] [--threads N]``.
On a shared machine the timings are noisy; each row is the best of ``--repeats`` runs of each
side, interleaved (the minimum estimates the cost without other processes' interference).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

from onnxpress.models.digits import digits_cnn_path
from onnxpress.report import format_table, human_bytes
from onnxpress.runtime import BatchRunner, Tolerances, validate
from onnxpress.sessions import load_session


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples the resident set size in a thread."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - start, rss_bytes()))
            time.sleep(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wide_model(path: Path, width: int, rng: np.random.Generator) -> Path:
    """``y = relu(x @ W1) @ W2``: a model whose input rows are wide (4 KiB at width 1024)."""
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Relu", ["h"], ["r"]),
         oh.make_node("MatMul", ["r", "w2"], ["y"])],
        "wide",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", width])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
        [onh.from_array((rng.standard_normal((width, 32)) / 32).astype(np.float32), "w1"),
         onh.from_array((rng.standard_normal((32, 16)) / 6).astype(np.float32), "w2")],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), path)
    return path


def perturbed_copy(source: Path, target: Path, rng: np.random.Generator, scale: float = 0.01) -> Path:
    model = onnx.load(source)
    for init in model.graph.initializer:
        array = onh.to_array(init)
        if array.dtype == np.float32 and array.size > 1:
            noisy = array + rng.standard_normal(array.shape).astype(np.float32) * np.abs(array).mean() * scale
            init.CopyFrom(onh.from_array(noisy.astype(np.float32), init.name))
    onnx.save(model, target)
    return target


def bare_loop(model: Path, array: np.ndarray | Path, name: str, batch: int, threads: int | None,
              *, with_session: bool = False, cpu: list[float] | None = None, save: Path | None = None) -> float:
    """``session.run`` over the batches; a path is read the way a user would: ``np.load(mmap_mode="r")``.

    The mapping is released inside the timed region: unmapping a file whose pages were all
    touched costs about 85 ms per GB here, and a loop that left it to the garbage collector
    would only defer that cost (the runner's time includes closing its input). With ``save``,
    the loop keeps its outputs and writes them with ``numpy.save`` at the end, as a script that
    keeps its results would (the runner's time includes writing them). ``with_session``
    counts opening the session too (``validate`` opens its own). ``cpu`` gets the process's CPU
    seconds (all threads), which other processes on the machine disturb less than wall time.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    session = load_session(model, threads=threads)
    if isinstance(array, Path):
        array = np.load(array, mmap_mode="r")
    if not with_session:
        start, cpu_start = time.perf_counter(), time.process_time()
    kept = []
    for lo in range(0, len(array), batch):
        outputs = session.run(None, {name: array[lo:lo + batch]})
        if save is not None:
            kept.append(outputs[0])
    del array  # the last reference to a memmap: unmaps it
    if save is not None:
        np.save(save, np.concatenate(kept))
    if cpu is not None:
        cpu.append(time.process_time() - cpu_start)
    return time.perf_counter() - start


def runner_run(model: Path, data: Path, out: Path, batch: int, threads: int | None,
               cpu: list[float] | None = None) -> float:
    runner = BatchRunner(model, batch_size=batch, threads=threads)
    shutil.rmtree(out, ignore_errors=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    runner.run(data, out)
    if cpu is not None:
        cpu.append(time.process_time() - cpu_start)
    return time.perf_counter() - start


def overhead(work: Path, repeats: int, threads: int | None, rng: np.random.Generator,
             scale: float) -> list[list[str]]:
    rows = [["model", "samples", "batch", "bare loop s", "runner s", "overhead (best)", "paired median [IQR]",
             "bare CPU s", "runner CPU s", "CPU overhead", "bare+save s", "vs bare+save, paired median"]]
    cases = []
    n_digits, n_wide = int(200_000 * scale), int(250_000 * scale)
    write_rows(work / "digits.npy", n_digits, (1, 8, 8), rng)
    cases.append(("digits CNN", digits_cnn_path(), work / "digits.npy", n_digits, "image", 256))
    write_rows(work / "wide.npy", n_wide, (1024,), rng)
    cases.append(("wide MLP 1024->32->16", wide_model(work / "wide.onnx", 1024, rng), work / "wide.npy", n_wide,
                  "x", 512))
    for label, model, data, count, name, batch in cases:
        bare, run, saved, bare_cpu, run_cpu = [], [], [], [], []
        order = random.Random(0)
        for _ in range(repeats):  # interleaved so machine noise hits all, in a random order per round
            for side in order.sample(("bare", "runner", "save"), 3):
                if side == "bare":
                    bare.append(bare_loop(model, data, name, batch, threads, cpu=bare_cpu))
                elif side == "save":
                    (work / "saved.npy").unlink(missing_ok=True)
                    saved.append(bare_loop(model, data, name, batch, threads, save=work / "saved.npy"))
                else:
                    run.append(runner_run(model, data, work / "out", batch, threads, cpu=run_cpu))
        b, r, bc, rc = min(bare), min(run), min(bare_cpu), min(run_cpu)
        ratios = [x / y - 1 for x, y in zip(run, bare, strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
        vs_saved = [x / y - 1 for x, y in zip(run, saved, strict=True)]
        s1, smedian, s3 = statistics.quantiles(vs_saved, n=4) if len(vs_saved) > 1 else (vs_saved * 3)
        rows.append([label, str(count), str(batch), f"{b:.3f}", f"{r:.3f}", f"{(r / b - 1) * 100:+.1f}%",
                     f"{median * 100:+.1f}% [{q1 * 100:+.1f}, {q3 * 100:+.1f}]", f"{bc:.3f}", f"{rc:.3f}",
                     f"{(rc / bc - 1) * 100:+.1f}%", f"{min(saved):.3f}",
                     f"{smedian * 100:+.1f}% [{s1 * 100:+.1f}, {s3 * 100:+.1f}]"])
    return rows


def validation_cost(work: Path, repeats: int, threads: int | None, rng: np.random.Generator,
                    scale: float) -> list[list[str]]:
    rows = [["model", "samples", "batch", "one model s", "validate s", "ratio"]]
    n = int(100_000 * scale)
    write_rows(work / "vdigits.npy", n, (1, 8, 8), rng)
    write_rows(work / "vwide.npy", n, (1024,), rng)
    cases = [("digits CNN", digits_cnn_path(), work / "vdigits.npy", n, "image", 256),
             ("wide MLP", wide_model(work / "vwide.onnx", 1024, rng), work / "vwide.npy", n, "x", 512)]
    for label, model, data, count, name, batch in cases:
        candidate = perturbed_copy(model, work / f"cand-{model.name}", rng)
        one, both = [], []
        for _ in range(repeats):
            one.append(bare_loop(model, data, name, batch, threads, with_session=True))
            start = time.perf_counter()
            validate(model, candidate, data=data, batch_size=batch, measure_speed=False,
                     tolerances=Tolerances(), threads=threads)
            both.append(time.perf_counter() - start)
        o, v = min(one), min(both)
        rows.append([label, str(count), str(batch), f"{o:.3f}", f"{v:.3f}", f"{v / o:.2f}x"])
    return rows


def schedules(work: Path, repeats: int, threads: int | None, rng: np.random.Generator,
              scale: float) -> list[list[str]]:
    """Ways to run two models over the same batches, against one model alone (digits CNN).

    - alternating batch by batch on all threads, intra-op spinning on (onnxruntime's default):
      the idle session's threads spin against the busy one's;
    - the same with spinning off: no fight, but every run wakes its threads;
    - both at once on two Python threads, each session on half the threads (what ``validate``
      does): onnxruntime releases the GIL, and a small model scales poorly across threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from onnxpress.runtime.validate import compare_threads

    model = digits_cnn_path()
    candidate = perturbed_copy(model, work / "spin-cand.onnx", rng)
    x = rng.standard_normal((int(100_000 * scale), 1, 8, 8)).astype(np.float32)
    half = compare_threads(threads)

    def loop(session) -> None:
        for lo in range(0, len(x), 256):
            session.run(None, {"image": x[lo:lo + 256]})

    def alternate(a, b) -> None:
        for lo in range(0, len(x), 256):
            a.run(None, {"image": x[lo:lo + 256]})
            b.run(None, {"image": x[lo:lo + 256]})

    def at_once(a, b) -> None:
        with ThreadPoolExecutor(2) as pool:
            for job in [pool.submit(loop, a), pool.submit(loop, b)]:
                job.result()

    cases = [("one model alone", threads, True, lambda a, b: loop(a)),
             ("alternating, spinning on", threads, True, alternate),
             ("alternating, spinning off", threads, False, alternate),
             (f"at once, {half} thread(s) each", half, False, at_once)]
    times: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved so machine noise hits all
        for label, n, spin, run in cases:
            a, b = load_session(model, threads=n, spinning=spin), load_session(candidate, threads=n, spinning=spin)
            start = time.perf_counter()
            run(a, b)
            times.setdefault(label, []).append(time.perf_counter() - start)
    one = min(times[cases[0][0]])
    rows = [["schedule", "seconds", "vs one model"]]
    rows += [[label, f"{min(t):.3f}", f"{min(t) / one:.2f}x"] for label, t in times.items()]
    return rows


def write_rows(path: Path, rows: int, row_shape: tuple[int, ...], rng: np.random.Generator,
               chunk: int = 32_768) -> None:
    """Writes a float32 ``[rows, *row_shape]`` .npy in chunks (never the whole array in memory)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, *row_shape))
    base = rng.standard_normal((chunk, *row_shape)).astype(np.float32)
    for i, lo in enumerate(range(0, rows, chunk)):
        hi = min(rows, lo + chunk)
        out[lo:hi] = base[: hi - lo] + np.float32(i % 7)
        out.flush()
    del out


def big_file_memory(work: Path, gigabytes: float, threads: int | None, rng: np.random.Generator) -> list[list[str]]:
    width, batch = 1024, 1024
    row_bytes = width * 4
    rows_total = int(gigabytes * 1024**3 // row_bytes) + 1
    path = work / "big.npy"
    print(f"writing {human_bytes(rows_total * row_bytes)} to {path} ...", file=sys.stderr)
    write_rows(path, rows_total, (width,), rng)
    model = wide_model(work / "big.onnx", width, rng)
    runner = BatchRunner(model, batch_size=batch, threads=threads)
    before = rss_bytes()
    start = time.perf_counter()
    with RssSampler() as sampler:
        runner.run(path, work / "big-out")
    seconds = time.perf_counter() - start
    values = [r for _, r in sampler.samples]
    n = len(values)
    trace = ", ".join(human_bytes(values[i * (n - 1) // 10]) for i in range(11))
    print(f"RSS at 0%, 10%, ..., 100% of the run: {trace}", file=sys.stderr)
    table = [["input", "rows", "batch", "batch bytes", "RSS before", "RSS 10%", "RSS 50%", "RSS 90%", "RSS peak",
              "peak - before", "seconds"]]
    table.append([human_bytes(path.stat().st_size), str(rows_total), str(batch), human_bytes(batch * row_bytes),
                  human_bytes(before), human_bytes(values[n // 10]), human_bytes(values[n // 2]),
                  human_bytes(values[9 * n // 10]), human_bytes(max(values)), human_bytes(max(values) - before),
                  f"{seconds:.1f}"])
    path.unlink()
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--big-gb", type=float, default=4.2, help="size of the big input file (GB)")
    parser.add_argument("--skip-big", action="store_true", help="skip the big-file memory benchmark")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the sample counts (a fast machine needs more to time)")
    parser.add_argument("--only", choices=("overhead", "validate", "schedules", "memory"), help="run one benchmark")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="onnxpress-bench-"))
    try:
        if args.only in (None, "overhead"):
            print("runner overhead (best of %d, interleaved)" % args.repeats)
            print(format_table(overhead(work, args.repeats, args.threads, rng, args.scale)), end="\n\n", flush=True)
        if args.only in (None, "validate"):
            print("validation cost (best of %d, interleaved; no speed timing, no localization)" % args.repeats)
            print(format_table(validation_cost(work, args.repeats, args.threads, rng, args.scale)), end="\n\n", flush=True)
        if args.only in (None, "schedules"):
            print("two models over the same batches, digits CNN, batch 256 (best of %d, interleaved)" % args.repeats)
            print(format_table(schedules(work, args.repeats, args.threads, rng, args.scale)), end="\n\n", flush=True)
        if args.only == "memory" or (args.only is None and not args.skip_big):
            print("resident memory over a big input file")
            print(format_table(big_file_memory(work, args.big_gb, args.threads, rng)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
