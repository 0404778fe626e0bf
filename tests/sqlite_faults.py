"""Real database faults for tests: another process holding SQLite's write lock, a full disk.

- `WriteLock`: a separate Python process opens the database and runs BEGIN IMMEDIATE,
  as a CLI command, a backup tool or a stuck node would; every other writer waits on it.
- `SmallFilesystem`: a tmpfs mounted for the test (root only) that `fill()` fills to the
  last byte and `free()` empties again; SQLite then fails at commit with SQLITE_FULL, as
  on a full data disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
connection.execute("ROLLBACK")
"""


class WriteLock:
    """Another process holding the database's write lock while the `with` block runs."""

    def __init__(self, database: Path):
        self.database = database
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> WriteLock:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, str(self.database)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.process.stdout.readline()
        assert line.strip() == "locked", f"the lock holder did not get the lock: {line!r}"
        return self

    def __exit__(self, *_exc) -> None:
        self.process.stdin.close()
        self.process.wait(60)
        self.process.stdout.close()


class SmallFilesystem:
    """A tmpfs of `size` at `path` that the test can fill up and free again."""

    def __init__(self, path: Path, *, size: str = "16m"):
        self.path = path
        self.size = size
        self.filler = path / "filler"

    def mount(self) -> SmallFilesystem:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path)],
                       check=True, capture_output=True, text=True, timeout=30)
        return self

    def unmount(self) -> None:
        # Lazy: a process of the test that still holds a file there must not block teardown.
        subprocess.run(["umount", "--lazy", str(self.path)], check=False, capture_output=True, timeout=30)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self) -> None:
        """Write to the filler file until not one more byte fits."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for block in (1 << 20, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * block)
                except OSError as error:
                    if error.errno != 28:  # ENOSPC: this block size no longer fits
                        raise
        finally:
            os.close(fd)
        assert self.free_bytes() == 0

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
