"""Atomic file writes: a temporary file beside the target, renamed into place when complete.

Every output onnxpress writes (models, reports, shards, packed artifacts) goes through here,
so a crash or a full disk never leaves a half-written file under the target's name, and the
finished file gets the usual permissions rather than ``mkstemp``'s owner-only ones.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def publish(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Renames a finished temporary file onto ``target`` with permissions 0666 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flushes a folder's entries (a rename in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    sync: bool = False,
    encoding: str | None = None,
) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path``; on a clean exit it replaces ``path``.

    Args:
        path: The target file.
        mode: A writing mode (``"wb"``, ``"w"``, ``"w+b"``...).
        sync: fsync the file and its folder, so the result survives a power cut too.
        encoding: For text modes.

    Yields:
        The open temporary file. If the block raises, the temporary file is removed and
        ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)
