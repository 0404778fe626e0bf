"""Real helper processes for integration tests: free ports, start-until-ready, waiting.

Every process writes its output to a log file (never a pipe that could fill up and
block it), is started on ports found by binding port 0, and is stopped with SIGTERM
(then SIGKILL) by whoever started it. Nothing here sleeps for a fixed time: callers
wait on a condition with a deadline (`wait_for`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node.bench.processes import POLL_INTERVAL_SECONDS, free_ports, wait_for

# free_ports and wait_for live with the benchmarks, which start the same real processes.
__all__ = ["POLL_INTERVAL_SECONDS", "ManagedProcess", "ProcessExited", "free_ports", "start_until_ready",
           "temp_files_left", "wait_for"]


def temp_files_left(data_dir: Path) -> list[Path]:
    """Files under data_dir/tmp: a running process's spool area (a folder) and its lock file
    are there by design; anything else is a temp file left behind."""
    return [p for p in (Path(data_dir) / "tmp").rglob("*") if p.is_file() and p.suffix != ".lock"]


class ProcessExited(RuntimeError):
    """A helper process exited while we were waiting for it."""


class ManagedProcess:
    """One subprocess with its output in `log_path`; `stop()` always ends it."""

    def __init__(self, name: str, command: Sequence[str], *, log_path: Path, cwd: Path | None = None):
        self.name = name
        self.command = [str(part) for part in command]
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # The child keeps its own copy of the descriptor; ours can close now.
            self.popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_running(self) -> None:
        """Raise ProcessExited (with the log) if the process is no longer running."""
        if not self.running:
            code = self.popen.returncode if self.popen else None
            raise ProcessExited(f"{self.name} exited with status {code}:\n{self.log()}")

    def stop(self, timeout: float = 10, *, graceful: bool = True) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit status.

        `graceful=False` sends SIGKILL at once, for peers whose state is thrown away.
        """
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            if graceful:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} log={self.log_path}>"


def start_until_ready(
    spawn: Callable[[int], ManagedProcess],
    ready: Callable[[ManagedProcess], bool],
    *,
    timeout: float,
    attempts: int = 3,
) -> ManagedProcess:
    """Start `spawn(attempt)` and wait until `ready(process)`; retry if it exits early.

    `spawn` should pick fresh free ports on each call: an early exit is almost
    always another process having taken a port between `free_ports` and our bind.
    The process is stopped before any error propagates, so nothing is left running.
    """
    failures = []
    for attempt in range(attempts):
        process = spawn(attempt).start()

        def _ready() -> bool:
            process.check_running()
            return ready(process)

        try:
            wait_for(_ready, timeout, description=f"{process.name} to become ready")
            return process
        except ProcessExited as error:
            failures.append(str(error))
            process.stop()
        except TimeoutError as error:
            process.stop()
            raise TimeoutError(f"{error}; its log:\n{process.log()}") from None
        except BaseException:
            process.stop()
            raise
    raise RuntimeError(
        f"could not start after {attempts} attempts:\n" + "\n---\n".join(failures)
    )
