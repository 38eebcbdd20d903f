"""Benchmark: the ``lossless`` preset through the CLI, on the bundled CNN and a multi-GB model.

For each model it runs ``onnxpress compress MODEL -o OUT --preset lossless`` as a child process
and prints one row: constants size, nodes before/after, constants after, wall time, the child's
peak resident memory (``ru_maxrss`` from ``os.wait4``, so it is that one process's high-water
mark, file-backed pages of memory-mapped weights included) and peak RSS divided by the size of
the model's constants. The goal for large models is a ratio of at most 1.5.

The synthetic model is built streaming, never holding its weights in memory: the script writes
them straight into the external data file through ``np.memmap`` and references them with
``ir.ExternalTensor``. It is a chain of ``--layers`` square MatMuls sized so the constants add
up to ``--size-gb``, with work for every lossless pass: two weights that are byte copies of
others (dedup-constants), two bias sums of constants (fold-constants), Identity / same-type Cast
/ identity Transpose / inference Dropout nodes (eliminate-noop), twin Tanh branches (cse) and a
dead branch with its own initializer (prune-dead).

After each run the output is loaded with ``onnxpress.load_model`` and run in onnxruntime on a
small random batch next to the input model; the outputs must be bit-identical.

Usage::

    python benchmarks/lossless_bench.py                  # digits + a 2.5 GB synthetic model
    python benchmarks/lossless_bench.py --size-gb 0.5    # a quicker run
    python benchmarks/lossless_bench.py --keep --work-dir /tmp/bench   # keep the files

Timings and memory depend on the machine and on what else runs on it; report them as measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

import onnxpress
from onnxpress.models.digits import digits_cnn_path
from onnxpress.report import human_bytes
from onnxpress.sessions import load_session

#: External tensors start at multiples of this, so onnxruntime can memory-map them.
ALIGNMENT = 64 * 1024
#: Rows of a weight generated at once: bounds the generator's memory to a few tens of MB.
CHUNK_BYTES = 32 * 1024**2


@dataclass
class Row:
    """One benchmark result."""

    model: str
    constant_bytes: int
    nodes_before: int
    nodes_after: int
    constant_bytes_after: int
    seconds: float
    peak_rss_bytes: int
    bit_identical: bool | None

    @property
    def ratio(self) -> float:
        return self.peak_rss_bytes / self.constant_bytes


def _fill_weight(
    data: np.memmap, rng: np.random.Generator, dim: int, copy_of: np.memmap | None
) -> None:
    """Writes a ``[dim, dim]`` weight chunk by chunk: fresh N(0, 1/dim) values, or a copy."""
    rows = max(1, CHUNK_BYTES // (4 * dim))
    scale = np.float32(1.0 / math.sqrt(dim))
    for start in range(0, dim, rows):
        stop = min(dim, start + rows)
        if copy_of is None:
            chunk = rng.standard_normal((stop - start, dim), dtype=np.float32)
            chunk *= scale
            data[start:stop] = chunk
        else:
            data[start:stop] = copy_of[start:stop]


def build_synthetic(folder: Path, size_gb: float, layers: int, seed: int) -> Path:
    """Writes ``synthetic.onnx`` and ``synthetic.onnx.data`` into ``folder``.

    Layer ``i`` computes ``h = MatMul(h, W_i)`` with ``W_i`` of shape ``[dim, dim]`` and
    ``layers * dim**2 * 4 ~= size_gb * 1e9``. ``W_3`` copies ``W_0`` and ``W_5`` copies
    ``W_2`` (when there are that many layers). Between layers sit the nodes the lossless
    passes remove; see the module docstring.
    """
    dim = max(64, int(math.sqrt(size_gb * 1e9 / (4 * layers))) // 64 * 64)
    weight_bytes = dim * dim * 4
    stride = -(-weight_bytes // ALIGNMENT) * ALIGNMENT
    duplicates = {i: i - 3 for i in range(3, layers, 2)}  # 3 <- 0, 5 <- 2, ...
    data_name = "synthetic.onnx.data"
    data_path = folder / data_name
    rng = np.random.default_rng(seed)
    with open(data_path, "wb") as f:
        f.truncate(stride * (layers - 1) + weight_bytes)
    weights: list[ir.Value] = []
    for i in range(layers):
        view = np.memmap(data_path, np.float32, "r+", offset=i * stride, shape=(dim, dim))
        source = None
        if i in duplicates:
            source = np.memmap(
                data_path, np.float32, "r", offset=duplicates[i] * stride, shape=(dim, dim)
            )
        _fill_weight(view, rng, dim, source)
        view.flush()
        del view, source
        tensor = ir.ExternalTensor(
            data_name, i * stride, weight_bytes, ir.DataType.FLOAT,
            shape=ir.Shape([dim, dim]), name=f"W{i}", base_dir=folder,
        )
        weights.append(ir.Value(
            name=f"W{i}", shape=tensor.shape, type=ir.TensorType(ir.DataType.FLOAT),
            const_value=tensor,
        ))

    batch = ir.SymbolicDim("batch")
    x = ir.Value(name="x", shape=ir.Shape([batch, dim]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes: list[ir.Node] = []
    initializers = list(weights)

    def add(
        op: str, inputs: list[ir.Value], name: str, shape: list | None = None, **attrs: object
    ) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs or None, name=name)
        node.outputs[0].name = name
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)  # every value here is float
        node.outputs[0].shape = ir.Shape(shape or [batch, dim])
        nodes.append(node)
        return node.outputs[0]

    def constant(name: str, array: np.ndarray) -> ir.Value:
        return add("Constant", [], name, shape=list(array.shape), value=ir.tensor(array, name=name))

    h = x
    for i, weight in enumerate(weights):
        h = add("MatMul", [h, weight], f"matmul{i}")
        kind = i % 4
        if kind == 0:  # no-ops
            h = add("Identity", [h], f"identity{i}")
            h = add("Cast", [h], f"cast{i}", to=ir.DataType.FLOAT)
        elif kind == 1:  # a bias computed from constants: folds into one
            b1 = constant(f"bias{i}_a", rng.standard_normal(dim).astype(np.float32) * 0.01)
            b2 = constant(f"bias{i}_b", rng.standard_normal(dim).astype(np.float32) * 0.01)
            h = add("Add", [h, add("Add", [b1, b2], f"bias{i}", shape=[dim])], f"biased{i}")
        elif kind == 2:  # twin branches: cse merges them
            twins = [add("Tanh", [h], f"tanh{i}_a"), add("Tanh", [h], f"tanh{i}_b")]
            h = add("Add", twins, f"sum{i}")
        else:
            h = add("Transpose", [h], f"transpose{i}", perm=[0, 1])
            h = add("Dropout", [h], f"dropout{i}")
    dead_weight = ir.Value(
        name="dead_weight", shape=ir.Shape([dim]), type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(rng.standard_normal(dim).astype(np.float32), name="dead_weight"),
    )
    initializers.append(dead_weight)
    add("Mul", [add("Sigmoid", [h], "dead_sigmoid"), dead_weight], "dead_mul")
    y = add("Identity", [h], "y")
    graph = ir.Graph(
        [x], [y], nodes=nodes, initializers=initializers, opset_imports={"": 18}, name="synthetic"
    )
    model = ir.Model(graph, ir_version=10, producer_name="onnxpress-benchmark")
    path = folder / "synthetic.onnx"
    ir.save(model, path)  # external tensors keep their references; nothing is read
    return path


def _compress(model: Path, out: Path, report: Path) -> tuple[float, int, dict]:
    """Runs the CLI on ``model``; returns wall seconds, peak RSS bytes and the JSON report."""
    cli = [sys.executable, "-m", "onnxpress", "compress", str(model), "-o", str(out),
           "--preset", "lossless", "--force", "--no-progress", "--report", str(report)]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=stderr)
        # os.wait4 rather than Popen.wait: it reaps the child and returns its own rusage.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(
                f"{' '.join(cli)} exited with {child.returncode}:\n{stderr.read().decode()[-3000:]}"
            )
    return seconds, usage.ru_maxrss * 1024, json.loads(report.read_text())


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = load_session(path)
    try:
        return session.run(None, feeds)
    finally:
        del session
        gc.collect()


def _check(model: Path, out: Path, feeds: dict[str, np.ndarray]) -> bool:
    """The output loads, and its results are bit-identical to the input model's."""
    onnxpress.load_model(out)
    expected = _outputs(model, feeds)
    actual = _outputs(out, feeds)
    return all(
        e.dtype == a.dtype and e.shape == a.shape and e.tobytes() == a.tobytes()
        for e, a in zip(expected, actual, strict=True)
    ) and len(expected) == len(actual)


