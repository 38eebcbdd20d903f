"""Atomic writes: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from onnxpress.atomic import atomic_open
from onnxpress.report import write_json


def test_success_replaces_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_leaves_the_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, sync=True) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("sync", [True, False])
def test_sync_flushes_the_folder_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool) -> None:
    from onnxpress import atomic

    synced: list[str] = []
    monkeypatch.setattr(atomic, "fsync_dir", lambda folder: synced.append(str(folder)))
    with atomic_open(tmp_path / "a.bin", sync=sync) as f:
        f.write(b"x")
    assert (tmp_path / "a.bin").read_bytes() == b"x"
    assert synced == ([str(tmp_path)] if sync else [])
