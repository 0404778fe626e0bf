"""``data_dir/dicom-node.lock``: who may run on a data directory, and how `status` knows one runs.

With the SQLite job table (the default) one node runs per data_dir: it holds the lock
exclusively, and at start whatever is left `running` in its database is a crashed node's.
SQLite is not safe on a shared filesystem (its locks are not), nor from several hosts.

With PostgreSQL (``queue.url``) any number of receivers and workers, on one host or
several, share the data_dir: each holds the lock shared (a SQLite node on the same
data_dir is refused, and refuses them), and each has its own spool area (store.SpoolArea);
a starting process reclaims only what dead processes left (`reclaim_dead_processes`).
"""

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
    file never claims a dead node is running. `shared`: held by every process of a
    PostgreSQL deployment at once (the file then names no pid).
    """

    def __init__(self, data_dir: Path, *, shared: bool = False):
        self.path = Path(data_dir) / LOCK_NAME
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; ConfigError when a node that excludes this one runs on this data_dir."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                pid = _read_pid(fd)
                os.close(fd)
                raise ConfigError(
                    f"node.data_dir: another dicom-node (pid {pid or '?'}) is running on {self.path.parent}; "
                    "several processes may share a data_dir only when all of them use one PostgreSQL "
                    "queue.url (SQLite allows one node per data_dir)"
                ) from None
        if not self.shared:
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
    """The pid of the node running on `data_dir` (0 if unknown: shared holders name none),
    or None when none runs."""
    path = Path(data_dir) / LOCK_NAME
    try:
        # Exclusive, so that shared holders (a PostgreSQL deployment) count too; NFS
        # emulates flock with a write lock there, which needs the file open for writing.
        fd, probe = os.open(path, os.O_RDWR), fcntl.LOCK_EX
    except PermissionError:  # another user's node: only an exclusive holder shows
        fd, probe = os.open(path, os.O_RDONLY), fcntl.LOCK_SH
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, probe | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def reclaim_dead_processes(data_dir: Path, queue, *, keep: Path | None = None) -> tuple[list[str], int]:
    """Remove dead processes' spool areas and end their leases; (their owners, leases ended).

    A process's worker and delivery ids start with its owner name (store.process_owner),
    and its spool area lock tells whether it is alive (on any host sharing data_dir):
    the jobs and deliveries it held are claimed again at once, while the leases of live
    processes elsewhere are left alone. `keep`: the caller's own area.
    """
    from dicom_node.store import sweep_spool_areas

    dead = sweep_spool_areas(data_dir, keep=keep)
    return dead, (queue.expire_leases(owners=dead) if dead else 0)
