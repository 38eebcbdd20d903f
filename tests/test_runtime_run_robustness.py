"""``onnxpress run`` on models and data the runner was not written for: each test is a bug the sweep found.

Every case either succeeds with outputs bit-identical to onnxruntime over the same batches, or
fails with exit status 2 and one line naming the input and what was expected -- no traceback,
no silent wrong result, nothing under the final output name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import parse, run_ort
from onnxpress.cli import main
from onnxpress.errors import InputError
from onnxpress.runtime import BatchRunner
from onnxpress.runtime.shards import read_manifest, read_outputs

SCALE = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 3] v, int64[N] c) => (float[N, 3] y)
<int64[1] one = {1}>
{
    cf = Cast<to = 1>(c)
    cu = Unsqueeze(cf, one)
    y = Mul(v, cu)
}
"""


def save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, path)
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Runs ``onnxpress run`` in-process; returns the exit status and stderr."""
    rc = main(["run", *map(str, args), "--no-progress"])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxpress run: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def scale_data(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"v": rng.standard_normal((n, 3)).astype(np.float32), "c": rng.integers(-4, 5, n)}


def test_arrays_and_columns_the_model_does_not_take_are_never_read(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: a scalar or object array, or a text column, beside the inputs stopped the run.
    proto = parse(SCALE)
    model = save(proto, tmp_path / "m.onnx")
    data = scale_data(rng, 23)
    expected = run_ort(proto, data)[0]
    np.savez(tmp_path / "a.npz", **data, version=np.array(3), label=np.arange(5),
             meta=np.array([{"k": 1}], dtype=object))
    np.savez_compressed(tmp_path / "b.npz", **data, version=np.array(3))
    pq.write_table(pa.table({"v": pa.array(list(data["v"])), "c": data["c"], "id": [f"r{i}" for i in range(23)]}),
                   tmp_path / "c.parquet", row_group_size=8)
    for name in ("a.npz", "b.npz", "c.parquet"):
        BatchRunner(model, batch_size=5).run(tmp_path / name, tmp_path / f"out-{name}")
        np.testing.assert_array_equal(read_outputs(tmp_path / f"out-{name}")["y"], expected)
    # A missing input's message still lists every array, also those left unread.
    np.savez(tmp_path / "renamed.npz", v=data["v"], count=data["c"])
    with pytest.raises(InputError, match=r"needs input 'c' \(int64\[N\]\), but the data holds only \['count', 'v'\]"):
        BatchRunner(model).run(tmp_path / "renamed.npz", tmp_path / "out-renamed")
    # An input that is itself unreadable is still refused, naming it.
    np.savez(tmp_path / "bad.npz", v=data["v"], c=np.array([None] * 23, dtype=object))
    with pytest.raises(InputError, match=r"bad.npz: member 'c.npy' holds Python objects"):
        BatchRunner(model).run(tmp_path / "bad.npz", tmp_path / "out-bad")


def test_zero_rows_are_refused_and_nothing_is_written(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: an empty, "complete" shard folder, and a 0-byte (invalid) .parquet file.
    model = save(parse(SCALE), tmp_path / "m.onnx")
    np.savez(tmp_path / "empty.npz", **scale_data(rng, 0))
    for out in ("out", "out.parquet"):
        rc, err = cli(capsys, model, "--input", tmp_path / "empty.npz", "--output", tmp_path / out)
        assert_one_line_error(rc, err, "empty.npz", "no rows")
        assert not (tmp_path / out).exists()


def test_parquet_output_that_is_a_folder_is_refused(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: IsADirectoryError from the final rename, after the whole run.
    model = save(parse(SCALE), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", **scale_data(rng, 9))
    (tmp_path / "out.parquet").mkdir()
    (tmp_path / "out.parquet" / "keep.txt").write_text("mine")
    rc, err = cli(capsys, model, "--input", tmp_path / "in.npz", "--output", tmp_path / "out.parquet", "--force")
    assert_one_line_error(rc, err, "out.parquet", "is a folder")
    assert (tmp_path / "out.parquet" / "keep.txt").read_text() == "mine"


def test_parquet_row_groups_must_agree_on_the_row_shape(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a later row group whose lists are all shorter passed the per-group check and
    # broke a concatenation (ValueError) -- or, for a dynamic dimension, fed the model rows of another shape.
    dynamic = save(parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, L] v, int64[N] c) => (float[N, L] y) { y = Neg(v) }
    """), tmp_path / "dyn.onnx")
    v = rng.standard_normal((24, 3)).astype(np.float32)
    cells = [list(row) if i < 8 else list(row[:2]) for i, row in enumerate(v)]
    pq.write_table(pa.table({"v": pa.array(cells, pa.list_(pa.float32())), "c": np.arange(24)}),
                   tmp_path / "in.parquet", row_group_size=8)
    for model in (dynamic, save(parse(SCALE), tmp_path / "fixed.onnx")):
        rc, err = cli(capsys, model, "--input", tmp_path / "in.parquet", "--output", tmp_path / f"out-{model.stem}",
                      "--batch-size", "5")
        assert_one_line_error(rc, err, "in.parquet", "column 'v'", "row group 1")


