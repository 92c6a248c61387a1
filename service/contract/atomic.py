"""Durable, atomic file writes, shared by the model registry, the item store, the index snapshots
and the trainer's checkpoints.

Write a temporary sibling, fsync it, rename it over the target, fsync the directory: a reader,
or a process killed half-way, sees the old content or the new one, never a part, and a rename
that returned survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str | Path,
    data: bytes | str | Callable[[BinaryIO], None],
    *,
    tmp_dir: Path | None = None,
    mode: int | None = None,
) -> None:
    """Replace `path` with `data` (bytes, text, or a function that writes to the open file).

    `tmp_dir` must be on the same filesystem as `path` (default: beside it); `mode` sets the
    file's permissions (default: mkstemp's owner-only 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
