"""BatchRunner and ``onnxpress run``: input checks, fixed batches, several inputs/outputs, shards, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import parse, run_ort
from hypothesis import given
from hypothesis import strategies as st
from onnxpress.runtime import BatchRunner
from onnxpress.runtime.shards import (
    MAX_SHARD_BYTES,
    MIN_SHARD_BYTES,
    SHARDS_PER_RUN,
    default_shard_rows,
    manifest_text,
    read_manifest,
    read_outputs,
)

from onnxpress.cli import main
from onnxpress.errors import InputError

TWO_IN_TWO_OUT = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 4] a, int64[N, 3] b) => (float[N, 2] y, float[N] z)
<float[4, 2] w = {0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 1.0, -2.0}, int64[1] axis = {1}>
{
    m = MatMul(a, w)
    y = Tanh(m)
    bf = Cast<to = 1>(b)
    s = ReduceSum<keepdims = 0>(bf, axis)
    r = ReduceMax<keepdims = 0>(a, axis)
    z = Add(s, r)
}
"""

FIXED_BATCH = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[4, 3] x) => (float[4, 3] y, float[4] s)
<float[3, 3] w = {1.0, 0.5, -0.5, 0.0, 2.0, 1.0, -1.0, 0.25, 0.75}, int64[1] axis = {1}>
{
    y = MatMul(x, w)
    s = ReduceSum<keepdims = 0>(y, axis)
}
"""

# Heavy enough per batch that a subprocess run spans many shards.
CHAIN = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 64] x) => (float[N, 64] y, float[N, 8] head)
{
    h1 = MatMul(x, w1)
    r1 = Relu(h1)
    h2 = MatMul(r1, w2)
    y = Tanh(h2)
    head = MatMul(y, w3)
}
"""


def chain_model(rng: np.random.Generator) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(CHAIN)
    for name, shape in (("w1", (64, 64)), ("w2", (64, 64)), ("w3", (64, 8))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(
            (rng.standard_normal(shape) / 8).astype(np.float32), name))
    onnx.checker.check_model(proto)
    return proto


def save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, path)
    return path


def two_io_data(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"a": rng.standard_normal((n, 4)).astype(np.float32), "b": rng.integers(-5, 5, (n, 3)).astype(np.int64)}


def test_several_inputs_and_outputs_match_one_big_run(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse(TWO_IN_TWO_OUT)
    model = save(proto, tmp_path / "m.onnx")
    data = two_io_data(rng, 203)
    np.savez(tmp_path / "in.npz", **data, label=np.arange(203))  # an extra array is ignored
    result = BatchRunner(model, batch_size=16).run(tmp_path / "in.npz", tmp_path / "out", shard_rows=40)
    expected = run_ort(proto, data)
    got = read_outputs(tmp_path / "out")
    np.testing.assert_array_equal(got["y"], expected[0])
    np.testing.assert_array_equal(got["z"], expected[1])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["complete"] and manifest["shard_rows"] == 48  # rounded up to whole batches
    assert [s["stop"] - s["start"] for s in manifest["shards"]] == [48, 48, 48, 48, 11]
    assert result.rows == 203 and result.shards == 5


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_stored_and_compressed_stream_the_same_rows(tmp_path: Path, rng: np.random.Generator, compressed: bool) -> None:
    proto = parse(TWO_IN_TWO_OUT)
    model = save(proto, tmp_path / "m.onnx")
    data = two_io_data(rng, 77)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "in.npz", **data)
    BatchRunner(model, batch_size=10).run(tmp_path / "in.npz", tmp_path / "out")
    expected = run_ort(proto, data)
    np.testing.assert_array_equal(read_outputs(tmp_path / "out")["y"], expected[0])


