"""Synthetic mammogram phantoms with known masses: training data and test images, never patient data.

Each phantom is a Digital Mammography X-Ray Image For Presentation (PS3.3 A.26.1),
16 bits allocated with 12 or 14 bits stored, MONOCHROME2 (dense tissue bright) and a
window, drawn from a simple model of a compressed breast:

- the outline is a super-ellipse against the chest wall with a slightly wobbling skin
  edge; on MLO views it runs out of the top of the image into the axilla and the
  pectoral muscle is a bright, slightly convex triangle in the upper chest-wall corner;
- the fibroglandular tissue is 1/f^beta noise (beta about 3, shaped in the Fourier
  domain, stretched toward the nipple, plus streaks converging on the nipple) kept above
  a threshold set by the BI-RADS density class (A fatty .. D extremely dense), inside a
  central envelope that leaves a fatty rim under the skin; thin strands along the same
  streaks (ducts, Cooper's ligaments) show through the fat;
- brightness falls off toward the skin (the compressed breast gets thinner), the skin
  is a thin brighter line, air is dark with noise, and every pixel gets quantum noise;
- masses are added on top: 8-30 mm (configurable) lobulated ovals with a circumscribed,
  ill-defined (blurred) or spiculated (thin radial lines) margin, always wholly inside
  the breast and outside the pectoral muscle, never touching each other. A mass in dense
  tissue shows less contrast, as it does on a real mammogram.

Orientation follows the usual acquisition (IHE Mammography Image profile): the chest
wall is on the image side opposite the nipple, on the left for left breasts (Patient
Orientation ``A\\R`` CC, ``A\\FR`` MLO) and on the right for right breasts (``P\\L``,
``P\\FL``); a right breast is the mirror image of a left one. Each study holds the four
standard views (R CC, L CC, R MLO, L MLO) with one Study Instance UID.

Everything is drawn from ``numpy.random.default_rng`` seeded with ``(seed, index)``, and
UIDs are hashed from the same values and the image size, so image ``index`` of a seed is
the same bytes whichever ``n`` is asked for, however many worker processes write it, and
whether it is written (:func:`write_phantoms`) or built in memory (:func:`phantom_dataset`).

The box of a mass is the bounding box (``x0, y0, x1, y1``, pixel ``i`` spanning
``[i, i + 1)``) of its body: the pixels inside its nominal outline. A blurred margin
fades a little beyond it, and spicules reach out past it, as in a radiologist's outline
of the central mass. The smooth fields are drawn on a grid of at most 640 pixels and
upsampled; masses and noise are drawn at full resolution.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cached_property, partial
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.files import SHARED, write_atomically
from dicom_node.lab.phantom_variety import (
    Look,
    MassDraw,
    Variety,
    draw_distractors,
    draw_look,
    draw_mass,
    draw_spicules,
    overlaps,
    unsharp,
)

SYNTHETIC_NOTICE = "SYNTHETIC PHANTOM - not patient data"
MANUFACTURER = "dicom-node phantom"
ANNOTATIONS_NAME = "annotations.json"
CATEGORIES = [{"id": 1, "name": "mass", "supercategory": "lesion"}]
MASS_CATEGORY_ID = 1

LATERALITIES = ("L", "R")
VIEWS = ("CC", "MLO")
DENSITIES = ("A", "B", "C", "D")
MARGINS = ("circumscribed", "ill-defined", "spiculated")
# The four views of a screening study in their usual hanging order.
STUDY_VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))

DEFAULT_ROWS = 3328
DEFAULT_COLUMNS = 2560
# 0.1 mm pixels at the default size; smaller images cover the same field with larger pixels.
DEFAULT_SPACING_MM = 0.1
# Share of the breast's glandular envelope that is dense, per BI-RADS density class,
# and how often each class occurs in a screening population (about 10/40/40/10 %).
_DENSE_FRACTION = {"A": 0.05, "B": 0.25, "C": 0.5, "D": 0.75}
_DENSITY_WEIGHTS = (0.1, 0.4, 0.4, 0.1)

# Patient Orientation (0020,0020) of each view, chest wall opposite the nipple (IHE MAMMO).
_PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}
# View Code Sequence (0054,0220) codes, CID 4014 "View for Mammography".
_VIEW_CODES = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
_MAX_SMOOTH_SIDE = 640  # the smooth fields are drawn at most this large, then upsampled


@dataclass(frozen=True)
class Mass:
    """One inserted mass; ``box`` is ``x0, y0, x1, y1`` in pixels of the stored image."""

    box: tuple[float, float, float, float]
    diameter_mm: float
    margin: str
    contrast: float
    area: float  # pixels inside the nominal outline (COCO "area")
    shape: str = ""  # round, oval or irregular (varied phantoms only)

    @property
    def coco_bbox(self) -> list[float]:
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0, y1 - y0]


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom: the DICOM dataset, its masses and the true anatomy masks."""

    dataset: Dataset
    masses: tuple[Mass, ...]
    laterality: str
    view: str
    density: str
    coarse_breast: np.ndarray = field(repr=False)  # bool, on the smooth-field grid
    coarse_pectoral: np.ndarray = field(repr=False)
    look: Look | None = None  # the drawn acquisition of a varied phantom
    distractors: tuple[str, ...] = ()  # kinds of hard negatives burned in (never labelled)
    distractor_boxes: tuple[tuple[str, tuple[int, int, int, int]], ...] = ()  # (kind, box) of each

    @property
    def boxes(self) -> np.ndarray:
        """The masses' boxes as float32 Nx4 ``x0, y0, x1, y1``."""
        return np.array([m.box for m in self.masses], dtype=np.float32).reshape(-1, 4)

    @cached_property
    def breast(self) -> np.ndarray:
        """bool Rows x Columns: inside the skin line (pectoral muscle included)."""
        return self._full_size(self.coarse_breast)

    @cached_property
    def pectoral(self) -> np.ndarray:
        """bool Rows x Columns: the pectoral muscle (MLO views; empty on CC)."""
        return self._full_size(self.coarse_pectoral)

    def _full_size(self, mask: np.ndarray) -> np.ndarray:
        return _resample(mask.astype(np.float32), int(self.dataset.Rows), int(self.dataset.Columns)) >= 0.5


