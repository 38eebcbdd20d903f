"""Benchmark: ``.onnxz`` size against ``zstd -19`` and ``gzip -9`` of the same ``.onnx``, decode speed, session start.

Models (built into ``--work-dir``):

- ``minilm-fp32``: MiniLM-L6 from :func:`onnxpress.models.minilm.build_minilm_onnx`;
- ``minilm-int8``: the same after the ``int8`` preset when it exists, otherwise after
  ``onnxruntime.quantization.quantize_dynamic`` (per-tensor QInt8 weights; the row says which);
- ``digits-fp32``: the bundled digits CNN;
- ``digits-sparse80``: the digits CNN with 80 % of every Conv/Gemm/MatMul weight tensor set to
  zero by magnitude (the ``prune-magnitude`` pass, per layer, every size of tensor).

Size columns: the ``.onnx`` file, ``zstd -19`` and ``gzip -9`` of it (the system tools), the
``.onnxz``, and ``.onnx / .onnxz``. For int8 models the int8 constants are also compared with
their order-0 entropy bound ``sum_t n_t * H_t / 8`` bytes, where ``H_t = -sum_s p_s log2 p_s``
over the byte values of tensor ``t`` (per tensor, the stricter bound), and with the bound of
their pooled histogram.

Speed: decoding every tensor on one thread, the best of ``--decode-repeats`` passes
(``time.thread_time``, CPU seconds of that thread, so other processes on a busy machine do
not count; wall time is printed too), with and without sha256 verification. Session start, two ways, ``.onnx`` and ``.onnxz`` interleaved:

- cold: the median of ``--cold-repeats`` first ``onnxpress.load_session`` calls, each in a
  fresh process (imports not timed). This is what a user waits for: every command, and most
  scripts, build one session per process;
- warm: the fastest of ``--repeats`` calls in this process, into memory it has used before.
  Loading an ``.onnx`` is mostly copying, which costs little once no page has to be faulted
  in; loading an ``.onnxz`` is mostly decoding, which costs the same either way. So the warm
  ratio is the stricter one, and it is printed beside the cold one, with the median ratio
  of the pairs (``paired``: each ``.onnxz`` start over the ``.onnx`` start just before it).

Targets (issue 6): MiniLM fp32 >= 1.2x; MiniLM int8 within 2 % of the entropy bound; sparse
digits >= 3x; decoding >= 300 MB/s on one core; session start from ``.onnxz`` <= 1.5x.

Usage::

    python benchmarks/pack_bench.py                      # all models
    python benchmarks/pack_bench.py --models digits-fp32,digits-sparse80 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxpress
from onnxpress.packing import PackedModel, codecs, pack
from onnxpress.packing.format import GRAPH_MEMBER
from onnxpress.report import format_table, human_bytes

MODELS = ("minilm-fp32", "minilm-int8", "digits-fp32", "digits-sparse80")


def build(name: str, work: Path) -> tuple[Path, str]:
    """The model file for ``name`` and a note on how it was made."""
    if name == "minilm-fp32":
        from onnxpress.models.minilm import build_minilm_onnx

        return build_minilm_onnx(), "build_minilm_onnx()"
    if name == "minilm-int8":
        src, _ = build("minilm-fp32", work)
        out = work / "minilm-int8.onnx"
        if not out.exists():
            try:
                onnxpress.load_preset("int8")
            except Exception:  # noqa: BLE001 - preset not shipped yet
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
                (work / "minilm-int8.note").write_text("quantize_dynamic (no int8 preset)")
            else:
                subprocess.run(
                    [sys.executable, "-m", "onnxpress", "compress", str(src), "-o", str(out),
                     "--preset", "int8", "--no-progress"], check=True, capture_output=True,
                )
                (work / "minilm-int8.note").write_text("preset int8")
        return out, (work / "minilm-int8.note").read_text()
    from onnxpress.models.digits import digits_cnn_path

    if name == "digits-fp32":
        return digits_cnn_path(), "bundled"
    if name == "digits-sparse80":
        out = work / "digits-sparse80.onnx"
        model = onnxpress.load_model(digits_cnn_path())
        from onnxpress.passes.registry import get_pass

        cls = get_pass("prune-magnitude")
        cls(cls.Config(sparsity=0.8, scope="per-layer", min_elements=1))(model)
        onnxpress.save_model(model, out, force=True)
        return out, "prune-magnitude sparsity=0.8 per-layer"
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def tool_size(command: list[str], path: Path) -> int:
    """Bytes that a compressor writes to stdout for ``path``."""
    result = subprocess.run([*command, str(path)], check=True, capture_output=True)
    return len(result.stdout)


def entropy_bytes(data: np.ndarray) -> float:
    """Order-0 entropy of a byte array, in bytes."""
    counts = np.bincount(data.view(np.uint8).ravel(), minlength=256)
    p = counts[counts > 0] / data.size
    return float(-(p * np.log2(p)).sum() * data.size / 8)


def int8_bound(src: Path, packed: Path) -> dict[str, float]:
    """Coded bytes of the int8 tensors next to their per-tensor and pooled entropy bounds."""
    proto = onnx.load(str(src))
    arrays = [
        np.frombuffer(t.raw_data, np.uint8)
        for t in proto.graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.raw_data) >= 256
    ]
    per_tensor = sum(entropy_bytes(a) for a in arrays)
    pooled = entropy_bytes(np.concatenate(arrays)) if arrays else 0.0
    with PackedModel(packed) as container:
        seen, coded = set(), 0
        for entry in container.manifest.tensors:
            if entry.dtype in ("INT8", "UINT8") and entry.member not in seen:
                seen.add(entry.member)
                coded += entry.coded_size
    return {"coded": coded, "per_tensor": per_tensor, "pooled": pooled, "raw": sum(a.size for a in arrays)}


def decode_speed(packed: Path, repeats: int) -> dict[str, float]:
    """MB/s of decoded bytes per CPU second (and per wall second) on one thread, best of ``repeats``.

    The best, not the first: a single pass over a 160 KB model takes half a millisecond, in
    which the first touch of each mapped page and any disturbance weigh as much as decoding.
    """
    with PackedModel(packed) as container:
        tensors = container.manifest.tensors
        unique = sorted({t.member: i for i, t in reversed(list(enumerate(tensors)))}.values())
        total = sum(tensors[i].raw_size for i in unique)
        codec_cpu = codec_wall = sha_cpu = sha_wall = float("inf")
        for _ in range(repeats):
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            for i in unique:
                entry, offset = tensors[i], 0
                view = container._member_view(entry.member, entry.name)
                for chunk in entry.chunks:
                    coded = view[offset : offset + chunk.coded_size]
                    codecs.decode_array(chunk.codec, coded, chunk.raw_size, chunk.params)
                    coded.release()
                    offset += chunk.coded_size
                view.release()
            cpu1, wall1 = time.thread_time(), time.perf_counter()
            container.decode_all(threads=1, as_bytes=False)  # what a session does, on one thread
            cpu2, wall2 = time.thread_time(), time.perf_counter()
            codec_cpu, codec_wall = min(codec_cpu, cpu1 - cpu0), min(codec_wall, wall1 - wall0)
            sha_cpu, sha_wall = min(sha_cpu, cpu2 - cpu1), min(sha_wall, wall2 - wall1)
    return {
        "bytes": total,
        "codec_cpu": total / codec_cpu / 1e6,
        "codec_wall": total / codec_wall / 1e6,
        "sha_cpu": total / sha_cpu / 1e6,
        "sha_wall": total / sha_wall / 1e6,
    }


def session_start(src: Path, packed: Path, repeats: int) -> tuple[float, float, float]:
    """Fastest seconds for ``load_session`` on the ``.onnx`` and on the ``.onnxz``, interleaved,
    in this process, and the median ratio of the pairs.

    A warm start: after the first, each session is built into memory the process has used
    before (the allocator hands it back), so no page is faulted in; this favours the
    ``.onnx``, whose load is mostly copying, over the ``.onnxz``, whose load is mostly
    decoding. The minimum, not the median: on a shared machine every disturbance only adds
    time. The ratio of the two minimums can still pair a quiet moment with a busy one; the
    median of the ratios of starts made one after the other does not.
    """
    plain, coded = [], []
    for _ in range(repeats):
        for path, times in ((src, plain), (packed, coded)):
            start = time.perf_counter()
            session = onnxpress.load_session(path)
            times.append(time.perf_counter() - start)
            del session
    return min(plain), min(coded), statistics.median(c / p for p, c in zip(plain, coded, strict=True))


_COLD_START = """
import sys, time
from onnxpress import load_session  # its modules are imported here, untimed
start = time.perf_counter()
load_session(sys.argv[1])
print(time.perf_counter() - start)
"""


def cold_start(src: Path, packed: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of the first ``load_session`` in a fresh process, ``.onnx`` and ``.onnxz`` interleaved.

    This is the start a user sees: every ``onnxpress`` command, and most scripts, build one
    session per process, into memory the process has never touched (its page faults, and
    onnxruntime's own first-session set-up, count for both formats). Imports are not timed.
    The median, not the minimum: a fresh process has more sources of variation than a loop.
    """
    plain, coded = [], []
    for _ in range(repeats):
        for path, times in ((src, plain), (packed, coded)):
            result = subprocess.run([sys.executable, "-c", _COLD_START, str(path)], check=True,
                                    capture_output=True, text=True)
            times.append(float(result.stdout.split()[-1]))
    return statistics.median(plain), statistics.median(coded)


