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
