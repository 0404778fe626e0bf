"""A file is written whole or not at all: one helper for the node and the lab.

The content goes to a temp file beside the target (same filesystem, so the rename is
atomic), is flushed and fsynced, and is renamed over the target; then the directory is
fsynced, since POSIX leaves it to the application to make a rename durable. A reader, a
concurrent writer, or a restart after a power loss sees the old file or the new one,
never a part; a temp file a crash leaves behind starts with a dot and ends in ``.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Readable by the node's service user (systemd DynamicUser) when the lab made the file:
# a report, an exported model. Files holding patient data are written by the store, which
# keeps mkstemp's 0600.
SHARED = 0o644


def write_atomically(
    path: str | Path,
    content: bytes | str | Callable[[BinaryIO], object],
    *,
    fsync: bool = True,
    mode: int | None = None,
) -> Path:
    """Replace ``path`` by ``content``: bytes, text (UTF-8), or a function that writes to
    the open binary file (``torch.save(obj, f)``, ``dataset.save_as(f)``, ``np.savez(f)``).

    ``fsync=False`` for files that only describe the present (a state file rewritten every
    few seconds): a power loss may then keep the old content, never a torn one. ``mode``:
    the file's permissions (mkstemp's 0600 when None). Creates the parent folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if fsync:
        fsync_directory(path.parent)
    return path


def fsync_directory(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
