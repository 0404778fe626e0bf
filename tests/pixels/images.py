"""Synthetic images with known stored values for the pixel pipeline tests (no patient data)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from tests.synthetic import mammogram


def ramp_image(*, bits_stored: int = 12, rows: int = 8, columns: int = 512) -> Dataset:
    """An MG image whose stored values sweep 0..max along each row."""
    ds = mammogram(rows=rows, columns=columns, bits_stored=bits_stored)
    max_value = (1 << bits_stored) - 1
    ramp = np.linspace(0, max_value, columns).round().astype(np.uint16)
    ds.PixelData = np.tile(ramp, (rows, 1)).tobytes()
    return ds


def without_window(ds: Dataset) -> Dataset:
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds
