"""Installing dicom-node: a clean build (no setuptools warnings) and a venv that does not hide dcmtk."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYNETDICOM_SCRIPT = """#!/opt/venv/bin/python
import sys
from pynetdicom.apps.storescu.storescu import main
if __name__ == '__main__':
    sys.exit(main())
"""


@pytest.mark.slow
def test_the_package_builds_without_setuptools_warnings_and_keeps_its_data(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".data", "var", ".bench", "runs", "tests"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # a warning of its own
    built = subprocess.run(
        [sys.executable, "-W", "default", "-c",
         f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path)!r}))"],
        cwd=source, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    output = built.stdout + built.stderr
    assert "warn" not in output.lower(), "\n".join(l for l in output.splitlines() if "warn" in l.lower())
    wheel = tmp_path / built.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("dicom_node/weights/demo_retinanet_r18_fpn.pt", "dicom_node/queue/migrations/env.py",
                 "dicom_node/queue/migrations/script.py.mako",
                 "dicom_node/queue/migrations/versions/0001_initial.py"):  # fmt: skip
        assert data in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_install_takes_pynetdicom_console_scripts_out_of_the_venv(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "install", tmp_path / "scripts" / "install")
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("storescu", "echoscu", "findscu"):
        (bin_dir / name).write_text(PYNETDICOM_SCRIPT.replace("storescu", name))
    (bin_dir / "dicom-node").write_text(PYNETDICOM_SCRIPT.replace("pynetdicom.apps.storescu.storescu", "dicom_node.cli"))
    (bin_dir / "dcmdump").write_text("#!/bin/sh\nexec /usr/bin/dcmdump \"$@\"\n")  # someone's own wrapper
    # An installed, up-to-date venv (the stamp scripts/install writes): nothing is reinstalled.
    stamp = hashlib.sha256((REPO / "setup.cfg").read_bytes() + (REPO / "pyproject.toml").read_bytes()).hexdigest()
    (tmp_path / ".venv" / ".installed-").write_text(stamp + "\n")

    result = subprocess.run(["bash", str(tmp_path / "scripts" / "install")], capture_output=True, text=True,
                            timeout=60)  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in bin_dir.iterdir()) == ["dcmdump", "dicom-node"]