def test_npy_and_folder_of_shards_and_parquet_inputs(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse(FIXED_BATCH.replace("float[4, 3] x", "float[N, 3] x").replace("float[4, 3] y", "float[N, 3] y")
                  .replace("float[4] s", "float[N] s"))
    model = save(proto, tmp_path / "m.onnx")
    x = rng.standard_normal((50, 3)).astype(np.float32)
    expected = run_ort(proto, {"x": x})
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "shards"
    folder.mkdir()
    np.save(folder / "a.npy", x[:17])
    np.savez(folder / "b.npz", x=x[17:30])
    np.savez_compressed(folder / "c.npz", x=x[30:])
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"x": pa.array(x.tolist(), type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=7)
    for i, source in enumerate(("x.npy", "x.parquet")):
        BatchRunner(model, batch_size=8).run(tmp_path / source, tmp_path / f"out{i}")
        np.testing.assert_array_equal(read_outputs(tmp_path / f"out{i}")["y"], expected[0])
    with pytest.raises(InputError, match="same arrays"):
        BatchRunner(model, batch_size=8).run(folder, tmp_path / "bad")
    (folder / "a.npy").unlink()
    np.savez(folder / "a.npz", x=x[:17])
    BatchRunner(model, batch_size=8).run(folder, tmp_path / "out2")
    np.testing.assert_array_equal(read_outputs(tmp_path / "out2")["s"], expected[1])
    pq_folder = tmp_path / "pq"  # Parquet parts as Spark and others name them
    pq_folder.mkdir()
    pq.write_table(table.slice(0, 20), pq_folder / "part-0.pq")
    pq.write_table(table.slice(20), pq_folder / "part-1.pq")
    BatchRunner(model, batch_size=8).run(pq_folder, tmp_path / "out3")
    np.testing.assert_array_equal(read_outputs(tmp_path / "out3")["y"], expected[0])


def test_parquet_output_single_file(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse(TWO_IN_TWO_OUT)
    model = save(proto, tmp_path / "m.onnx")
    data = two_io_data(rng, 33)
    np.savez(tmp_path / "in.npz", **data)
    assert main(["run", str(model), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.parquet"),
                 "--batch-size", "8", "--shard-rows", "8", "--no-progress"]) == 0
    expected = run_ort(proto, data)
    got = read_outputs(tmp_path / "o.parquet")
    np.testing.assert_array_equal(got["y"], expected[0])
    np.testing.assert_array_equal(got["z"], expected[1])
    assert not (tmp_path / "o.parquet.parts").exists()


def test_fixed_batch_model_pads_last_batch_and_trims(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse(FIXED_BATCH)
    model = save(proto, tmp_path / "m.onnx")
    x = rng.standard_normal((10, 3)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    runner = BatchRunner(model, batch_size=32)
    assert runner.batch_size == 4
    runner.run(tmp_path / "in.npz", tmp_path / "out")
    got = read_outputs(tmp_path / "out")
    assert got["y"].shape == (10, 3) and got["s"].shape == (10,)
    padded = np.concatenate([x, np.repeat(x[-1:], 2, axis=0)])
    expected = np.concatenate([run_ort(proto, {"x": padded[i:i + 4]})[0] for i in range(0, 12, 4)])[:10]
    np.testing.assert_array_equal(got["y"], expected)


def test_name_dtype_and_shape_errors_name_the_input(tmp_path: Path, rng: np.random.Generator) -> None:
    model = save(parse(TWO_IN_TWO_OUT), tmp_path / "m.onnx")
    runner = BatchRunner(model)
    good = two_io_data(rng, 5)
    cases = [
        ({"a": good["a"]}, r"needs input 'b' \(int64\[N, 3\]\)"),
        ({"a": good["a"].astype(np.float64), "b": good["b"]}, r"input 'a' is float64, but the model expects float32"),
        ({"a": good["a"][:, :3], "b": good["b"]}, r"input 'a' has size 3 on axis 1, but the model expects 4"),
        ({"a": good["a"][:, :, None], "b": good["b"]}, r"input 'a' has rows of shape \[4, 1\].*rank 2"),
        ({"a": good["a"], "b": good["b"][:4]}, r"different numbers of samples"),
    ]
    for i, (arrays, message) in enumerate(cases):
        np.savez(tmp_path / f"bad{i}.npz", **arrays)
        with pytest.raises(InputError, match=message):
            runner.run(tmp_path / f"bad{i}.npz", tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()  # checked before anything is written
    # int32 into int64 is a safe cast and is accepted
    np.savez(tmp_path / "ok.npz", a=good["a"], b=good["b"].astype(np.int32))
    runner.run(tmp_path / "ok.npz", tmp_path / "ok")
    np.save(tmp_path / "one.npy", good["a"])
    with pytest.raises(InputError, match="one unnamed array, but the model has 2 inputs"):
        runner.run(tmp_path / "one.npy", tmp_path / "out-npy")


def test_named_dimensions_must_agree_across_inputs(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, seq] a, float[N, seq] b) => (float[N, seq] y) { y = Add(a, b) }
    """)
    model = save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", a=rng.standard_normal((3, 5)).astype(np.float32),
             b=rng.standard_normal((3, 6)).astype(np.float32))
    with pytest.raises(InputError, match="dimension 'seq' is 5 in input 'a' but 6 in input 'b'"):
        BatchRunner(model).run(tmp_path / "in.npz", tmp_path / "out")


def test_existing_output_needs_resume_or_force(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse(TWO_IN_TWO_OUT)
    model = save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", **two_io_data(rng, 9))
    args = ["run", str(model), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert main([*args, "--force"]) == 0
    assert main([*args, "--resume"]) == 0  # complete: nothing left to do
    np.savez(tmp_path / "in.npz", **two_io_data(rng, 9))  # the input changed
    with pytest.raises(InputError, match="another input data"):
        BatchRunner(model, batch_size=32).run(tmp_path / "in.npz", tmp_path / "out", resume=True)


def test_resume_after_interrupt_in_process(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = chain_model(rng)
    model = save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((500, 64)).astype(np.float32))
    runner = BatchRunner(model, batch_size=16)
    runner.run(tmp_path / "in.npz", tmp_path / "ref", shard_rows=48)
    stop_at = int(rng.integers(64, 480))  # past the first 48-row shard, so something is committed

    def interrupt(done: int, total: int) -> None:
        if done >= stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(tmp_path / "in.npz", tmp_path / "out", shard_rows=48, progress=interrupt)
    assert not read_manifest(tmp_path / "out")["complete"]
    (tmp_path / "out" / "part-00099.npz").write_bytes(b"half a shard")  # a stray, uncommitted file
    result = runner.run(tmp_path / "in.npz", tmp_path / "out", resume=True)
    assert result.resumed_from > 0 and result.resumed_from % 48 == 0
    assert not (tmp_path / "out" / "part-00099.npz").exists()
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "ref"))
    for name in os.listdir(tmp_path / "ref"):
        if name != "manifest.json":
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_manifest_lists_shards_at_most_once_a_while_and_all_on_close(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between rewrites the manifest lags the shard files; a kill there loses only those shards."""
    import onnxpress.runtime.shards as shards_module

    proto = chain_model(rng)
    model = save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((480, 64)).astype(np.float32))
    runner = BatchRunner(model, batch_size=16)
    runner.run(tmp_path / "in.npz", tmp_path / "ref", shard_rows=48)
    monkeypatch.setattr(shards_module, "MANIFEST_SECONDS", 3600.0)
    seen: list[tuple[int, int]] = []

    def watch(done: int, total: int) -> None:
        files = len(list((tmp_path / "out").glob("part-*.npz")))
        seen.append((files, len(read_manifest(tmp_path / "out")["shards"])))
        if done >= 400:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(tmp_path / "in.npz", tmp_path / "out", shard_rows=48, progress=watch)
    assert max(files for files, _ in seen) >= 5
    assert {listed for _, listed in seen} == {0}  # the manifest written at the start, not again for an hour
    manifest = read_manifest(tmp_path / "out")  # close() listed every shard written
    assert not manifest["complete"]
    assert [s["file"] for s in manifest["shards"]] == sorted(p.name for p in (tmp_path / "out").glob("part-*.npz"))
    assert manifest["shards"][-1]["stop"] >= 384
    result = runner.run(tmp_path / "in.npz", tmp_path / "out", resume=True)
    assert result.resumed_from == manifest["shards"][-1]["stop"]
    assert read_manifest(tmp_path / "out")["complete"]
    for name in os.listdir(tmp_path / "ref"):
        if name != "manifest.json":
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def _wait_for_shards(folder: Path, count: int, proc: subprocess.Popen, since_ns: int, timeout: float = 60.0) -> bool:
    """Waits until the run has written ``count`` shard files since ``since_ns``; False when it ended first.

    Shard files, not the manifest: a short run lists its shards in the manifest at most once a
    second (``MANIFEST_SECONDS``), so the manifest alone would let it finish unkilled.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            written = [p for p in folder.glob("part-*.npz") if p.stat().st_mtime_ns >= since_ns]
        except OSError:  # a file renamed or removed while listed
            continue
        if len(written) >= count:
            return True
        time.sleep(0.002)
    raise AssertionError("the run made no progress")


def test_resume_after_sigkill_at_random_points_is_identical(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = chain_model(rng)
    model = save(proto, tmp_path / "m.onnx")
    rows = 3200
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((rows, 64)).astype(np.float32))
    reference = tmp_path / "ref"
    BatchRunner(model, batch_size=32).run(tmp_path / "in.npz", reference, shard_rows=32)
    shards = len(read_manifest(reference)["shards"])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "onnxpress", "run", str(model), "--input", str(tmp_path / "in.npz"),
           "--output", str(out), "--batch-size", "32", "--shard-rows", "32", "--no-progress"]
    kills = 0
    done = 0
    for attempt in range(2):
        target = int(rng.integers(1, max(2, 1 + (shards - done) // 3)))
        since = time.time_ns()  # shard files left by the killed run are older
        proc = subprocess.Popen([*cmd, *(["--resume"] if attempt else [])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if _wait_for_shards(out, target, proc, since):
            time.sleep(float(rng.uniform(0, 0.01)))  # land anywhere: inside a batch, a shard write, the manifest
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        done = len(read_manifest(out)["shards"])
    assert kills >= 1
    final = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["shards"] == read_manifest(reference)["shards"]
    for shard in manifest["shards"]:
        assert (out / shard["file"]).read_bytes() == (reference / shard["file"]).read_bytes()
    got = read_outputs(out)
    expected = read_outputs(reference)
    assert got["y"].shape == (rows, 64)
    np.testing.assert_array_equal(got["y"], expected["y"])
    np.testing.assert_array_equal(got["head"], expected["head"])


def test_resume_before_the_first_manifest_starts_fresh(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse(TWO_IN_TWO_OUT)
    model = save(proto, tmp_path / "m.onnx")
    data = two_io_data(rng, 21)
    np.savez(tmp_path / "in.npz", **data)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".manifest.json.x1y2.tmp").write_bytes(b"{")  # killed while writing the first manifest
    BatchRunner(model, batch_size=4).run(tmp_path / "in.npz", out, resume=True)
    np.testing.assert_array_equal(read_outputs(out)["y"], run_ort(proto, data)[0])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        BatchRunner(model, batch_size=4).run(tmp_path / "in.npz", tmp_path / "other", resume=True)


def test_output_without_a_sample_axis_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    proto = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 3] x) => (float total) { total = ReduceSum<keepdims = 0>(x) }
    """)
    model = save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((10, 3)).astype(np.float32))
    with pytest.raises(InputError, match=r"output 'total' is a scalar \(rank 0\)"):
        BatchRunner(model, batch_size=4).run(tmp_path / "in.npz", tmp_path / "out")


@pytest.mark.parametrize(("row_bytes", "rows", "batch"), [(40, 200_000, 256), (64, 250_000, 512),
                                                          (1536, 1_000_000, 32), (4, 100, 8), (10**7, 50, 4)])
def test_default_shards_are_a_64th_of_the_output_within_bounds(row_bytes: int, rows: int, batch: int) -> None:
    shard_rows = default_shard_rows(row_bytes, rows, batch)
    assert shard_rows % batch == 0 and shard_rows >= batch
    shard_bytes = shard_rows * row_bytes
    wanted = min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, row_bytes * rows // SHARDS_PER_RUN))
    if batch * row_bytes <= wanted:  # whole batches of at most the wanted size, one batch short at worst
        assert wanted - batch * row_bytes < shard_bytes <= wanted
    else:  # a batch alone is bigger: one batch a shard
        assert shard_rows == batch


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_manifest_checksums_are_the_files_on_disk(tmp_path: Path, rng: np.random.Generator, fmt: str) -> None:
    """Checksums come from the one writing pass: ``.npz`` shards list their members' CRC-32, Parquet ones a SHA-256."""
    import hashlib
    import zipfile
    import zlib

    from onnxpress.runtime.shards import iter_shards

    proto = parse(TWO_IN_TWO_OUT)
    model = save(proto, tmp_path / "m.onnx")
    data = two_io_data(rng, 45)
    np.savez(tmp_path / "in.npz", **data)
    out = tmp_path / "out"
    BatchRunner(model, batch_size=8).run(tmp_path / "in.npz", out, shard_rows=16, output_format=fmt)
    manifest = read_manifest(out)
    assert [s["stop"] - s["start"] for s in manifest["shards"]] == [16, 16, 13]
    for shard in manifest["shards"]:
        raw = (out / shard["file"]).read_bytes()
        assert shard["bytes"] == len(raw)
        if fmt == "npz":
            assert "sha256" not in shard
            with zipfile.ZipFile(out / shard["file"]) as archive:
                assert shard["crc32"] == {n: zlib.crc32(archive.read(n)) for n in ("y.npy", "z.npy")}
        else:
            assert "crc32" not in shard
            assert shard["sha256"] == hashlib.sha256(raw).hexdigest()
    expected = run_ort(proto, data)
    parts = list(iter_shards(out, verify=True))
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), expected[0])
    np.testing.assert_array_equal(np.concatenate([p["z"] for p in parts]), expected[1])


