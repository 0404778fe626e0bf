"""A file is written whole or not at all: one helper for the node and the lab.

The content goes to a temp file beside the target (same filesystem, so the rename is
atomic), is flushed and fsynced, and is renamed over the target; then the directory is
fsynced, since POSIX leaves it to the application to make a rename durable. A reader, a
concurrent writer, or a restart after a power loss sees the old file or the new one,
never a part; a temp file a crash leaves behind starts with a dot and ends in ``.tmp``.
"""

from __future__ import annotations

import contextlib
import ctypes
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


# sync_file_range(2) flag: start writing back the range's dirty pages, without waiting.
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():
    """libc's sync_file_range, or None where there is none (it is Linux only)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk now.

    A file written as it arrives and fsynced once it is complete would otherwise have all
    its pages written back by that fsync, while the sender waits for its answer. Started
    early, the writeback overlaps the rest of the transfer and the fsync finds little left
    to do. Only a hint: it guarantees nothing (the fsync still does), and does nothing
    where the call does not exist. ctypes releases the GIL for the call.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