def test_scalar_model_input_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: rows were fed to the rank-0 input and onnxruntime failed with a traceback.
    model = save(parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3] a, float t) => (float[N, 3] y) { y = Mul(a, t) }
    """), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", a=rng.standard_normal((10, 3)).astype(np.float32), t=np.ones(10, np.float32))
    with pytest.raises(InputError, match=r"input 't' is a scalar \(float32\[\]\)"):
        BatchRunner(model).run(tmp_path / "in.npz", tmp_path / "out")


def test_a_fixed_batch_on_one_input_fixes_it_for_all(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: only a batch fixed on *every* input was used; batches of 32 hit onnxruntime's shape check.
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[4, 3] x, float[N] w) => (float[4, 3] y) {
            wu = Unsqueeze(w, one)
            y = Mul(x, wu)
        }
    """.replace("{\n", "<int64[1] one = {1}> {\n", 1))
    model = save(proto, tmp_path / "m.onnx")
    x = rng.standard_normal((10, 3)).astype(np.float32)
    w = rng.standard_normal(10).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, w=w)
    runner = BatchRunner(model, batch_size=32)
    assert runner.batch_size == 4
    runner.run(tmp_path / "in.npz", tmp_path / "out")
    pad = np.concatenate([np.arange(10), [9, 9]])  # the last batch repeats its last row
    expected = np.concatenate([run_ort(proto, {"x": x[pad[i:i + 4]], "w": w[pad[i:i + 4]]})[0] for i in (0, 4, 8)])[:10]
    np.testing.assert_array_equal(read_outputs(tmp_path / "out")["y"], expected)
    two = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[4, 3] x, float[2] w) => (float[4, 3] y) { y = Identity(x) }
    """)
    with pytest.raises(InputError, match=r"fix different batch sizes \('x': float32\[4, 3\], 'w': float32\[2\]\)"):
        BatchRunner(save(two, tmp_path / "two.onnx"))


@pytest.mark.parametrize("output", ["out", "out.parquet"])
def test_outputs_whose_shape_depends_on_the_data_are_refused(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    # Before: ValueError from np.concatenate in the shard writer thread.
    model = save(parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 8] x, int64[N] k) => (float[N, M] v) {
            kk = ReduceMax<keepdims = 1>(k)
            v, i = TopK(x, kk)
        }
    """), tmp_path / "m.onnx")
    k = np.full(20, 3)
    k[7] = 6  # the second batch of 5 keeps 6 columns
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((20, 8)).astype(np.float32), k=k)
    rc, err = cli(capsys, model, "--input", tmp_path / "in.npz", "--output", tmp_path / output, "--batch-size", "5")
    assert_one_line_error(rc, err, "output 'v'", "float32[6] in rows 5-10", "float32[3] before")
    if output.endswith(".parquet"):
        assert not (tmp_path / output).exists()
    else:
        assert not read_manifest(tmp_path / output)["complete"]


