"""What the benchmarks start and measure: real `dicom-node` processes, dcmtk senders, the
peak memory of process trees, on loopback and free ports, always stopped.

Every process is started in its own session, so that Ctrl-C reaches the benchmark only
and the benchmark stops them in order (its `finally` blocks); a process that does not
stop on SIGTERM within a deadline is killed. Nothing waits without a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self, TypeVar

T = TypeVar("T")

MIB = 1024 * 1024
READY_TIMEOUT_SECONDS = 240  # a node loads torch (and a model) before it is ready
STOP_TIMEOUT_SECONDS = 60
SEND_TIMEOUT_SECONDS = 600
# How often a condition is re-checked; short, since checks are cheap local calls.
POLL_INTERVAL_SECONDS = 0.05
# storescu --verbose prints this line for each C-STORE response (PS3.7 9.1.1.1.9 Status).
STORE_RESPONSE = "Received Store Response"
STORE_SUCCESS = "Received Store Response (Success)"


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct TCP ports that were free a moment ago (bind port 0).

    All sockets are held open until every port is chosen, so the ports differ.
    Another process may still take one before our server binds it; a caller that
    cares retries the start (tests/integration/process.py `start_until_ready`).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    *,
    description: str = "condition",
    interval: float = POLL_INTERVAL_SECONDS,
) -> T:
    """Call `predicate` until it returns something truthy, and return that value.

    Raises TimeoutError naming `description` when `timeout` seconds pass first.
    Exceptions raised by `predicate` propagate: a check that can tell the wait is
    hopeless (e.g. the server process exited) should raise instead of returning False.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {description}")
        time.sleep(interval)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def write_toml(path: Path, sections: dict, destinations: list[dict] = ()) -> Path:
    """A node config from {section: {key: value}} and a list of [[destinations]]."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    for destination in destinations:
        lines.append("[[destinations]]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in destination.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class Started:
    """One child process with its output in a log file; `stop()` always ends it."""

    def __init__(self, name: str, command: list[str], log_path: Path, **popen):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [str(part) for part in command], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, **popen,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.popen.returncode}: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, *, graceful: bool = True) -> int:
        """SIGTERM (or SIGKILL at once), then SIGKILL after STOP_TIMEOUT_SECONDS."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.popen.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class NodeProcess(Started):
    """`dicom-node serve` (or `worker`) with `config`, its JSON log lines in `log_path`."""

    READY_EVENTS: ClassVar[dict[str, str]] = {"serve": "node_ready", "worker": "workers_ready"}

    def __init__(self, config: Path, log_path: Path, command: str = "serve"):
        self.command = command
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        super().__init__(f"dicom-node {command}", [sys.executable, "-m", "dicom_node", command, "--config",
                                                   config], log_path, env=env)

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log_tail(chars=10**9).splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == name:
                    found.append(event)
        return found

    def wait_ready(self) -> NodeProcess:
        def ready():
            self.check_running()
            return self.events(self.READY_EVENTS[self.command])

        (event, *_) = wait_for(ready, READY_TIMEOUT_SECONDS,
                               description=f"{self.name} to log {self.READY_EVENTS[self.command]}")
        self.port = int(event["port"]) if "port" in event else None
        return self


def echo_answers(port: int, called_ae: str) -> bool:
    command = ["echoscu", "-to", "5", "-ta", "5", "-aec", called_ae, "127.0.0.1", str(port)]
    return subprocess.run(command, check=False, capture_output=True, timeout=30).returncode == 0


@dataclass
class Sent:
    """One storescu association: when each C-STORE response came, and how it ended."""

    files: int
    started: float = 0.0  # time.monotonic()
    responses: list[float] = field(default_factory=list)  # time of each Success response
    finished: float = 0.0
    returncode: int | None = None
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and len(self.responses) == self.files

    @property
    def last_ack(self) -> float:
        return self.responses[-1]


def storescu(port: int, called_ae: str, files: list[Path], *, calling_ae: str = "BENCH_SCU",
             timeout: float = SEND_TIMEOUT_SECONDS) -> Sent:
    """Send `files` over one association with dcmtk storescu, noting the time of each Success.

    --required: propose only the contexts the files need, as a modality does.
    """
    command = ["storescu", "--verbose", "--required", "-to", "30", "-ta", "30", "-td", "120",
               "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)]
    sent = Sent(files=len(files), started=time.monotonic())
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    timer = threading.Timer(timeout, process.kill)  # bounded, even if storescu hangs
    timer.start()
    tail: list[str] = []
    try:
        for line in process.stdout:
            if STORE_SUCCESS in line:
                sent.responses.append(time.monotonic())
            elif STORE_RESPONSE in line or line.startswith(("E:", "F:")):
                tail.append(line.rstrip())
        sent.returncode = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    sent.finished = time.monotonic()
    sent.output_tail = "\n".join(tail[-20:])
    return sent


# --------------------------------------------------------------------------- memory


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process now."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return sorted(found)


def _label(pid: int, root_label: str, root: int) -> str:
    if pid == root:
        return root_label
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"{root_label} child"
    text = " ".join(part.decode(errors="replace") for part in argv if part)
    if "spawn_main" in text:  # multiprocessing's spawned child: the node's analysis worker
        return f"{root_label}: worker"
    if "resource_tracker" in text:
        return f"{root_label}: resource tracker"
    # A server that names its processes itself (PostgreSQL: "postgres: checkpointer").
    return text[:60] if text.startswith(root_label) else f"{root_label}: {text[:60]}"


class PeakRss:
    """Peak resident memory (VmHWM) of every process in some trees, over one phase.

    `reset()` clears each process's high-water mark (writing 5 to /proc/PID/clear_refs,
    Linux 4.0+), so a phase's peak is its own and not that of start-up (loading a model).
    A thread notes every few hundred milliseconds which processes are in the trees and
    their VmHWM, so a process that exits during the phase is still counted.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.25):
        self.roots, self.interval = roots, interval
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (label, KiB)
        self.reset_ok = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _members(self) -> list[tuple[int, str]]:
        return [(pid, _label(pid, label, root)) for label, root in self.roots.items() for pid in descendants(root)]

    def reset(self) -> None:
        for pid, _label_ in self._members():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False

    def sample(self) -> None:
        for pid, label in self._members():
            kib = _status_kib(pid, "VmHWM")
            if kib is not None:
                known_label, known = self.peaks.get(pid, (label, 0))
                self.peaks[pid] = (known_label, max(known, kib))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self.reset()
        self.peaks.clear()
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def entries(self) -> list[dict]:
        """One entry per process seen, in the order of the roots, then pid."""
        order = list(self.roots)
        rows = [{"process": label, "pid": pid, "peak_rss_mib": round(kib / 1024, 1)}
                for pid, (label, kib) in self.peaks.items()]
        return sorted(rows, key=lambda r: (next(i for i, root in enumerate(order) if r["process"].startswith(root)),
                                           r["pid"]))
