"""Session-wide test settings shared by every test folder."""

import shutil
import subprocess

import highdicom
import pytest


@pytest.fixture(autouse=True, scope="session")
def _strict_dicom_values():
    # As highdicom's own suite does: refuse invalid values while building objects,
    # so a bad VR value fails the test instead of producing a bad object.
    import pydicom.config

    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.writing_validation_mode = previous


@pytest.fixture(autouse=True)
def _restore_logging_config():
    # Tests that run the CLI in-process call configure_logging (a process-wide setting,
    # e.g. an INFO filter); restore it so that later tests' log captures see every event.
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    yield
    structlog.configure(**saved)
    root.handlers[:], level = saved_root
    root.setLevel(level)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(megabytes)``: a real small filesystem (a tmpfs mounted under tmp_path), to
    fill for real; unmounted afterwards. Skips where mounting is not permitted (not root)."""
    mounted = []

    def mount(megabytes: int):
        mount_point = tmp_path / f"tmpfs{len(mounted)}"
        mount_point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount_point)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
