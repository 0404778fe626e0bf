"""``data_dir/dicom-node.lock``: one node per data directory, and how `status` knows it runs."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from dicom_node.errors import ConfigError

LOCK_NAME = "dicom-node.lock"
LOCK_WAIT_SECONDS = 2.0  # `status` holds the lock for microseconds; do not mistake it for a node


class RunLock:
    """``data_dir/dicom-node.lock``: held (flock) by the running node, holding its pid.

    The kernel drops the lock when the process ends, even on SIGKILL, so a stale
    file never claims a dead node is running.
    """

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; ConfigError when another node runs on this data_dir."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                pid = _read_pid(fd)
                os.close(fd)
                raise ConfigError(
                    f"node.data_dir: another dicom-node (pid {pid or '?'}) is running on {self.path.parent}"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def running_node_pid(data_dir: Path) -> int | None:
    """The pid of the node running on `data_dir` (0 if unknown), or None when none runs."""
    path = Path(data_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
