"""Session-wide test settings shared by every test folder."""

import highdicom
import pytest

from tests import phi_guard


def pytest_configure(config):
    phi_guard.install(config)  # counts fake patient data in all output: see tests/phi_guard.py


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
    # e.g. an INFO filter, and the exception hooks); restore it so that later tests' log
    # captures see every event.
    import logging
    import sys
    import threading

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    yield
    structlog.configure(**saved)
    root.handlers[:], level = saved_root
    root.setLevel(level)
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
