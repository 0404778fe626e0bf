"""Fixtures for the pixel pipeline tests."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from tests.pixels.images import ramp_image


@pytest.fixture
def ramp() -> Dataset:
    return ramp_image()
