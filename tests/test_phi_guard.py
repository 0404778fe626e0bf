"""The suite-wide PHI guard (tests/phi_guard.py) counts fake patient data and fails the session.

Checked on a small real pytest session in a child process, with the guard installed as
tests/conftest.py installs it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFTEST = """
from tests import phi_guard


def pytest_configure(config):
    phi_guard.install(config)
"""

LEAKING_TESTS = """
import subprocess
import sys

from tests import synthetic


def test_prints_a_fixed_fake_name():
    print(f"patient {synthetic.FAKE_PATIENT_NAME}")


def test_a_fresh_patient_read_back_from_capsys(capsys):
    patient = synthetic.fake_patient()
    sys.stderr.write(f"cannot read {patient.name_without_carets.lower()}\\n")
    assert capsys.readouterr().err  # taken out of the capture: still counted


def test_a_dicom_node_command_run_by_the_test():
    patient = synthetic.fake_patient()
    code = f"import sys; sys.stderr.write('born {patient.birth_date}')"
    subprocess.run([sys.executable, "-c", code, "dicom_node"], capture_output=True, text=True)


def test_clean():
    print("study 1.2.3 analysed")
"""


def run_session(folder: Path, tests: str) -> subprocess.CompletedProcess:
    (folder / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (folder / "test_inner.py").write_text(textwrap.dedent(tests))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(folder), str(folder)],
        capture_output=True, text=True, timeout=300, cwd=folder, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_fake_patient_data_in_output_is_counted_and_fails_the_session(tmp_path):
    result = run_session(tmp_path, LEAKING_TESTS)
    assert "4 passed" in result.stdout, result.stdout
    # 1 fixed name; the fresh name without carets, its family and given names; the birth date.
    assert "PHI strings found in output: 5" in result.stdout, result.stdout
    assert result.returncode == 1
    for test in ("test_prints_a_fixed_fake_name", "test_a_fresh_patient_read_back_from_capsys",
                 "test_a_dicom_node_command_run_by_the_test"):
        assert f"test_inner.py::{test} [" in result.stdout
    assert "test_inner.py::test_clean [" not in result.stdout


def test_a_clean_session_reports_zero_and_passes(tmp_path):
    result = run_session(tmp_path, "def test_clean():\n    print('study 1.2.3 analysed')\n")
    assert "PHI strings found in output: 0" in result.stdout, result.stdout
    assert result.returncode == 0
