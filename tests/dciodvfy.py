"""dciodvfy (Debian dicom3tools) as a test assertion: every DICOM object we produce must pass it.

Usage: ``from dciodvfy import assert_dciodvfy_clean`` (the tests folder is on sys.path through
tests/conftest.py). Warnings are allowed; any line starting with "Error" fails the test, and
the failure message lists the warnings too, for context.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dciodvfy_lines(path: str | Path) -> list[str]:
    """dciodvfy's report on the file at `path`, one stripped line per message."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise AssertionError("dciodvfy not found on PATH: install dicom3tools (apt-get install dicom3tools)")
    result = subprocess.run(
        [executable, str(path)], capture_output=True, text=True, errors="replace", timeout=120
    )
    return [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def assert_dciodvfy_clean(path: str | Path) -> list[str]:
    """Fail when dciodvfy reports any error for `path`; return its warnings."""
    lines = dciodvfy_lines(path)
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    if errors:
        report = "\n".join(["dciodvfy errors:", *errors, "warnings:", *warnings])
        raise AssertionError(f"{path} does not pass dciodvfy\n{report}")
    return warnings
