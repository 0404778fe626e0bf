"""Session-wide test settings shared by every test folder."""

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