def test_outputs_declared_without_a_sample_axis_are_refused(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: with a batch of 3, [3, N] passed the row-count check and was written
    # transposed, silently; NonZero's [2, K] failed in the writer thread.
    transposed = save(parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3] x) => (float[3, N] y) { y = Transpose(x) }
    """), tmp_path / "t.onnx")
    nonzero = save(parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3] x) => (int64[2, K] nz) { nz = NonZero(x) }
    """), tmp_path / "nz.onnx")
    np.save(tmp_path / "x.npy", (rng.random((9, 3)) > 0.5).astype(np.float32))
    for model, name, declared in ((transposed, "y", "float32[3, N]"), (nonzero, "nz", "int64[2, K]")):
        rc, err = cli(capsys, model, "--input", tmp_path / "x.npy", "--output", tmp_path / f"out-{name}",
                      "--batch-size", "3")
        assert_one_line_error(rc, err, f"output {name!r} is declared {declared}", "not the samples")
        assert not (tmp_path / f"out-{name}").exists()


def test_onnxruntime_errors_name_the_rows_in_one_line(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: onnxruntime's InvalidArgument escaped as a traceback (after its own log line).
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (int64[N, 4] ids) => (float[N, 4, 2] e) { e = Gather<axis = 0>(table, ids) }
    """.replace("{ e", "<float[10, 2] table = {0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19}> { e"))
    model = save(proto, tmp_path / "m.onnx")
    ids = rng.integers(0, 10, (12, 4))
    ids[9, 2] = 50
    np.save(tmp_path / "ids.npy", ids)
    rc, err = cli(capsys, model, "--input", tmp_path / "ids.npy", "--output", tmp_path / "out", "--batch-size", "4")
    assert_one_line_error(rc, err, "ids.npy: rows 8-12", "onnxruntime cannot run the model", "idx=50")
    manifest = read_manifest(tmp_path / "out")
    assert not manifest["complete"]


@pytest.mark.parametrize(("graph", "kind"), [
    ("g (float[N, 2] x) => (string[N, 2] s) { s = Cast<to = 8>(x) }", "tensor(string)"),
    ("g (float[N, 2] x) => (optional(float[N, 2]) s) { s = Optional(x) }", "optional(tensor(float))"),
    ("g (float[N, 2] x) => (seq(float[N, 2]) s) { s = SequenceConstruct(x, x) }", "seq(tensor(float))"),
])
def test_outputs_that_are_not_numeric_tensors_are_refused(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str], graph: str, kind: str
) -> None:
    # Before: a string output failed in the writer thread (ValueError), an optional one was written as a tensor.
    model = save(parse('<ir_version: 8, opset_import: ["" : 18]>\n' + graph), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((5, 2)).astype(np.float32))
    rc, err = cli(capsys, model, "--input", tmp_path / "x.npy", "--output", tmp_path / "out")
    assert_one_line_error(rc, err, f"output 's' has type {kind}")
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_model_whose_external_data_changed(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: only the .onnx file was fingerprinted; new weights beside it were mixed into the run.
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 16] x) => (float[N, 16] y) { y = MatMul(x, w) }
    """)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"))
    model = tmp_path / "m.onnx"
    onnx.save(proto, model, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    np.save(tmp_path / "x.npy", rng.standard_normal((40, 16)).astype(np.float32))
    BatchRunner(model, batch_size=5).run(tmp_path / "x.npy", tmp_path / "out", shard_rows=10)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False  # as if killed after two shards
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    data = tmp_path / "m.onnx.data"
    weights = np.frombuffer(data.read_bytes(), np.float32)
    data.write_bytes((weights * 2).tobytes())  # same size, new weights
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    with pytest.raises(InputError, match=r"the run there used another model"):
        BatchRunner(model, batch_size=5).run(tmp_path / "x.npy", tmp_path / "out", resume=True)


def test_outputs_with_zero_width_rows_go_to_parquet(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: pyarrow.lib.ArrowInvalid (a fixed-size list of size 0) from the shard writer thread.
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3] v) => (float[N, 0] z, float[N, 3] y)
        <int64[1] zero = {0}, int64[1] one = {1}>
        {
            z = Slice(v, zero, zero, one)
            y = Neg(v)
        }
    """)
    model = save(proto, tmp_path / "m.onnx")
    v = rng.standard_normal((11, 3)).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    z, y = run_ort(proto, {"v": v})
    assert z.shape == (11, 0)
    runner = BatchRunner(model, batch_size=4)
    runner.run(tmp_path / "v.npy", tmp_path / "out.parquet")
    runner.run(tmp_path / "v.npy", tmp_path / "shards", output_format="parquet")
    for out in ("out.parquet", "shards"):
        got = read_outputs(tmp_path / out)
        assert got["z"].shape == (11, 0) and got["z"].dtype == np.float32
        np.testing.assert_array_equal(got["y"], y)


def test_every_batch_is_checked_for_a_sample_axis(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: only the first batch was checked: a [3] output of unknown shape (a Range of the
    # row width + 1) passed for a batch of 3 rows and was written as the rows of the 1-row last batch, silently.
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 2] x) => (float[N, 2] y, int64[K] c)
        <int64 zero = {0}, int64 one = {1}>
        {
            y = Neg(x)
            shape = Shape(x)
            width = Gather<axis = 0>(shape, one)
            limit = Add(width, one)
            c = Range(zero, limit, one)
        }
    """)
    model = save(proto, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 2)).astype(np.float32))
    with pytest.raises(InputError, match=r"output 'c' has shape \[3\] for a batch of 1 rows \(rows 3-4\)"):
        BatchRunner(model, batch_size=3).run(tmp_path / "x.npy", tmp_path / "out")


