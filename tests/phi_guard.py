"""The suite-wide PHI guard: fake patient data must not appear in what our processes printed.

Issue #8's figure "number of PHI strings found in all output across the whole test suite
(target: 0)" is measured here. After each test, the guard counts the fake patient values
(below) in the output of that test, prints ``PHI strings found in output: N`` in the
terminal summary, and fails the session (exit status 1) when N > 0, listing where.

What is searched (our processes' output):
- what pytest captured while the test ran: stdout, stderr and stdlib log records of the
  test process (in-process SCPs, CLI commands run in-process, our log lines, and whatever
  a test prints, such as a node's log at teardown): the report sections
  "Captured stdout/stderr/log ...";
- what a test took out of that capture itself (``capsys``/``capfd.readouterr()``): read
  and asserted on, it would otherwise never reach a report;
- every line of every `dicom-node serve` started through
  tests/integration/node_process.NodeProcess (its main process and its workers: stdout and
  stderr), registered by NodeProcess.start with ``watch``;
- stdout and stderr of `python -m dicom_node ...` commands run with ``subprocess.run`` and
  captured (the CLI tests, ``FaultNode.cli``, ``dicom-node analyze``, ``status``).

Not searched: the output of the peers (Orthanc's log, dcmtk tools: they are not ours and
do print patient data, e.g. storescu at debug level), the files and DICOM objects the node
writes or sends (a GSPS must carry the patient's identity), and pytest's own failure
reports (assertion messages of a failing test).

What is counted, case-insensitively: the suite's fixed fake identifiers
(tests/synthetic.FAKE_*; the name with carets and with spaces) and every patient handed
out by tests/synthetic.fake_patient() in this session: its name with carets, without, with
odd characters, each distinctive word of it (family, given and middle names, patient ID,
accession number) on its own, and the birth date as YYYYMMDD and YYYY-MM-DD (a date only
where no digit touches it, so that long UIDs do not match by chance). A JSON line is
searched with its escapes decoded (``\\u00d8``). Every match counts (a full name also matches
its parts); identical lines from two sources (a node log printed by a fixture) count once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
from _pytest.capture import CaptureFixture

SUMMARY = "PHI strings found in output"
_IGNORED_SECTIONS = ("log of ",)  # peers' logs (tests/integration/conftest.py)

_guard: PhiGuard | None = None


def _installed() -> PhiGuard | None:
    # This file may be imported as "tests.phi_guard" and as "phi_guard" (tests/ is on sys.path).
    modules = (sys.modules.get(name) for name in ("tests.phi_guard", "phi_guard"))
    return next((m._guard for m in modules if m is not None and m._guard is not None), None)


def watch(lines: Callable[[], list[str]], source: str, done: Callable[[], bool]) -> None:
    """Search ``lines()`` (a growing list, e.g. NodeProcess.lines) after each test, until ``done()``."""
    guard = _installed()
    if guard is not None:
        guard.watchers.append(_Watcher(lines, source, done))


def record(text: str, source: str) -> None:
    """Search ``text`` as output of the running test."""
    guard = _installed()
    if guard is not None and text:
        guard.pending.append((source, text))


@dataclass
class _Watcher:
    lines: Callable[[], list[str]]
    source: str
    done: Callable[[], bool]
    seen: int = 0

    def new_text(self) -> str:
        lines = list(self.lines())
        new, self.seen = lines[self.seen :], len(lines)
        return "\n".join(new)


@dataclass
class Finding:
    test: str
    source: str
    needle: str
    line: str


def _needles() -> list[tuple[str, re.Pattern]]:
    """(what, pattern) for every fake patient value issued so far."""
    values: dict[str, str] = {}  # lower-case text -> what it is
    dates: set[str] = set()
    modules = [sys.modules.get(name) for name in ("tests.synthetic", "synthetic")]
    for synthetic in filter(None, modules):
        name = synthetic.FAKE_PATIENT_NAME
        for text in (name, name.replace("^", " ")):
            values[text.lower()] = "FAKE_PATIENT_NAME"
        values[synthetic.FAKE_PATIENT_ID.lower()] = "FAKE_PATIENT_ID"
        values[synthetic.FAKE_ACCESSION.lower()] = "FAKE_ACCESSION"
        dates.add(synthetic.FAKE_BIRTH_DATE)
        for patient in getattr(synthetic, "ISSUED_PATIENTS", ()):
            for text in (patient.name, patient.name_without_carets, patient.name_with_odd_characters,
                         *patient.words):
                values[text.lower()] = text
            dates.add(patient.birth_date)
    needles = [(what, re.compile(re.escape(text))) for text, what in values.items()]
    for day in dates:
        iso = f"{day[:4]}-{day[4:6]}-{day[6:]}"
        needles.append((day, re.compile(rf"(?<!\d)(?:{day}|{iso})(?!\d)")))
    return needles


def _searchable(line: str) -> str:
    """The line in lower case; a JSON line with its \\u escapes decoded."""
    try:
        parsed = json.loads(line)
    except ValueError:
        return line.lower()
    return json.dumps(parsed, ensure_ascii=False).lower()


def find_phi(texts: Iterable[tuple[str, str]], test: str = "") -> list[Finding]:
    """Every occurrence of a fake patient value in ``texts`` ((source, text) pairs)."""
    needles = _needles()
    findings, seen = [], set()
    for source, text in texts:
        for line in text.splitlines():
            if line in seen:
                continue
            seen.add(line)
            searchable = _searchable(line)
            for what, pattern in needles:
                findings.extend(Finding(test, source, what, line) for _ in pattern.finditer(searchable))
    return findings


@dataclass(eq=False)  # hashable by identity: pytest keeps plugins in sets
class PhiGuard:
    findings: list[Finding] = field(default_factory=list)
    watchers: list[_Watcher] = field(default_factory=list)
    pending: list[tuple[str, str]] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.sections.extend(
            (name, text) for name, text in report.sections if not name.startswith(_IGNORED_SECTIONS)
        )
        if report.when == "teardown":
            self._count(report.nodeid)

    def _count(self, test: str) -> None:
        texts = self.sections + self.pending
        done = [w.done() for w in self.watchers]  # before reading: no line is missed
        texts += [(w.source, w.new_text()) for w in self.watchers]
        self.watchers = [w for w, finished in zip(self.watchers, done, strict=True) if not finished]
        self.sections, self.pending = [], []
        self.findings.extend(find_phi(texts, test))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._count("(after the last test)")
        if self.findings and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(f"{SUMMARY}: {len(self.findings)}")
        for finding in self.findings[:20]:
            terminalreporter.write_line(
                f"  {finding.test} [{finding.source}]: {finding.needle!r} in {finding.line[:200]!r}"
            )


def _record_readouterr(original):
    def readouterr(self):
        captured = original(self)
        record(captured.out, "capsys/capfd stdout")
        record(captured.err, "capsys/capfd stderr")
        return captured

    return readouterr


def _is_dicom_node(command) -> bool:
    if isinstance(command, (str, bytes)):
        command = [command]
    parts = [str(part) for part in command]
    return "dicom_node" in parts or any(part.endswith("dicom-node") for part in parts)


def _record_run(original):
    def run(*args, **kwargs):
        result = original(*args, **kwargs)
        command = args[0] if args else kwargs.get("args", ())
        if _is_dicom_node(command):
            for stream in (result.stdout, result.stderr):
                if stream:
                    record(stream if isinstance(stream, str) else stream.decode("utf-8", "replace"),
                           "dicom-node " + " ".join(map(str, command))[:80])
        return result

    return run


def install(config: pytest.Config) -> None:
    """Register the guard (from tests/conftest.py)."""
    global _guard
    _guard = PhiGuard()
    config.pluginmanager.register(_guard, "phi_guard")
    CaptureFixture.readouterr = _record_readouterr(CaptureFixture.readouterr)
    subprocess.run = _record_run(subprocess.run)