def spacing_for(rows: int, columns: int) -> float:
    """Pixel spacing in mm: 0.1 mm at 3328 x 2560, scaled so the field size stays the same."""
    return DEFAULT_SPACING_MM * math.sqrt(DEFAULT_ROWS * DEFAULT_COLUMNS / (rows * columns))


# --------------------------------------------------------------------------- noise fields


def _power_law_noise(
    rng: np.random.Generator, shape: tuple[int, int], *, beta: float, stretch: float = 1.0,
    highpass: float = 0.0,
) -> np.ndarray:
    """Zero-mean, unit-variance noise with power spectrum 1/f^beta (float32).

    ``stretch`` > 1 damps variation along x (structures elongated toward the nipple);
    ``highpass`` (cycles per pixel) removes the slowest components.
    """
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    f2 = (fx * stretch) ** 2 + fy**2
    f2[0, 0] = np.inf
    gain = f2 ** (-beta / 4)
    if highpass:
        gain *= 1 - np.exp(-f2 / highpass**2)
    spectrum *= gain
    noise = np.fft.irfft2(spectrum, s=shape).astype(np.float32)
    noise -= noise.mean()
    noise /= noise.std() + 1e-12
    return noise


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _radial_noise(rng: np.random.Generator, breast: _Breast, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Noise streaked along lines converging on the nipple (ducts, ligaments), unit variance."""
    polar = _power_law_noise(rng, (720, 160), beta=2.2, stretch=5.0)  # (angle, distance)
    nipple_x = breast.width * breast.depth
    nipple_y = breast.height * (breast.center + breast.shear * breast.depth)
    angle = np.arctan2(y - nipple_y, nipple_x - x)
    distance = np.hypot((x - nipple_x) / nipple_x, (y - nipple_y) / nipple_x)
    ai = ((angle + math.pi) * (polar.shape[0] / (2 * math.pi))).astype(np.int32) % polar.shape[0]
    di = np.minimum((distance * (polar.shape[1] / 2)).astype(np.int32), polar.shape[1] - 1)
    return polar[ai, di]


# --------------------------------------------------------------------------- breast geometry


@dataclass(frozen=True)
class _Breast:
    """The outline in canonical orientation: chest wall at x = 0, nipple toward +x.

    Coordinates are pixel-edge coordinates of the full-size image.
    """

    width: float
    height: float
    spacing: float
    depth: float  # nipple distance from the chest wall, fraction of the width
    center: float  # nipple height, fraction of the height
    half_up: float  # half-height above / below the nipple, fraction of the height
    half_down: float
    shear: float  # the nipple droops: the axis tilts by this much (fraction of height per width)
    p_up: float  # super-ellipse exponents: above and below the nipple, toward it
    p_down: float
    q: float
    wobble: tuple[tuple[int, float, float], ...]  # (harmonic, amplitude, phase) of the skin edge
    falloff_mm: float  # the compressed breast thins over this distance from the skin
    pectoral: tuple[float, float, float] | None  # (top width, chest-wall height, exponent) fractions

    def radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radial coordinate (float32): 0 at the nipple axis root, 1 on the skin line."""
        f32 = np.float32
        xn = np.maximum(x * f32(1 / (self.width * self.depth)), f32(0))
        dy = y * f32(1 / self.height) - f32(self.center) - x * f32(self.shear / self.width)
        up = (dy < 0).astype(np.float32)  # arithmetic selection: np.where would promote to float64
        inv_half = f32(1 / self.half_down) + f32(1 / self.half_up - 1 / self.half_down) * up
        exponent = f32(self.p_down) + f32(self.p_up - self.p_down) * up
        yn = np.abs(dy) * inv_half
        r = np.sqrt(xn ** f32(self.q) + yn**exponent)
        # Wobble the skin line with a few harmonics of the angle around the axis root.
        angle = np.arctan2(dy * inv_half, xn)
        wobble = np.ones_like(r)
        for harmonic, amplitude, phase in self.wobble:
            wobble += f32(amplitude) * np.cos(f32(harmonic) * angle + f32(phase))
        r /= wobble
        return r

    def skin_distance_mm(self, r: np.ndarray) -> np.ndarray:
        """Approximate distance inside the skin line in mm (negative outside)."""
        return (1 - r) * (self.width * self.depth * self.spacing)

    def pectoral_level(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """< 1 inside the pectoral muscle, > 1 outside (np.inf everywhere on a CC view)."""
        if self.pectoral is None:
            return np.full(np.broadcast_shapes(np.shape(x), np.shape(y)), np.inf, np.float32)
        top, side, exponent = self.pectoral
        xn = np.maximum(x / (self.width * top), 0.0)
        yn = np.maximum(y / (self.height * side), 0.0)
        return xn**exponent + yn**exponent


def _draw_breast(rng: np.random.Generator, *, view: str, width: float, height: float,
                 spacing: float) -> _Breast:
    depth = rng.uniform(0.5, 0.82)
    wobble = tuple(
        (k, float(rng.normal(0, 0.012)), float(rng.uniform(0, 2 * math.pi))) for k in range(2, 7)
    )
    q = rng.uniform(1.7, 2.3)
    if view == "CC":
        center = rng.uniform(0.45, 0.55)
        half = rng.uniform(0.3, 0.41)
        half_up, half_down = half * rng.uniform(0.95, 1.05), half
        p_up = p_down = rng.uniform(1.9, 2.6)
        shear = rng.normal(0, 0.03)
        pectoral = None
    else:
        # MLO: the breast runs up into the axilla (out of the top of the image) with a nearly
        # straight upper contour, and down to the inframammary fold; the nipple droops.
        center = rng.uniform(0.5, 0.62)
        p_up, p_down = rng.uniform(1.15, 1.5), rng.uniform(1.8, 2.4)
        top_width = rng.uniform(0.4, 0.6)  # where the breast leaves the image, fraction of depth
        half_up = center / (1 - top_width**q) ** (1 / p_up)
        half_down = min(rng.uniform(0.28, 0.38), 0.96 - center)
        shear = rng.uniform(0.03, 0.1)
        pectoral = (0.0, rng.uniform(0.35, 0.6), rng.uniform(1.0, 1.4))
    breast = _Breast(
        width=width, height=height, spacing=spacing, depth=depth, center=center,
        half_up=half_up, half_down=half_down, shear=shear, p_up=p_up, p_down=p_down,
        q=q, wobble=wobble, falloff_mm=rng.uniform(12, 25), pectoral=pectoral,
    )
    if pectoral is not None:
        # The muscle's top edge spans most of the breast's width where it leaves the image.
        top = breast.radius(np.linspace(0, width, 512), np.zeros(512))
        top_width = float(np.argmax(top >= 1) or 512) / 512
        muscle = (top_width * rng.uniform(0.75, 0.95), pectoral[1], pectoral[2])
        breast = dataclasses.replace(breast, pectoral=muscle)
    return breast


# --------------------------------------------------------------------------- tissue


@dataclass
class _Fields:
    image: np.ndarray  # display brightness, [0, 1]
    dense: np.ndarray  # fibroglandular fraction, [0, 1]
    detail: np.ndarray  # zero-mean tissue texture
    breast: np.ndarray  # bool
    pectoral: np.ndarray  # bool


def _glands(rng: np.random.Generator, breast: _Breast, x: np.ndarray, y: np.ndarray,
            shape: tuple[int, int], texture: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(glandular field, fine detail, radial streaks) of one parenchyma texture family."""
    detail = _power_law_noise(rng, shape, beta=2.0, stretch=1.3)
    radial = _radial_noise(rng, breast, x, y)
    if texture == "fibroglandular":
        glands = _power_law_noise(rng, shape, beta=rng.uniform(2.8, 3.2), stretch=rng.uniform(1.4, 2.2))
        return glands + 0.45 * radial, detail, radial
    if texture == "nodular":
        # Blotchy lobules: finer 1/f noise plus small nodular densities (under 3 mm).
        glands = _power_law_noise(rng, shape, beta=rng.uniform(2.1, 2.5), stretch=rng.uniform(1.0, 1.3))
        nodules = _power_law_noise(rng, shape, beta=1.2, highpass=0.02)
        glands = glands + 0.6 * _smoothstep(nodules, 1.2, 2.2) + 0.25 * radial
        return glands, detail, radial
    if texture == "streaky":
        # Strongly oriented ducts and trabeculae converging on the nipple.
        glands = _power_law_noise(rng, shape, beta=rng.uniform(2.8, 3.2), stretch=rng.uniform(4.0, 7.0))
        return glands + 1.1 * radial, detail, radial
    if texture == "reticular":
        # A ridged, web-like network (the held-out family): thin bright walls around fat lobules.
        band = _power_law_noise(rng, shape, beta=2.6, highpass=0.01)
        web = np.clip(1 - np.abs(band) / 0.6, 0, 1) ** 3
        glands = 0.6 * _power_law_noise(rng, shape, beta=3.0, stretch=1.5) + 1.6 * web + 0.2 * radial
        return glands, detail, radial
    raise ValueError(f"unknown texture {texture!r}")


def _draw_tissue(rng: np.random.Generator, breast: _Breast, shape: tuple[int, int],
                 density: str, look: Look | None = None) -> _Fields:
    """The smooth anatomy on a (possibly reduced) grid of `shape`."""
    rows, cols = shape
    y = ((np.arange(rows, dtype=np.float32) + 0.5) * (breast.height / rows))[:, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) * (breast.width / cols))[None, :]
    r = breast.radius(x, y).astype(np.float32)
    skin_mm = breast.skin_distance_mm(r)
    pixel_mm = breast.spacing * breast.width / cols
    inside = np.clip(skin_mm / pixel_mm + 0.5, 0, 1)  # anti-aliased skin edge

    if look is None:  # the classic look: draws in the order they always were
        glands = _power_law_noise(rng, shape, beta=rng.uniform(2.8, 3.2), stretch=rng.uniform(1.4, 2.2))
        detail = _power_law_noise(rng, shape, beta=2.0, stretch=1.3)
        radial = _radial_noise(rng, breast, x, y)
    # Fibroglandular tissue sits centrally and behind the nipple, with a fatty rim under the skin.
    envelope = 1 - _smoothstep(r, rng.uniform(0.5, 0.65), rng.uniform(0.85, 0.95))
    envelope *= np.clip(x / (breast.width * 0.08), 0.3, 1)  # retromammary fat at the chest wall
    if look is None:
        glands = glands + 0.45 * radial
    else:
        glands, detail, radial = _glands(rng, breast, x, y, shape, look.texture)
    region = envelope > 0.5
    target = _DENSE_FRACTION[density]
    threshold = float(np.quantile(glands[region], 1 - target)) if region.any() else 0.0
    dense = _sigmoid((glands - threshold) / 0.35 + 0.5 * detail) * envelope
    # Cooper's ligaments and ducts: thin bright strands running toward the nipple, seen in fat.
    ligaments = np.exp(-((radial / 0.2) ** 2)) * (1 - dense)

    thickness = _smoothstep(skin_mm, 0, breast.falloff_mm)
    # Processed (For Presentation) images equalise the periphery: it darkens, but stays visible.
    dense_gain, equalisation = (0.26, 0.45) if look is None else (look.dense_gain, look.equalisation)
    tissue = 0.3 + dense_gain * dense + (0.02 + 0.02 * dense) * detail + 0.05 * ligaments
    tissue *= (1 - equalisation) + equalisation * thickness
    skin = 0.06 * np.exp(-((skin_mm / 1.2) ** 2))

    air = 0.02
    image = air + inside * (tissue + skin - air)

    level = breast.pectoral_level(x, y)
    pectoral = np.zeros(shape, dtype=bool)
    if breast.pectoral is not None:
        muscle = np.clip((1 - level) / 0.1, 0, 1) * inside
        brightness = 0.44 + 0.1 * (1 - y / (breast.height * breast.pectoral[1])) + 0.04 * detail + 0.02 * radial
        image = image * (1 - muscle) + muscle * brightness
        pectoral = (level < 1) & (r < 1)
        dense = dense * (1 - muscle)
    if look is not None and look.sharpen > 0:
        # Edge enhancement over about 2 mm, as a processing station does it.
        image = unsharp(image, look.sharpen, 2.0 / (breast.spacing * breast.width / cols))
    return _Fields(image=image.astype(np.float32), dense=dense.astype(np.float32), detail=detail,
                   breast=r < 1, pectoral=pectoral)


# --------------------------------------------------------------------------- masses


@dataclass(frozen=True)
class _MassShape:
    """One mass: a lobulated, rotated oval body, optionally with spicules."""

    cx: float  # centre, full-size pixel-edge coordinates (canonical orientation)
    cy: float
    radius_px: float
    aspect: float
    angle: float
    lobes: tuple[tuple[int, float, float], ...]
    margin: str
    contrast: float
    spicules: tuple[tuple[float, float, float], ...]  # (angle, length factor, width mm)
    kind: str = ""  # round, oval or irregular (varied phantoms only)

    def reach(self) -> float:
        longest = max((s[1] for s in self.spicules), default=1.0)
        lobes = 1 + sum(abs(a) for _, a, _ in self.lobes)
        return self.radius_px * max(self.aspect, 1) * max(lobes, longest) + 3

    def rho(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius: 1 on the nominal outline of the mass body."""
        dx, dy = x - self.cx, y - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / self.aspect
        v = -dx * s + dy * c
        theta = np.arctan2(v, u)
        outline = np.ones_like(theta)
        for harmonic, amplitude, phase in self.lobes:
            outline += amplitude * np.cos(harmonic * theta + phase)
        return np.hypot(u, v) / (self.radius_px * np.maximum(outline, 0.3))

    def profile(self, x: np.ndarray, y: np.ndarray, spacing: float,
                texture: np.ndarray | float = 0.0) -> np.ndarray:
        """Added brightness per unit contrast on the grid ``x`` (1 x n) by ``y`` (m x 1).

        The body's brightness follows a sphere's projected thickness, mottled by
        ``texture`` (zero-mean, broadcastable to m x n); spicules are thin tapering lines.
        """
        rho = self.rho(x, y)
        dome = 0.55 + 0.45 * np.sqrt(np.clip(1 - rho**2, 0, 1))
        if self.margin == "ill-defined":
            body = _sigmoid((1 - rho) / 0.09)
        else:
            edge = 0.25 / max(self.radius_px * spacing, 1e-6)  # ~1 mm wide edge
            body = _sigmoid((1 - rho) / max(edge, 0.01))
        body *= dome * (1 + 0.2 * texture)
        for angle, length, width_mm in self.spicules:
            self._add_spicule(body, x, y, angle=angle, length=length, width_px=width_mm / spacing)
        return body

    def _add_spicule(self, out: np.ndarray, x: np.ndarray, y: np.ndarray, *, angle: float,
                     length: float, width_px: float) -> None:
        """Draw one spicule into ``out`` (max), only over the sub-grid it can reach."""
        ux, uy = math.cos(angle), math.sin(angle)
        reach = self.radius_px * length
        ends_x = (self.cx + 0.3 * reach * ux, self.cx + reach * ux)
        ends_y = (self.cy + 0.3 * reach * uy, self.cy + reach * uy)
        pad = 3 * max(width_px, 0.7)
        cols = np.flatnonzero((x[0] >= min(ends_x) - pad) & (x[0] <= max(ends_x) + pad))
        rows = np.flatnonzero((y[:, 0] >= min(ends_y) - pad) & (y[:, 0] <= max(ends_y) + pad))
        if cols.size == 0 or rows.size == 0:
            return
        sub_x = x[:, cols[0]:cols[-1] + 1] - self.cx
        sub_y = y[rows[0]:rows[-1] + 1] - self.cy
        t = (sub_x * ux + sub_y * uy) / reach
        across = -sub_x * uy + sub_y * ux
        width = np.maximum(width_px * np.clip(1.2 - t, 0.3, 1), 0.7)  # spicules taper outward
        strength = np.where((t > 0.3) & (t < 1), 0.9 * (1 - t), 0)
        region = out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        np.maximum(region, strength * np.exp(-((across / width) ** 2)), out=region)


def _draw_mass_shape(rng: np.random.Generator, *, spacing: float, size_mm: tuple[float, float],
                     cx: float, cy: float) -> _MassShape:
    margin = MARGINS[int(rng.choice(3, p=(0.4, 0.3, 0.3)))]
    diameter_mm = rng.uniform(*size_mm)
    lobe_scale = {"circumscribed": 0.04, "ill-defined": 0.08, "spiculated": 0.07}[margin]
    lobes = tuple(
        (k, float(rng.normal(0, lobe_scale / math.sqrt(k - 1))), float(rng.uniform(0, 2 * math.pi)))
        for k in range(2, 6)
    )
    spicules: tuple[tuple[float, float, float], ...] = ()
    if margin == "spiculated":
        spicules = draw_spicules(rng, counts=(10, 22), jitter=0.12, lengths=(1.5, 2.6), thinnest_mm=0.3,
                                 diameter_mm=diameter_mm)
    return _MassShape(
        cx=cx, cy=cy, radius_px=diameter_mm / 2 / spacing, aspect=rng.uniform(1.0, 1.45),
        angle=rng.uniform(0, math.pi), lobes=lobes, margin=margin,
        contrast=rng.uniform(0.12, 0.2), spicules=spicules,
    )


def _varied_mass_shape(rng: np.random.Generator, *, spacing: float, variety: Variety, cx: float,
                       cy: float) -> _MassShape:
    drawn: MassDraw = draw_mass(rng, variety)
    return _MassShape(
        cx=cx, cy=cy, radius_px=drawn.diameter_mm / 2 / spacing, aspect=drawn.aspect,
        angle=rng.uniform(0, math.pi), lobes=drawn.lobes, margin=drawn.margin,
        contrast=drawn.contrast, spicules=drawn.spicules, kind=drawn.shape,
    )


def _patch_grid(shape: _MassShape, width: int, height: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    reach = shape.reach()
    c0, c1 = max(int(shape.cx - reach), 0), min(int(math.ceil(shape.cx + reach)), width)
    r0, r1 = max(int(shape.cy - reach), 0), min(int(math.ceil(shape.cy + reach)), height)
    x = (np.arange(c0, c1, dtype=np.float32) + 0.5)[None, :]
    y = (np.arange(r0, r1, dtype=np.float32) + 0.5)[:, None]
    return slice(r0, r1), slice(c0, c1), x, y


def _place_masses(rng: np.random.Generator, breast: _Breast, fields: _Fields, *, count: int,
                  size_mm: tuple[float, float], width: int, height: int,
                  variety: Variety | None = None) -> list[tuple[_MassShape, tuple[int, int, int, int], float]]:
    """Masses wholly inside the breast, outside the pectoral muscle, apart from each other."""
    placed: list[tuple[_MassShape, tuple[int, int, int, int], float]] = []
    low_rows, low_cols = fields.breast.shape
    # Candidate centres: in the breast and off the muscle; the whole box is checked below.
    candidates = np.flatnonzero(fields.breast & ~fields.pectoral)
    gap = 3 / breast.spacing  # keep 3 mm between masses
    for _ in range(count):
        for _attempt in range(40):
            if candidates.size == 0:
                return placed
            index = int(candidates[rng.integers(candidates.size)])
            cy = (index // low_cols + rng.uniform()) * height / low_rows
            cx = (index % low_cols + rng.uniform()) * width / low_cols
            if variety is None:
                shape = _draw_mass_shape(rng, spacing=breast.spacing, size_mm=size_mm, cx=cx, cy=cy)
            else:
                shape = _varied_mass_shape(rng, spacing=breast.spacing, variety=variety, cx=cx, cy=cy)
            rows, cols, x, y = _patch_grid(shape, width, height)
            body = shape.rho(x, y) <= 1
            if not body.any():
                continue
            ys, xs = np.nonzero(body)
            box = (cols.start + int(xs.min()), rows.start + int(ys.min()),
                   cols.start + int(xs.max()) + 1, rows.start + int(ys.max()) + 1)
            if box[0] < 1 or box[1] < 1 or box[2] > width - 1 or box[3] > height - 1:
                continue
            # The whole box, not just the body, lies 2 mm inside the skin and clear of the muscle.
            bx = (np.arange(box[0], box[2], dtype=np.float32) + 0.5)[None, :]
            by = (np.arange(box[1], box[3], dtype=np.float32) + 0.5)[:, None]
            if (np.any(breast.skin_distance_mm(breast.radius(bx, by)) < 2.0)
                    or np.any(breast.pectoral_level(bx, by) < 1.15)):
                continue
            if overlaps(box, [b for _, b, _ in placed], gap):
                continue
            placed.append((shape, box, float(np.count_nonzero(body))))
            break
    return placed


# --------------------------------------------------------------------------- rendering


def _source_positions(count_in: int, start: int, stop: int, count_out: int):
    """Bilinear taps in a grid of ``count_in`` for output pixels ``start..stop-1`` of ``count_out``.

    Pixel centres align as in PIL's and torch's ``align_corners=False`` resize.
    """
    position = (np.arange(start, stop, dtype=np.float64) + 0.5) * (count_in / count_out) - 0.5
    position = np.clip(position, 0, count_in - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, count_in - 1)
    return low, high, (position - low).astype(np.float32)


def _resample(field: np.ndarray, rows: int, columns: int, row_range: tuple[int, int] | None = None,
              column_range: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinear upsampling of ``field`` to ``rows`` x ``columns`` (or a window of it), float32.

    Separable, in numpy: several times faster than a PIL round trip at full size.
    """
    r0, r1 = row_range or (0, rows)
    c0, c1 = column_range or (0, columns)
    top, bottom, wy = _source_positions(field.shape[0], r0, r1, rows)
    left, right, wx = _source_positions(field.shape[1], c0, c1, columns)
    field = field.astype(np.float32, copy=False)
    strip = field[top] * (1 - wy)[:, None]
    strip += field[bottom] * wy[:, None]
    out = np.take(strip, left, axis=1)
    out *= 1 - wx
    right_taps = np.take(strip, right, axis=1)
    right_taps *= wx
    out += right_taps
    return out


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, 0x4D47]))


def _study_rng(seed: int, study: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, study, 0x5354]))


def _look_rng(seed: int, study: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, study, 0x4C4B]))


def _mass_count(rng: np.random.Generator, masses_per_image: int | tuple[int, int]) -> int:
    if isinstance(masses_per_image, int):
        return masses_per_image
    low, high = masses_per_image
    return int(rng.integers(low, high + 1))


@dataclass(frozen=True)
class _Study:
    number: int
    density: str
    bits_stored: int
    patient_id: str
    patient_name: str
    birth_date: str
    study_date: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str


def _draw_study(seed: int, study: int, *, size: str, bits_stored: int | None,
                density: str | None) -> _Study:
    rng = _study_rng(seed, study)
    drawn_density = DENSITIES[int(rng.choice(4, p=_DENSITY_WEIGHTS))]
    drawn_bits = (12, 14)[int(rng.integers(2))]
    age_days = int(rng.integers(40 * 365, 75 * 365))
    study_day = date(2026, 1, 5) + timedelta(days=study)
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["dicom-node phantom", kind, str(seed), str(study), size])

    return _Study(
        number=study,
        density=density or drawn_density,
        bits_stored=bits_stored or drawn_bits,
        patient_id=f"PHANTOM-{seed}-{study:05d}",
        patient_name=f"PHANTOM^SEED{seed}^STUDY{study:05d}",
        birth_date=(study_day - timedelta(days=age_days)).strftime("%Y%m%d"),
        study_date=study_day.strftime("%Y%m%d"),
        study_uid=uid("study"),
        series_uid=uid("series"),
        frame_of_reference_uid=uid("frame-of-reference"),
    )


def _check_options(*, rows: int, columns: int, masses_per_image, mass_size_mm, bits_stored,
                   density=None) -> None:
    """Raise ValueError naming the first invalid phantom option."""
    if rows < 64 or columns < 64:
        raise ValueError(f"rows and columns must be at least 64, not {rows} x {columns}")
    if bits_stored not in (None, 12, 14):
        raise ValueError(f"bits_stored must be 12 or 14, not {bits_stored}")
    if density is not None and density not in DENSITIES:
        raise ValueError(f"density must be one of {DENSITIES}, not {density!r}")
    counts = (masses_per_image,) * 2 if isinstance(masses_per_image, int) else tuple(masses_per_image)
    if len(counts) != 2 or not 0 <= counts[0] <= counts[1]:
        raise ValueError(f"masses_per_image must be a count or (low, high), not {masses_per_image}")
    low_size, high_size = mass_size_mm
    if not 0 < low_size <= high_size:
        raise ValueError(f"mass_size_mm must be (low, high) with 0 < low <= high, not {mass_size_mm}")


def generate_phantom(
    *,
    seed: int = 0,
    index: int = 0,
    rows: int = DEFAULT_ROWS,
    columns: int = DEFAULT_COLUMNS,
    masses_per_image: int | tuple[int, int] = (0, 3),
    mass_size_mm: tuple[float, float] = (8.0, 30.0),
    laterality: str | None = None,
    view: str | None = None,
    density: str | None = None,
    bits_stored: int | None = None,
    variety: Variety | None = None,
) -> Phantom:
    """Render phantom ``index`` of ``seed`` (study ``index // 4``, view ``STUDY_VIEWS[index % 4]``).

    ``laterality``, ``view``, ``density`` and ``bits_stored`` (12 or 14) override what the
    index would give; ``masses_per_image`` is a count or an inclusive ``(low, high)`` range.
    With a ``variety`` (dicom_node.lab.phantom_variety), the size, bit depth, photometric
    interpretation, VOI transformation, processing, texture, masses and hard negatives are
    drawn from its ranges instead (one acquisition look per study), and ``rows``,
    ``columns``, ``masses_per_image``, ``mass_size_mm`` and ``bits_stored`` are not used.
    """
    _check_options(rows=rows, columns=columns, masses_per_image=masses_per_image,
                   mass_size_mm=mass_size_mm, bits_stored=bits_stored, density=density)
    look = None
    if variety is not None:
        look = draw_look(_look_rng(seed, index // 4), variety)
        rows, columns, bits_stored = look.rows, look.columns, look.bits_stored
        masses_per_image = variety.masses_per_image
    study = _draw_study(seed, index // 4, size=f"{rows}x{columns}", bits_stored=bits_stored,
                        density=density)
    default_laterality, default_view = STUDY_VIEWS[index % 4]
    laterality = laterality or default_laterality
    view = view or default_view
    if laterality not in LATERALITIES or view not in VIEWS:
        raise ValueError(f"laterality must be L or R and view CC or MLO, not {laterality!r} {view!r}")

    rng = _image_rng(seed, index)
    spacing = spacing_for(rows, columns) if look is None else look.spacing
    shrink = min(1.0, _MAX_SMOOTH_SIDE / max(rows, columns))
    low_shape = (max(round(rows * shrink), 1), max(round(columns * shrink), 1))
    breast = _draw_breast(rng, view=view, width=columns, height=rows, spacing=spacing)
    fields = _draw_tissue(rng, breast, low_shape, study.density, look)
    shapes = _place_masses(rng, breast, fields, count=_mass_count(rng, masses_per_image),
                           size_mm=mass_size_mm, width=columns, height=rows, variety=variety)

    image = _resample(fields.image, rows, columns)
    masses = []
    for shape, box, area in shapes:
        row_slice, col_slice, x, y = _patch_grid(shape, columns, rows)
        # A mass replacing dense tissue adds less attenuation than one replacing fat.
        ly = min(int(shape.cy * low_shape[0] / rows), low_shape[0] - 1)
        lx = min(int(shape.cx * low_shape[1] / columns), low_shape[1] - 1)
        contrast = shape.contrast * (1 - 0.35 * float(fields.dense[ly, lx]))
        texture = _resample(fields.detail, rows, columns, (row_slice.start, row_slice.stop),
                            (col_slice.start, col_slice.stop))
        profile = shape.profile(x, y, spacing, texture)
        # Blurred margins and spicules stop at the skin line.
        profile *= np.clip(breast.skin_distance_mm(breast.radius(x, y)) / 1.0, 0, 1)
        image[row_slice, col_slice] += contrast * profile
        masses.append(Mass(box=tuple(float(v) for v in box),
                           diameter_mm=round(2 * shape.radius_px * spacing, 2),
                           margin=shape.margin, contrast=round(contrast, 4), area=area, shape=shape.kind))

    breast_mask, pectoral_mask = fields.breast, fields.pectoral
    marks: list[tuple[str, tuple[int, int, int, int]]] = []
    if look is not None:
        # Processing's tone curve, then hard negatives in the final orientation (text reads
        # left to right on either breast), then the noise of the detector.
        np.clip(image, 0, 1, out=image)
        image **= np.float32(look.gamma)
        if laterality == "R":
            image = np.ascontiguousarray(image[:, ::-1])
            breast_mask, pectoral_mask = breast_mask[:, ::-1], pectoral_mask[:, ::-1]
            masses = _mirrored(masses, columns)
        marks = draw_distractors(rng, image, variety=variety, spacing=spacing, laterality=laterality,
                                       view=view, breast=breast_mask, masses=[m.box for m in masses])
    noise_fraction = 0.006 if look is None else look.noise
    max_value = (1 << study.bits_stored) - 1
    image *= max_value
    # Quantum noise: triangular (sum of two uniform bytes), cheaper than Gaussian at this size.
    noise = np.frombuffer(rng.bytes(rows * columns), dtype=np.uint8).reshape(rows, columns).astype(np.float32)
    noise += np.frombuffer(rng.bytes(rows * columns), dtype=np.uint8).reshape(rows, columns)
    noise -= 255
    noise *= noise_fraction * max_value / 104  # 104: the std of the triangular sum above
    image += noise
    np.clip(image, 0, max_value, out=image)
    pixels = np.rint(image, out=image).astype(np.uint16)

    if look is None and laterality == "R":
        pixels = np.ascontiguousarray(pixels[:, ::-1])
        breast_mask, pectoral_mask = breast_mask[:, ::-1], pectoral_mask[:, ::-1]
        masses = _mirrored(masses, columns)

    dataset = _build_dataset(pixels, study=study, seed=seed, index=index, laterality=laterality,
                             view=view, spacing=spacing, look=look, burned_in=bool(marks))
    return Phantom(dataset=dataset, masses=tuple(masses), laterality=laterality, view=view,
                   density=study.density, coarse_breast=breast_mask, coarse_pectoral=pectoral_mask,
                   look=look, distractors=tuple(dict.fromkeys(kind for kind, _ in marks)),
                   distractor_boxes=tuple(marks))


def _mirrored(masses: list[Mass], columns: int) -> list[Mass]:
    return [dataclasses.replace(m, box=(columns - m.box[2], m.box[1], columns - m.box[0], m.box[3]))
            for m in masses]


def phantom_dataset(**kwargs) -> tuple[Dataset, np.ndarray]:
    """One phantom as ``(dataset, boxes)`` without writing it; boxes float32 Nx4 x0,y0,x1,y1.

    Takes the keyword arguments of :func:`generate_phantom`; the dataset is the one
    :func:`write_phantoms` writes for the same ``seed`` and ``index``.
    """
    phantom = generate_phantom(**kwargs)
    return phantom.dataset, phantom.boxes


# --------------------------------------------------------------------------- DICOM


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _build_dataset(pixels: np.ndarray, *, study: _Study, seed: int, index: int, laterality: str,
                   view: str, spacing: float, look: Look | None = None, burned_in: bool = False) -> Dataset:
    """A Digital Mammography X-Ray Image For Presentation (PS3.3 A.26.1) around `pixels`.

    `pixels` are MONOCHROME2 values (dense tissue bright); a ``look`` may store them
    MONOCHROME1 and choose the VOI transformation (:func:`_set_voi`).
    """
    rows, columns = pixels.shape
    max_value = (1 << study.bits_stored) - 1
    photometric = "MONOCHROME2" if look is None else look.photometric
    if photometric == "MONOCHROME1":
        pixels = max_value - pixels  # PS3.3 C.7.6.3.1.2: the minimum value is displayed white
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid(
        entropy_srcs=["dicom-node phantom", "instance", str(seed), str(index), f"{rows}x{columns}"]
    )
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = "090000"
    # Patient (PS3.3 C.7.1.1): obviously fake identifiers.
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = "F"
    ds.PatientComments = SYNTHETIC_NOTICE
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "090000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{study.number + 1}"
    ds.AccessionNumber = f"PHANTOM{seed % 1000:03d}{study.number:06d}"[:16]
    ds.StudyDescription = f"MAMMOGRAPHY {SYNTHETIC_NOTICE}"
    # General / DX / Mammography Series (C.7.3.1, C.8.11.1, C.8.11.6)
    ds.Modality = "MG"
    ds.SeriesInstanceUID = study.series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = SYNTHETIC_NOTICE
    ds.PresentationIntentType = "FOR PRESENTATION"
    # Frame of Reference (C.7.4.1): one per study, as the breast does not move between views.
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment (C.7.5.1)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic mammogram phantom"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "SYNTHETIC"
    # General Image, DX Image, Mammography Image (C.7.6.1, C.8.11.3, C.8.11.7)
    ds.InstanceNumber = index % 4 + 1
    ds.ImageType = ["DERIVED", "PRIMARY", ""]
    ds.ImageComments = SYNTHETIC_NOTICE
    ds.PatientOrientation = _PATIENT_ORIENTATION[(laterality, view)]
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.BodyPartExamined = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.AnatomicRegionSequence = Sequence([_code("76752008", "Breast")])
    view_item = _code(*_VIEW_CODES[view])
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])
    ds.AcquisitionContextSequence = Sequence()
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = study.bits_stored
    ds.HighBit = study.bits_stored - 1
    ds.PixelRepresentation = 0
    # DX Image (C.8.11.3): processed, log-like values; dense tissue has higher values.
    ds.PixelIntensityRelationship = "LOG"
    # +1: higher values are more attenuating (brighter); MONOCHROME1 stores them inverted.
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    # DX Image (C.8.11.3): INVERSE goes with MONOCHROME1, IDENTITY with MONOCHROME2.
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    _set_voi(ds, look, max_value)
    # DX Detector (C.8.11.4): a flat panel; no magnification, so both spacings agree.
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [round(spacing, 6)] * 2
    ds.PixelSpacing = [round(spacing, 6)] * 2
    ds.PixelData = pixels.tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def _set_voi(ds: Dataset, look: Look | None, max_value: int) -> None:
    """The VOI LUT module (PS3.3 C.11.2): a window, a VOI LUT Sequence, or (a varied look's
    \"none\", as some vendors send) nothing, leaving the viewer to its own choice."""
    center, width = (0.47, 0.9) if look is None else look.window
    kind = "LINEAR" if look is None else look.voi
    inverted = look is not None and look.photometric == "MONOCHROME1"
    if kind in ("LINEAR", "SIGMOID"):
        # The window spans air to the brightest tissue; MONOCHROME1 mirrors its centre.
        ds.WindowCenter = round((1 - center if inverted else center) * max_value)
        ds.WindowWidth = round(width * max_value)
        ds.WindowCenterWidthExplanation = "PHANTOM"
        ds.VOILUTFunction = kind
    elif kind == "LUT":
        # A 12-bit table over every stored value (C.11.2.1.1): a soft S curve around the window.
        entries = max_value + 1
        stored = np.arange(entries, dtype=np.float64)
        shown = max_value - stored if inverted else stored
        curve = _sigmoid((shown / max_value - center) / (width / 4))
        table = np.rint(4095 * (1 - curve if inverted else curve)).astype(np.uint16)
        item = Dataset()
        # 65536 entries are written as 0 (C.11.1.1.1: the LUT Descriptor's first value).
        item.LUTDescriptor = [entries if entries < 65536 else 0, 0, 12]
        item.LUTExplanation = "PHANTOM S CURVE"
        # LUT Data (0028,3006) is US or OW; over 32767 entries a US value no longer fits an
        # explicit VR's 16-bit length (PS3.5 7.1.2), so large tables go as OW, as vendors send them.
        if entries > 32767:
            item.add_new(0x00283006, "OW", table.astype("<u2").tobytes())
        else:
            item.add_new(0x00283006, "US", table.tolist())
        ds.VOILUTSequence = Sequence([item])


# --------------------------------------------------------------------------- writing


def image_file_name(index: int) -> str:
    """Where image ``index`` goes, relative to the output folder."""
    laterality, view = STUDY_VIEWS[index % 4]
    return f"images/study_{index // 4:05d}/{laterality}_{view}.dcm"


def _collect(results: Iterable, n: int, progress: Callable[[int, int], None] | None) -> list:
    collected = []
    for done, result in enumerate(results, start=1):
        collected.append(result)
        if progress is not None:
            progress(done, n)
    return collected


def _write_one(out: Path, index: int, *, options: dict) -> tuple[dict, list[Mass]]:
    phantom = generate_phantom(index=index, **options)
    image = _image_entry(phantom, index)
    write_atomically(out / image["file_name"],
                     lambda handle: phantom.dataset.save_as(handle, enforce_file_format=True),
                     fsync=False, mode=SHARED)
    return image, list(phantom.masses)


def _image_entry(phantom: Phantom, index: int) -> dict:
    """The COCO image entry of phantom ``index`` (with the fields ``--by`` can break down by)."""
    name = image_file_name(index)
    ds = phantom.dataset
    image = {
        "id": index + 1,
        "file_name": name,
        "width": int(ds.Columns),
        "height": int(ds.Rows),
        "view": phantom.view,
        "laterality": phantom.laterality,
        "density": phantom.density,
        "patient_id": str(ds.PatientID),
        "study_uid": str(ds.StudyInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "pixel_spacing_mm": float(ds.PixelSpacing[0]),
        "synthetic": True,
    }
    if phantom.look is not None:
        image.update(phantom.look.describe())
        image["distractors"] = ",".join(phantom.distractors) or "none"
    return image


def write_phantoms(
    out: Path,
    *,
    n: int,
    seed: int = 0,
    rows: int = DEFAULT_ROWS,
    columns: int = DEFAULT_COLUMNS,
    masses_per_image: int | tuple[int, int] = (0, 3),
    mass_size_mm: tuple[float, float] = (8.0, 30.0),
    bits_stored: int | None = None,
    variety: Variety | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` phantom DICOM files under ``out/images`` and ``out/annotations.json`` (COCO).

    Images are grouped four to a study (R CC, L CC, R MLO, L MLO). The annotation file is
    written last, atomically, so its presence means the set is complete. Returns its path.
    ``workers`` > 1 renders in that many processes (same bytes: every image has its own
    seed). ``progress(done, n)`` is called after each image.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(rows=rows, columns=columns, masses_per_image=masses_per_image,
                   mass_size_mm=mass_size_mm, bits_stored=bits_stored)
    _check_options(**options)
    options.update(seed=seed, variety=variety)
    indices = range(n)
    if workers == 1:
        results = map(partial(_write_one, out, options=options), indices)
        images_and_masses = _collect(results, n, progress)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(partial(_write_one, out, options=options), indices, chunksize=4)
            images_and_masses = _collect(results, n, progress)
    coco = _coco(images_and_masses, _info(seed, variety, rows=rows, columns=columns))
    return write_atomically(out / ANNOTATIONS_NAME, json.dumps(coco, indent=1), fsync=False, mode=SHARED)


def _info(seed: int, variety: Variety | None, **size) -> dict:
    """The COCO "info" of a phantom set (``size``: the rows and columns of a classic set)."""
    return {"description": f"dicom-node synthetic mammogram phantoms - {SYNTHETIC_NOTICE}", "seed": seed,
            **size, **({"variety": variety.describe()} if variety is not None else {})}


def _coco(images_and_masses: list[tuple[dict, list[Mass]]], info: dict) -> dict:
    """The COCO dictionary of rendered phantoms (image entries with their masses)."""
    images, annotations = [], []
    for image, masses in images_and_masses:
        images.append(image)
        for mass in masses:
            x, y, w, h = mass.coco_bbox
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image["id"],
                "category_id": MASS_CATEGORY_ID,
                "bbox": [x, y, w, h],
                "area": mass.area,
                "iscrowd": 0,
                "margin": mass.margin,
                "diameter_mm": mass.diameter_mm,
                "contrast": mass.contrast,
                **({"shape": mass.shape} if mass.shape else {}),
            })
    return {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}


def _prepare_one(index: int, *, options: dict, input_size: int, half: bool):
    from dicom_node.pixels import prepare

    phantom = generate_phantom(index=index, **options)
    prepared = prepare(phantom.dataset, input_size=input_size)
    boxes = prepared.boxes_from_original(phantom.boxes)
    if half:
        prepared = dataclasses.replace(prepared, pixels=prepared.pixels.astype(np.float16))
    return (prepared, boxes, index + 1), (_image_entry(phantom, index), list(phantom.masses))


def _one_thread_each() -> None:
    # One process per CPU already: torch's resize would otherwise start a thread per CPU in
    # each of them (16 x 16 threads on a 16-core machine).
    import torch

    torch.set_num_threads(1)


def prepared_phantoms(*, n: int, seed: int, variety: Variety | None, input_size: int, workers: int = 1,
                      half: bool = False, progress: Callable[[int, int], None] | None = None,
                      rows: int = DEFAULT_ROWS, columns: int = DEFAULT_COLUMNS):
    """``n`` phantoms rendered in memory and prepared by the node's pixel pipeline, never written.

    Returns ``(items, coco)``: items are ``(PreparedImage, boxes in prepared pixels, image id)``
    as a COCO dataset yields them, and ``coco`` is the annotation dictionary
    :func:`write_phantoms` would write for the same arguments (without files). Training
    on many full-size phantoms this way needs no disk (a 4096 x 3328 image is 27 MB).
    ``half`` keeps the prepared pixels as float16. ``rows`` and ``columns`` size classic
    phantoms (a ``variety`` draws its own sizes).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    size = {} if variety is not None else {"rows": rows, "columns": columns}  # checked by generate_phantom
    work = partial(_prepare_one, options={"seed": seed, "variety": variety, **size}, input_size=input_size,
                   half=half)
    if workers <= 1:
        results = _collect(map(work, range(n)), n, progress)
    else:
        # Spawned, not forked: the caller (training) has torch's thread pools running, and a
        # forked child that resizes with torch can wait forever on a lock copied held.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread_each) as pool:
            results = _collect(pool.map(work, range(n), chunksize=4), n, progress)
    return [item for item, _ in results], _coco([entry for _, entry in results], _info(seed, variety, **size))
