"""A real `dicom-node serve` process for integration tests.

The node is started with a config written by the test, on port 0; its port is read
from the `node_ready` JSON log line. Its stderr (JSON lines) is kept for assertions
(e.g. that no PHI reaches the logs) and printed when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dicom_node.bench.processes import write_toml
from tests import phi_guard

READY_TIMEOUT_SECONDS = 240


def open_to_any_caller(sections: dict) -> dict:
    """``sections`` with ``security.allow_any_caller = true`` unless it names allowed callers.

    Test nodes accept any caller unless the test is about who may send.
    """
    security = dict(sections.get("security", {}))
    if not security.get("allowed_callers"):
        security.setdefault("allow_any_caller", True)
    return {**sections, "security": security}


def write_config(path: Path, sections: dict, destinations: list[dict] = ()) -> Path:
    """Write a node config TOML from {section: {key: value}} and a destinations list.

    The node accepts any caller unless ``sections["security"]`` lists allowed callers, and
    keeps what it delivered unless the test configures ``[retention]`` (a test node must not
    purge studies because the CI disk happens to be short of space).
    """
    sections = {"retention": {"enabled": False}, **open_to_any_caller(sections)}
    return write_toml(path, sections, destinations)


# The event each command logs once it works (`dicom-node worker`: its workers loaded the model).
READY_EVENTS = {"serve": "node_ready", "worker": "workers_ready"}


class NodeProcess:
    def __init__(self, config_path: Path, command: str = "serve"):
        self.config_path = config_path
        self.command = command
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self._ready = threading.Event()

    def start(self) -> "NodeProcess":
        return self.launch().wait_ready()

    def launch(self) -> "NodeProcess":
        """Start the process without waiting (start several, then `wait_ready` on each)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", self.command, "--config", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        # Every line the node and its workers print is searched for fake patient data.
        phi_guard.watch(lambda: self.lines, f"dicom-node {self.command}", done=lambda: not reader.is_alive())
        return self

    def wait_ready(self) -> "NodeProcess":
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dicom-node {self.command} did not become ready:\n" + self.output())
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            event = self._parse(line)
            if event.get("event") == READY_EVENTS[self.command]:
                self.port = int(event["port"]) if "port" in event else None
                self._ready.set()

    @staticmethod
    def _parse(line: str) -> dict:
        try:
            value = json.loads(line)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def events(self, name: str | None = None) -> list[dict]:
        parsed = [self._parse(line) for line in list(self.lines)]
        return [e for e in parsed if e and (name is None or e.get("event") == name)]

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, as systemd stops it; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"dicom-node did not stop within {timeout} s of SIGTERM:\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL: a crash at an arbitrary moment."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
