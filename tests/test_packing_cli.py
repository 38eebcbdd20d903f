"""``onnxpress pack``, ``unpack``, ``compress --pack`` and the runtime commands on ``.onnxz``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import onnxpress
from onnxpress.cli import main
from onnxpress.models.digits import digits_cnn_path, load_digits_test
from onnxpress.packing import PackedModel
from conftest import assert_bit_identical


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "digits.onnx"
    shutil.copy(digits_cnn_path(), path)
    return path


def _feeds() -> dict[str, np.ndarray]:
    images, _ = load_digits_test()
    return {"image": images[np.random.default_rng(0).choice(len(images), size=8, replace=False)]}


def test_pack_and_unpack_commands_round_trip(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pack", str(model), "--no-progress"]) == 0
    packed = model.with_suffix(".onnxz")
    assert "byte-exact" in capsys.readouterr().out
    assert packed.stat().st_size < model.stat().st_size
    assert packed.stat().st_mode & 0o044, "the packed file should be readable like any output"
    out = tmp_path / "back.onnx"
    assert main(["unpack", str(packed), "-o", str(out), "--no-progress"]) == 0
    assert out.read_bytes() == model.read_bytes()
    # never overwrite without --force; the outputs stay as they were
    assert main(["pack", str(model), "--no-progress"]) == 2
    assert main(["unpack", str(packed), "-o", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["unpack", str(packed), "-o", str(out), "--force", "--no-progress"]) == 0


def test_pack_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage that is not a protobuf" * 3)
    assert main(["pack", str(junk), "-o", str(tmp_path / "j.onnxz")]) == 2
    assert "junk.onnx" in capsys.readouterr().err
    assert not (tmp_path / "j.onnxz").exists()
    assert main(["pack", str(tmp_path / "missing.onnx")]) == 2
    assert main(["pack", str(digits_cnn_path()), "-o", str(tmp_path / "x.onnxz"), "--level", "40"]) == 2


def test_compress_pack_writes_both_and_onnxz_output_writes_only_packed(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.onnx"
    assert main(["compress", str(model), "-o", str(out), "--preset", "lossless", "--pack", "--no-progress"]) == 0
    assert out.is_file() and out.with_suffix(".onnxz").is_file()
    only = tmp_path / "only.onnxz"
    assert main(["compress", str(model), "-o", str(only), "--preset", "lossless", "--no-progress"]) == 0
    assert only.is_file() and not (tmp_path / "only.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with PackedModel(only) as container:
        assert container.manifest.byte_exact
    feeds = _feeds()
    assert_bit_identical(
        onnxpress.load_session(out).run(None, feeds), onnxpress.load_session(only).run(None, feeds)
    )


def test_run_and_validate_accept_onnxz(model: Path, tmp_path: Path) -> None:
    packed = tmp_path / "digits.onnxz"
    assert main(["pack", str(model), "-o", str(packed), "--no-progress"]) == 0
    images, _ = load_digits_test()
    data = tmp_path / "images.npz"
    np.savez(data, image=images[:40])
    results = []
    for which in (model, packed):
        out = tmp_path / f"out-{which.suffix[1:]}"
        assert main(["run", str(which), "--input", str(data), "--output", str(out), "--no-progress"]) == 0
        shards = sorted(out.glob("*.npz"))
        assert shards
        results.append([np.load(s)[k] for s in shards for k in sorted(np.load(s).files)])
    assert_bit_identical(results[0], results[1])
    assert main(["validate", str(model), str(packed), "--data", str(data)]) == 0