def bench(name: str, model: Path, folder: Path, feeds: dict[str, np.ndarray] | None) -> Row:
    """Compresses ``model`` into ``folder`` and measures it."""
    out = folder / f"{model.stem}.lossless.onnx"
    seconds, peak, report = _compress(model, out, folder / f"{model.stem}.report.json")
    identical = _check(model, out, feeds) if feeds is not None else None
    return Row(
        model=name,
        constant_bytes=report["before"]["constant_bytes"],
        nodes_before=report["before"]["nodes"],
        nodes_after=report["after"]["nodes"],
        constant_bytes_after=report["after"]["constant_bytes"],
        seconds=seconds,
        peak_rss_bytes=peak,
        bit_identical=identical,
    )


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    header = ["model", "constants", "nodes before", "nodes after", "constants after",
              "wall time", "peak RSS", "peak RSS / model", "bit-identical"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        check = "n/a" if r.bit_identical is None else "yes" if r.bit_identical else "NO"
        lines.append(
            f"| {r.model} | {human_bytes(r.constant_bytes)} | {r.nodes_before} | {r.nodes_after} | "
            f"{human_bytes(r.constant_bytes_after)} | {r.seconds:.1f} s | "
            f"{human_bytes(r.peak_rss_bytes)} | {r.ratio:.2f} | {check} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.5,
                        help="constants of the synthetic model, in GB (1e9 bytes); 0 skips it")
    parser.add_argument("--layers", type=int, default=6,
                        help="MatMul weights in the synthetic chain")
    parser.add_argument("--work-dir", type=Path, help="where to build (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the models built and written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.size_gb < 0:
        parser.error("--layers must be >= 1 and --size-gb >= 0")

    folder = Path(tempfile.mkdtemp(prefix="onnxpress-bench-", dir=args.work_dir))
    rng = np.random.default_rng(args.seed)
    rows = []
    try:
        digits_feeds = {"image": rng.random((16, 1, 8, 8), dtype=np.float32)}
        rows.append(bench("digits_cnn (bundled)", digits_cnn_path(), folder, digits_feeds))
        print(table(rows), flush=True)
        if args.size_gb > 0:
            start = time.perf_counter()
            synthetic = build_synthetic(folder, args.size_gb, args.layers, args.seed)
            dim = onnxpress.load_model(synthetic).graph.inputs[0].shape[1]
            print(f"\nbuilt {synthetic} ({args.layers} x [{dim}, {dim}] float32) "
                  f"in {time.perf_counter() - start:.1f} s", flush=True)
            feeds = {"x": rng.standard_normal((2, dim), dtype=np.float32)}
            rows.append(bench(f"synthetic {args.size_gb:g} GB", synthetic, folder, feeds))
        print()
        print(table(rows))
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    failed = [r.model for r in rows if r.bit_identical is False]
    if failed:
        print(f"outputs differ after the lossless preset: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