def test_default_shards_cut_the_final_stretch_into_quarters_and_resume_identically(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default sizing: the last shard_rows rows go out as quarter shards (a small last write)."""
    from onnxpress.runtime import shards

    monkeypatch.setattr(shards, "MIN_SHARD_BYTES", 288 * 64)  # 64 rows of the chain model's 72 floats
    model = save(chain_model(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((500, 64)).astype(np.float32))
    runner = BatchRunner(model, batch_size=8)
    runner.run(tmp_path / "in.npz", tmp_path / "ref")
    manifest = read_manifest(tmp_path / "ref")
    assert (manifest["shard_rows"], manifest["tail_rows"]) == (64, 16)
    assert [s["stop"] - s["start"] for s in manifest["shards"]] == [64] * 7 + [16, 16, 16, 4]
    for stop_at in (200, 470):  # before the final stretch, and inside it

        def interrupt(done: int, total: int, stop_at: int = stop_at) -> None:
            if done >= stop_at:
                raise KeyboardInterrupt

        out = tmp_path / f"out{stop_at}"
        with pytest.raises(KeyboardInterrupt):
            runner.run(tmp_path / "in.npz", out, progress=interrupt)
        assert runner.run(tmp_path / "in.npz", out, resume=True).resumed_from > 0
        assert read_manifest(out)["shards"] == manifest["shards"]


@pytest.mark.parametrize("damage", ["flip", "flip-listed-crc", "truncate", "delete"])
def test_resume_recomputes_from_the_first_damaged_shard(tmp_path: Path, rng: np.random.Generator,
                                                        caplog: pytest.LogCaptureFixture, damage: str) -> None:
    """A committed shard that was damaged after the fact (same size, other bytes; cut short;
    gone) is found by its CRC-32s on resume: the shards before it are kept, the rows from it
    on are computed again, and the outputs equal an uninterrupted run's, byte for byte."""
    model = save(chain_model(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((300, 64)).astype(np.float32))
    runner = BatchRunner(model, batch_size=16)
    runner.run(tmp_path / "in.npz", tmp_path / "ref", shard_rows=48)
    runner.run(tmp_path / "in.npz", tmp_path / "out", shard_rows=48)
    shards = read_manifest(tmp_path / "out")["shards"]
    bad = int(rng.integers(1, len(shards) - 1))
    kept_mtime = (tmp_path / "out" / shards[bad - 1]["file"]).stat().st_mtime_ns
    path = tmp_path / "out" / shards[bad]["file"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # inside an array's bytes: the zip still opens
        path.write_bytes(bytes(data))
    elif damage == "flip-listed-crc":  # the central directory's CRC-32 of the first member
        import zipfile

        with zipfile.ZipFile(path) as archive:
            data[archive.start_dir + 16] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    with caplog.at_level("WARNING", logger="onnxpress.runtime.shards"):
        result = runner.run(tmp_path / "in.npz", tmp_path / "out", resume=True)
    assert result.resumed_from == shards[bad]["start"]
    assert shards[bad]["file"] in caplog.text
    assert (tmp_path / "out" / shards[bad - 1]["file"]).stat().st_mtime_ns == kept_mtime  # not rewritten
    assert read_manifest(tmp_path / "out")["complete"]
    assert read_manifest(tmp_path / "out")["shards"] == read_manifest(tmp_path / "ref")["shards"]
    for shard in shards:
        assert (tmp_path / "out" / shard["file"]).read_bytes() == (tmp_path / "ref" / shard["file"]).read_bytes()


def test_resume_reads_a_format_1_manifest_and_checks_its_sha256(tmp_path: Path, rng: np.random.Generator) -> None:
    """Runs interrupted before format 2 listed every shard with a SHA-256; resuming them checks those."""
    import hashlib

    model = save(chain_model(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((300, 64)).astype(np.float32))
    runner = BatchRunner(model, batch_size=16)
    runner.run(tmp_path / "in.npz", tmp_path / "ref", shard_rows=48)
    out = tmp_path / "out"
    runner.run(tmp_path / "in.npz", out, shard_rows=48)
    manifest = read_manifest(out)
    manifest["format"], manifest["complete"] = "onnxpress-run/1", False
    for shard in manifest["shards"]:
        del shard["crc32"]
        shard["sha256"] = hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    manifest["shards"][3]["sha256"] = "0" * 64  # this one no longer matches
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = runner.run(tmp_path / "in.npz", out, resume=True)
    assert result.resumed_from == manifest["shards"][3]["start"]
    resumed = read_manifest(out)
    assert resumed["format"] == "onnxpress-run/2" and resumed["complete"]
    assert [("sha256" in s, "crc32" in s) for s in resumed["shards"]] == [(True, False)] * 3 + [(False, True)] * (
        len(resumed["shards"]) - 3)
    for shard in read_manifest(tmp_path / "ref")["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "ref" / shard["file"]).read_bytes()


@given(st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8), max_size=5),
    st.lists(st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6), max_size=4), max_size=4))
def test_manifest_text_is_the_manifest_as_json_with_a_shard_per_line(
    manifest: dict[str, object], shard_list: list[dict[str, object]]
) -> None:
    manifest = {**manifest, "shards": shard_list}
    text = manifest_text(manifest)
    assert json.loads(text) == manifest
    assert list(json.loads(text)) == list(manifest)  # key order kept
    lines = text.splitlines()
    for shard in shard_list:
        assert any(line.strip().rstrip(",") == json.dumps(shard) for line in lines)


def test_shard_writer_refuses_a_batch_with_other_outputs(tmp_path: Path) -> None:
    from onnxpress.runtime.shards import ShardWriter

    writer = ShardWriter.open(tmp_path / "out", fingerprint={}, resume=False, force=False, output_format="npz",
                              batch_size=2, shard_rows=4, total_rows=8)
    writer.add({"y": np.zeros((2, 3), np.float32), "z": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match=r"outputs \['y'\] differ from the first batch's \['y', 'z'\]"):
        writer.add({"y": np.zeros((2, 3), np.float32)})
    writer.add({"z": np.ones(2, np.int64), "y": np.ones((2, 3), np.float32)})  # the same names in another order
    writer.close()
    shard = np.load(tmp_path / "out" / "part-00000.npz")
    np.testing.assert_array_equal(shard["y"], np.r_[np.zeros((2, 3)), np.ones((2, 3))])
    np.testing.assert_array_equal(shard["z"], [0, 0, 1, 1])


def test_close_keeps_going_when_the_manifest_cannot_be_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping early (Ctrl-C, an error) lists the shards written since the last rewrite; when even
    that fails (a full disk), the manifest is only behind, and the error being handled stays the one raised."""
    import onnxpress.runtime.shards as shards_module
    from onnxpress.runtime.shards import ShardWriter

    monkeypatch.setattr(shards_module, "MANIFEST_SECONDS", 3600.0)
    writer = ShardWriter.open(tmp_path / "out", fingerprint={}, resume=False, force=False, output_format="npz",
                              batch_size=2, shard_rows=2, total_rows=8)
    for _ in range(2):
        writer.add({"y": np.zeros((2, 3), np.float32)})
    writer._wait()

    def full_disk(self: ShardWriter, *, sync: bool = True) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_write_manifest", full_disk)
    with caplog.at_level("WARNING", logger="onnxpress.runtime.shards"):
        writer.close()
    assert "could not list the last shards written" in caplog.text and "No space left" in caplog.text
    assert read_manifest(tmp_path / "out")["shards"] == []
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == ["part-00000.npz", "part-00001.npz"]


@given(
    st.sampled_from(["float32", "float16", "float64", "int8", "uint8", "int64", "bool"]),
    st.lists(st.integers(0, 4), min_size=0, max_size=3),
    st.lists(st.integers(1, 40), min_size=1, max_size=12),
    st.integers(1, 4096),
)
def test_write_npz_of_row_blocks_is_savez_of_their_concatenation(
    dtype: str, row_shape: list[int], block_rows: list[int], gather_bytes: int
) -> None:
    """Blocks written one after the other through a gather buffer of any size give, member for
    member, the bytes ``numpy.savez`` writes for the joined array (what a reader gets back)."""
    import io
    import zipfile

    from onnxpress.runtime.shards import write_npz

    rng = np.random.default_rng(len(block_rows) * 7919 + gather_bytes)
    blocks = [(rng.standard_normal((n, *row_shape)) * 50).astype(dtype) for n in block_rows]
    joined = np.concatenate(blocks)
    ours, theirs = io.BytesIO(), io.BytesIO()
    crcs = write_npz(ours, {"y": blocks, "z": joined[:, None]}, scratch=bytearray(gather_bytes))
    np.savez(theirs, y=joined, z=joined[:, None])
    with zipfile.ZipFile(ours) as mine, zipfile.ZipFile(theirs) as reference:
        assert mine.namelist() == reference.namelist() == ["y.npy", "z.npy"]
        for name in mine.namelist():
            assert mine.read(name) == reference.read(name)
            assert crcs[name] == reference.getinfo(name).CRC
