"""Input readers: every format returns the same rows for any slice, and bad files name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxpress.errors import InputError
from onnxpress.runtime.data import open_source


def _slices(rng: np.random.Generator, rows: int, count: int = 12) -> list[tuple[int, int]]:
    starts = rng.integers(0, rows, count)
    return [(int(s), int(min(rows, s + rng.integers(1, 40)))) for s in starts]


def test_every_format_reads_the_same_rows(tmp_path: Path, rng: np.random.Generator) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 123
    x = rng.standard_normal((rows, 3, 4)).astype(np.float32)
    ids = rng.integers(0, 1000, (rows, 5)).astype(np.int64)
    np.savez(tmp_path / "stored.npz", x=x, ids=ids)
    np.savez_compressed(tmp_path / "deflated.npz", x=x, ids=ids)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (lo, hi) in enumerate(((0, 50), (50, 51), (51, rows))):
        (np.savez if i % 2 else np.savez_compressed)(folder / f"part{i}.npz", x=x[lo:hi], ids=ids[lo:hi])
    table = pa.table({"x": pa.array(x.tolist(), type=pa.list_(pa.list_(pa.float32()))),
                      "ids": pa.array(ids.tolist(), type=pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=17)
    for name in ("stored.npz", "deflated.npz", "folder", "data.parquet"):
        source = open_source(tmp_path / name)
        assert source.num_rows == rows
        assert source.specs["x"].row_shape == (3, 4) and source.specs["x"].dtype == np.float32
        assert source.specs["ids"].row_shape == (5,) and source.specs["ids"].dtype == np.int64
        for lo, hi in _slices(rng, rows):  # random order: the compressed stream must reopen to go back
            got = source.read(lo, hi)
            np.testing.assert_array_equal(got["x"], x[lo:hi], err_msg=name)
            np.testing.assert_array_equal(got["ids"], ids[lo:hi], err_msg=name)
            assert got["x"].flags.c_contiguous
        source.close()


def test_npy_c_and_fortran_order(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.standard_normal((40, 6)).astype(np.float64)
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    for name in ("c.npy", "f.npy"):
        source = open_source(tmp_path / name, ["inp"])
        assert list(source.specs) == ["inp"]
        for lo, hi in _slices(rng, 40):
            np.testing.assert_array_equal(source.read(lo, hi)["inp"], x[lo:hi])
        source.close()


def test_bad_files_name_the_problem(tmp_path: Path, rng: np.random.Generator) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = rng.standard_normal((10, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-8])
    with pytest.raises(InputError, match="truncated"):
        open_source(tmp_path / "short.npy", ["x"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        open_source(tmp_path / "junk.npz")
    with pytest.raises(InputError, match="unknown data format '.csv'"):
        (tmp_path / "a.csv").write_text("1,2")
        open_source(tmp_path / "a.csv")
    with pytest.raises(InputError, match="no such data file"):
        open_source(tmp_path / "missing.npz")
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    with pytest.raises(InputError, match="lists of different lengths"):
        open_source(tmp_path / "ragged.parquet")
    np.savez(tmp_path / "scalar.npz", x=np.float32(3))
    with pytest.raises(InputError, match="scalar"):
        open_source(tmp_path / "scalar.npz")
