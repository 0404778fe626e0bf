"""The real dcmtk tools as test peers: storescu/echoscu as senders, storescp as a receiver.

dcmtk is an independent DICOM implementation, so a round trip through it checks
our node against someone else's reading of the standard, not against pynetdicom's.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from .process import ManagedProcess, free_ports, start_until_ready, wait_for

# Network timeouts for the dcmtk clients (seconds): a dead peer fails fast instead of
# hanging the test run; generous enough for a loaded 2-core CI machine.
CONNECT_TIMEOUT = 10
ACSE_TIMEOUT = 10
DIMSE_TIMEOUT = 30


@dataclass(frozen=True)
class DcmtkResult:
    """Exit status and combined stdout/stderr of one dcmtk command."""

    command: list[str]
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _run(command: Sequence[str], *, timeout: float) -> DcmtkResult:
    command = [str(part) for part in command]
    completed = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    return DcmtkResult(command, completed.returncode, completed.stdout)


def _timeouts() -> list[str]:
    return [
        "--timeout", str(CONNECT_TIMEOUT),
        "--acse-timeout", str(ACSE_TIMEOUT),
        "--dimse-timeout", str(DIMSE_TIMEOUT),
    ]  # fmt: skip


def storescu(
    files: Iterable[Path],
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    *,
    host: str = "127.0.0.1",
    required_contexts: bool = True,
    extra_args: Sequence[str] = (),
    timeout: float = 120,
) -> DcmtkResult:
    """Send `files` in one association with dcmtk storescu; never raises on failure.

    `required_contexts` proposes only the SOP class / transfer syntax pairs the
    files need (as a modality does), instead of dcmtk's long default list.
    storescu stops at the first C-STORE response that is not Success and exits
    non-zero, so `result.ok` means "all stored"; the verbose output names each
    response status (e.g. "Received Store Response (Refused: OutOfResources)").
    """
    command = ["storescu", "--verbose", "--aetitle", calling_aet, "--call", called_aet]
    command += _timeouts()
    if required_contexts:
        command.append("--required")
    command += [*extra_args, host, str(port), *[str(path) for path in files]]
    return _run(command, timeout=timeout)


def echoscu(
    port: int,
    called_aet: str,
    calling_aet: str = "ECHOSCU",
    *,
    host: str = "127.0.0.1",
    timeout: float = 30,
) -> DcmtkResult:
    """One C-ECHO (Verification, PS3.4 Annex A) with dcmtk echoscu."""
    command = ["echoscu", "--aetitle", calling_aet, "--call", called_aet, *_timeouts()]
    return _run([*command, host, str(port)], timeout=timeout)


class StoreSCP:
    """dcmtk storescp on a free port: a modality or PACS stand-in that keeps what it receives.

    Each received object is written to `incoming/`; storescp then runs
    `--exec-on-reception`, which appends the file name to `received.txt`. A name in
    that list is therefore a complete file, never one still being written.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "STORESCP",
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ):
        self.workdir = workdir
        self.ae_title = ae_title
        self.incoming = workdir / "incoming"
        self.received_log = workdir / "received.txt"
        self._fixed_port = port  # None: a free port on each start
        self.extra_args = [str(arg) for arg in extra_args]
        self.port: int | None = port
        self.process: ManagedProcess | None = None

    def start(self, *, timeout: float = 30) -> StoreSCP:
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.received_log.touch()
        self.process = start_until_ready(self._spawn, self._answers_echo, timeout=timeout)
        return self

    def _spawn(self, _attempt: int) -> ManagedProcess:
        if self._fixed_port is None:
            (self.port,) = free_ports(1)
        on_reception = f"echo #f >> {shlex.quote(str(self.received_log))}"
        command = [
            "storescp", "--verbose",
            "--aetitle", self.ae_title,
            "--output-directory", self.incoming,
            "--accept-all",  # every transfer syntax dcmtk supports, compressed included
            "--disable-host-lookup",
            "--exec-on-reception", on_reception,
            *self.extra_args,
            self.port,
        ]  # fmt: skip
        return ManagedProcess(
            f"storescp {self.ae_title}", command, log_path=self.workdir / "storescp.log"
        )

    def _answers_echo(self, _process: ManagedProcess) -> bool:
        result = echoscu(self.port, self.ae_title, timeout=10)
        # Started with --refuse, it is up when it answers with an A-ASSOCIATE-RJ.
        return result.ok or ("--refuse" in self.extra_args and "Association Rejected" in result.output)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def received(self) -> list[Path]:
        """Completely received files, in order of arrival."""
        names = self.received_log.read_text().split()
        return [self.incoming / name for name in names]

    def wait_for_files(self, count: int = 1, *, timeout: float = 30) -> list[Path]:
        """Wait until at least `count` (>= 1) files have been received; return them all."""

        def enough() -> list[Path] | None:
            files = self.received()
            return files if len(files) >= count else None

        return wait_for(enough, timeout, description=f"{count} file(s) at storescp {self.ae_title}")

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(path) for path in self.received()]

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