def _ms(seconds: float) -> str:
    """Milliseconds, with a decimal below 10 ms (a 2 ms start against a 3 ms one is a ratio)."""
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--level", type=int, default=codecs.DEFAULT_LEVEL, help="zstd level for .onnxz")
    parser.add_argument("--repeats", type=int, default=5, help="warm session starts timed per format")
    parser.add_argument("--cold-repeats", type=int, default=9, help="fresh processes timed per format")
    parser.add_argument("--decode-repeats", type=int, default=5, help="one-thread decoding passes (the best counts)")
    parser.add_argument(
        "--file", action="append", default=[], metavar="NAME=PATH",
        help="benchmark an existing .onnx under NAME instead of building it (repeatable)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip zstd -19 and gzip -9 (slow)")
    parser.add_argument("--work-dir", type=Path, help="keep built models here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="pack-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [["model", ".onnx", "made by", "zstd -19", "gzip -9", ".onnxz", "x .onnx", "x zstd", "pack s"]]
    speeds = [["model", "decode MB/s (cpu, wall)", "+ sha256 MB/s (cpu, wall)", "cold .onnx", "cold .onnxz",
               "cold ratio", "warm .onnx", "warm .onnxz", "warm ratio", "paired"]]
    notes = []
    try:
        given = dict(item.split("=", 1) for item in args.file)
        names = list(given) if given else args.models.split(",")
        for name in names:
            src, made_by = (Path(given[name]), "given file") if name in given else build(name, work)
            packed = work / f"{name}.onnxz"
            report = pack(src, packed, level=args.level, force=True)
            zstd19 = 0 if args.no_baselines else tool_size(["zstd", "-19", "-q", "-c"], src)
            gzip9 = 0 if args.no_baselines else tool_size(["gzip", "-9", "-c"], src)
            size = src.stat().st_size
            sizes.append([
                name, human_bytes(size), made_by, human_bytes(zstd19), human_bytes(gzip9),
                human_bytes(report.packed_bytes), f"{size / report.packed_bytes:.2f}",
                f"{zstd19 / report.packed_bytes:.2f}", f"{report.seconds:.1f}",
            ])
            speed = decode_speed(packed, args.decode_repeats)
            c_plain, c_packed = cold_start(src, packed, args.cold_repeats)
            t_plain, t_packed, t_paired = session_start(src, packed, args.repeats)
            speeds.append([
                name, f"{speed['codec_cpu']:.0f}, {speed['codec_wall']:.0f}",
                f"{speed['sha_cpu']:.0f}, {speed['sha_wall']:.0f}",
                _ms(c_plain), _ms(c_packed), f"{c_packed / c_plain:.2f}",
                _ms(t_plain), _ms(t_packed), f"{t_packed / t_plain:.2f}", f"{t_paired:.2f}",
            ])
            if "int8" in name:
                bound = int8_bound(src, packed)
                notes.append(
                    f"{name}: int8 constants {human_bytes(bound['raw'])} coded to {bound['coded']:,} bytes; "
                    f"order-0 entropy bound {bound['per_tensor']:,.0f} bytes per tensor "
                    f"({bound['coded'] / bound['per_tensor'] - 1:+.2%}), {bound['pooled']:,.0f} pooled "
                    f"({bound['coded'] / bound['pooled'] - 1:+.2%})"
                )
            digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
            notes.append(f"{name}: codecs {report.codecs}, sha256 {digest}..., byte-exact {report.byte_exact}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(sizes))
    print()
    print(format_table(speeds))
    print()
    print("\n".join(notes))
    print(f"\n(graph member: {GRAPH_MEMBER}; level {args.level}; timings are noisy on a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