def test_parquet_with_empty_row_groups(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: an empty row group's list column read as rows of shape [0] and broke the
    # concatenation with its neighbours (ValueError).
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3] x) => (float[N, 3] y) { y = Neg(x) }
    """)
    model = save(proto, tmp_path / "m.onnx")
    x = rng.standard_normal((29, 3)).astype(np.float32)
    schema = pa.schema([("x", pa.list_(pa.float32()))])
    with pq.ParquetWriter(tmp_path / "in.parquet", schema) as writer:
        for rows in (x[:0], x[:15], x[:0], x[15:], x[:0]):
            writer.write_table(pa.table({"x": pa.array(list(rows), pa.list_(pa.float32()))}, schema=schema))
    assert pq.ParquetFile(tmp_path / "in.parquet").metadata.num_row_groups == 5
    BatchRunner(model, batch_size=4).run(tmp_path / "in.parquet", tmp_path / "out")
    np.testing.assert_array_equal(read_outputs(tmp_path / "out")["y"], run_ort(proto, {"x": x})[0])


def test_resume_of_a_finished_parquet_output_is_a_no_op(tmp_path: Path, rng: np.random.Generator) -> None:
    # Before: `--resume` on a .parquet output that had finished (or was killed between publishing
    # the file and removing its shard folder) failed with "the output already exists".
    proto = parse(SCALE)
    model = save(proto, tmp_path / "m.onnx")
    data = scale_data(rng, 30)
    np.savez(tmp_path / "in.npz", **data)
    output = tmp_path / "out.parquet"
    BatchRunner(model, batch_size=7).run(tmp_path / "in.npz", output)
    written = output.read_bytes()
    result = BatchRunner(model, batch_size=7).run(tmp_path / "in.npz", output, resume=True)
    assert result.rows_computed == 0 and output.read_bytes() == written
    # As if killed after the rename: the complete shard folder is still there.
    BatchRunner(model, batch_size=7).run(tmp_path / "in.npz", tmp_path / "out.parquet.parts", output_format="parquet")
    BatchRunner(model, batch_size=7).run(tmp_path / "in.npz", output, resume=True)
    assert not (tmp_path / "out.parquet.parts").exists()
    np.testing.assert_array_equal(read_outputs(output)["y"], run_ort(proto, data)[0])
    # Another batch size (or model, or input) is not the same run: refused, the file kept.
    with pytest.raises(InputError, match=r"out.parquet: the output already exists"):
        BatchRunner(model, batch_size=8).run(tmp_path / "in.npz", output, resume=True)
    assert output.read_bytes() == written


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_force_keeps_the_earlier_outputs_until_the_new_run_completes(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: --force deleted the earlier run's shards before the new run started, so a new run
    that failed half-way lost both."""
    from onnxpress.runtime.shards import ShardWriter, replaced_path, run_fingerprint

    model = save(parse(SCALE), tmp_path / "m.onnx")
    np.savez(tmp_path / "old.npz", **scale_data(rng, 40))
    np.savez(tmp_path / "new.npz", **scale_data(rng, 64))
    runner = BatchRunner(model, batch_size=8)
    out = tmp_path / "out"
    runner.run(tmp_path / "old.npz", out, shard_rows=16)
    before = _folder_bytes(out)

    def fail(done: int, total: int) -> None:
        if done >= 40:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        runner.run(tmp_path / "new.npz", out, shard_rows=16, force=True, progress=fail)
    assert _folder_bytes(out) == before and not replaced_path(out).exists()

    # killed half-way (nothing could put the old outputs back): both are kept, and a resumed run
    # that completes removes the old ones
    ShardWriter.open(out, fingerprint=run_fingerprint(model, tmp_path / "new.npz", 64, 8), resume=False,
                     force=True, output_format="npz", batch_size=8, shard_rows=16, total_rows=64)
    assert _folder_bytes(replaced_path(out)) == before
    # forced again: the set-aside outputs are the last complete ones and stay; the partial run goes
    ShardWriter.open(out, fingerprint=run_fingerprint(model, tmp_path / "new.npz", 64, 8), resume=False,
                     force=True, output_format="npz", batch_size=8, shard_rows=16, total_rows=64)
    assert _folder_bytes(replaced_path(out)) == before and os.listdir(out) == ["manifest.json"]
    runner.run(tmp_path / "new.npz", out, shard_rows=16, resume=True)
    assert not replaced_path(out).exists()
    got = read_outputs(out)["y"]
    np.testing.assert_array_equal(got, run_ort(parse(SCALE), dict(np.load(tmp_path / "new.npz")))[0])

    # a forced run that completes replaces the outputs and leaves nothing beside them
    runner.run(tmp_path / "old.npz", out, shard_rows=16, force=True)
    assert _folder_bytes(out) == before and not replaced_path(out).exists()


def test_a_padded_fixed_batch_keeps_scalar_outputs_whole(tmp_path: Path, rng: np.random.Generator) -> None:
    """Was: trimming the padded rows sliced every output, and a scalar output raised IndexError."""
    proto = parse("""
<ir_version: 8, opset_import: ["" : 18]>
g (float[4, 3] x) => (float[4, 3] y, float total)
{
    y = Relu(x)
    total = ReduceSum<keepdims = 0>(x)
}
""")
    runner = BatchRunner(save(proto, tmp_path / "m.onnx"), batch_size=4)
    x = rng.standard_normal((3, 3)).astype(np.float32)
    got = runner.run_batch({"x": x})
    padded = np.concatenate([x, x[-1:]])
    np.testing.assert_array_equal(got["y"], np.maximum(x, 0))
    assert got["total"].shape == () and got["total"] == run_ort(proto, {"x": padded})[1]
