"""What a phantom can look like: the ranges the varied phantoms are drawn from, and named sets of them.

A model trained on one look learns the look (issue #9: demo weights that reached AP50
0.91 on their own generator's phantoms found nothing on another generator's, and marked
a film's burned-in view letters as masses). A :class:`Variety` widens every property a
detector could latch on to that is not the mass itself:

- the acquisition ("vendor look", drawn once per study, as one machine takes a study):
  image size about 2000 x 1500 to 4096 x 3328 with a field of 23-30 cm, bits stored
  10/12/14/16, MONOCHROME1 or MONOCHROME2, the VOI transformation (a LINEAR or SIGMOID
  window, a VOI LUT Sequence table, or none at all), quantum noise, and the processing
  (tone curve, peripheral equalisation, edge enhancement, how bright dense tissue is);
- the breast: parenchyma texture family, BI-RADS density A-D;
- the masses: conspicuity (contrast bands, subtle to obvious), 4-60 mm (log-uniform),
  round / oval / irregular shapes with circumscribed, ill-defined or spiculated margins;
- hard negatives, never labelled: burned-in text and view letters, rulers, skin and
  nipple markers, the compression paddle's edge.

Training draws from :data:`TRAINING`; the held-out sets of the demo weights draw from
variants that move one property *outside* the training ranges (:data:`HELDOUT`), so
their figures say how a model does on a look it never saw.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

TEXTURES = ("fibroglandular", "nodular", "streaky", "reticular")
SHAPES = ("round", "oval", "irregular")
MARGINS = ("circumscribed", "ill-defined", "spiculated")
VOI_KINDS = ("LINEAR", "SIGMOID", "LUT", "none")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
DISTRACTORS = ("text", "view_letters", "ruler", "markers", "paddle")


@dataclass(frozen=True)
class Variety:
    """Ranges one varied phantom is drawn from. Bands are inclusive ``(low, high)`` pairs;
    a value is drawn from a band chosen in proportion to its width."""

    rows: tuple[tuple[int, int], ...] = ((2000, 2900), (3500, 4096))
    aspect: tuple[float, float] = (0.76, 0.84)  # columns / rows
    field_mm: tuple[float, float] = (230.0, 300.0)  # height of the detector's field
    textures: tuple[str, ...] = ("fibroglandular", "nodular", "streaky")
    mass_contrast: tuple[tuple[float, float], ...] = ((0.035, 0.075), (0.11, 0.28))
    mass_size_mm: tuple[float, float] = (4.0, 60.0)
    masses_per_image: tuple[int, int] = (0, 3)
    bits_stored: tuple[int, ...] = (10, 12, 14, 16)
    monochrome1: float = 0.3  # share of studies stored MONOCHROME1
    voi: tuple[str, ...] = VOI_KINDS
    noise: tuple[float, float] = (0.003, 0.014)  # quantum noise std, fraction of full scale
    gamma: tuple[float, float] = (0.75, 1.35)
    dense_gain: tuple[float, float] = (0.16, 0.36)
    equalisation: tuple[float, float] = (0.25, 0.65)
    sharpen: tuple[float, float] = (0.0, 0.9)
    distractors: float = 0.8  # chance of each hard negative kind on an image (paddle: half of it)

    def __post_init__(self) -> None:
        unknown = set(self.textures) - set(TEXTURES) or set(self.voi) - set(VOI_KINDS)
        if unknown:
            raise ValueError(f"unknown phantom texture or VOI kind: {sorted(unknown)}")
        if any(not 64 <= low <= high for low, high in self.rows):
            raise ValueError(f"rows bands must be 64 <= low <= high, not {self.rows}")
        if any(not 0 < low <= high for low, high in self.mass_contrast):
            raise ValueError(f"mass_contrast bands must be 0 < low <= high, not {self.mass_contrast}")
        if not 0 < self.mass_size_mm[0] <= self.mass_size_mm[1]:
            raise ValueError(f"mass_size_mm must be 0 < low <= high, not {self.mass_size_mm}")
        if set(self.bits_stored) - {10, 12, 14, 16}:
            raise ValueError(f"bits_stored must be among 10, 12, 14, 16, not {self.bits_stored}")

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _from_bands(rng: np.random.Generator, bands: tuple[tuple[float, float], ...]) -> float:
    widths = np.array([high - low for low, high in bands], dtype=np.float64)
    weights = widths / widths.sum() if widths.sum() > 0 else np.full(len(bands), 1 / len(bands))
    low, high = bands[int(rng.choice(len(bands), p=weights))]
    return float(rng.uniform(low, high)) if high > low else float(low)


@dataclass(frozen=True)
class Look:
    """One study's acquisition and processing, drawn from a :class:`Variety`."""

    rows: int
    columns: int
    spacing: float  # mm
    texture: str
    bits_stored: int
    photometric: str
    voi: str
    noise: float
    gamma: float
    dense_gain: float
    equalisation: float
    sharpen: float
    window: tuple[float, float]  # (centre, width) as fractions of full scale, before MONOCHROME1

    def describe(self) -> dict:
        return {"texture": self.texture, "bits_stored": self.bits_stored, "photometric": self.photometric,
                "voi": self.voi, "rows": self.rows, "columns": self.columns}


def draw_look(rng: np.random.Generator, variety: Variety) -> Look:
    rows = int(round(_from_bands(rng, tuple((float(a), float(b)) for a, b in variety.rows))))
    columns = int(round(rows * rng.uniform(*variety.aspect) / 2)) * 2
    if len(variety.rows) == 1 and variety.rows[0][0] == variety.rows[0][1] and variety.aspect[0] == variety.aspect[1]:
        columns = int(round(rows * variety.aspect[0]))  # a fixed size stays exactly that size
    return Look(
        rows=rows,
        columns=columns,
        spacing=float(rng.uniform(*variety.field_mm)) / rows,
        texture=variety.textures[int(rng.integers(len(variety.textures)))],
        bits_stored=int(variety.bits_stored[int(rng.integers(len(variety.bits_stored)))]),
        photometric=PHOTOMETRICS[int(rng.uniform() < variety.monochrome1)],
        voi=variety.voi[int(rng.integers(len(variety.voi)))],
        noise=float(rng.uniform(*variety.noise)),
        gamma=float(rng.uniform(*variety.gamma)),
        dense_gain=float(rng.uniform(*variety.dense_gain)),
        equalisation=float(rng.uniform(*variety.equalisation)),
        sharpen=float(rng.uniform(*variety.sharpen)),
        window=(float(rng.uniform(0.4, 0.55)), float(rng.uniform(0.7, 1.0))),
    )


@dataclass(frozen=True)
class MassDraw:
    """What a varied mass is (its position is chosen by the generator)."""

    shape: str
    margin: str
    diameter_mm: float
    contrast: float
    aspect: float
    lobes: tuple[tuple[int, float, float], ...]
    spicules: tuple[tuple[float, float, float], ...]


def draw_spicules(rng: np.random.Generator, *, counts: tuple[int, int], jitter: float,
                  lengths: tuple[float, float], thinnest_mm: float,
                  diameter_mm: float) -> tuple[tuple[float, float, float], ...]:
    """Spicules spread around the mass: (angle, length as a multiple of the radius, width mm)."""
    count = int(rng.integers(*counts))
    base = rng.uniform(0, 2 * math.pi)
    return tuple(
        (base + 2 * math.pi * i / count + rng.normal(0, jitter), float(rng.uniform(*lengths)),
         float(max(thinnest_mm, diameter_mm * rng.uniform(0.02, 0.045))))
        for i in range(count)
    )


def draw_mass(rng: np.random.Generator, variety: Variety) -> MassDraw:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    margin = MARGINS[int(rng.choice(3, p=(0.4, 0.3, 0.3)))]
    low, high = variety.mass_size_mm
    diameter = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    aspect = {"round": (1.0, 1.12), "oval": (1.3, 1.9), "irregular": (1.0, 1.5)}[shape]
    harmonics = range(2, 9) if shape == "irregular" else range(2, 6)
    scale = 0.16 if shape == "irregular" else 0.035
    lobes = tuple((k, float(rng.normal(0, scale / math.sqrt(k - 1))), float(rng.uniform(0, 2 * math.pi)))
                  for k in harmonics)
    spicules: tuple[tuple[float, float, float], ...] = ()
    if margin == "spiculated":
        spicules = draw_spicules(rng, counts=(8, 24), jitter=0.15, lengths=(1.4, 2.6), thinnest_mm=0.25,
                                 diameter_mm=min(diameter, 30))
    return MassDraw(shape=shape, margin=margin, diameter_mm=diameter,
                    contrast=_from_bands(rng, variety.mass_contrast), aspect=float(rng.uniform(*aspect)),
                    lobes=lobes, spicules=spicules)


# ---------------------------------------------------------------- named varieties

TRAINING = Variety()
"""What the demo weights train on."""

HELDOUT: dict[str, Variety] = {
    # The training ranges, fresh seeds: the in-distribution figure.
    "in_distribution": TRAINING,
    # A parenchyma texture family the training never draws (a ridged, web-like network).
    "texture_reticular": dataclasses.replace(TRAINING, textures=("reticular",)),
    # Mass contrast in the band between the training's subtle and obvious bands.
    "contrast_band": dataclasses.replace(TRAINING, mass_contrast=((0.075, 0.11),)),
    # 3328 x 2560 (the generator's default, a common 70 micrometre detector), inside the
    # gap between the training's two size bands.
    "size_3328x2560": dataclasses.replace(TRAINING, rows=((3328, 3328),), aspect=(2560 / 3328, 2560 / 3328)),
}

VARIETIES: dict[str, Variety] = {"training": TRAINING, **{name: v for name, v in HELDOUT.items() if v is not TRAINING}}
"""Every named variety: what configs (``[data] train_phantoms``) and the CLI may name."""


# ---------------------------------------------------------------- hard negatives

_VIEW_TEXT = {("L", "CC"): ("LCC", "L CC"), ("R", "CC"): ("RCC", "R CC"),
              ("L", "MLO"): ("LMLO", "L MLO"), ("R", "MLO"): ("RMLO", "R MLO")}
_OTHER_TEXT = ("MLO", "CC", "L", "R", "XCCL", "ML", "28 kV", "120 mAs", "C: 12 daN", "SYNTHETIC",
               "0.0 deg", "#%d", "2026-01-%02d", "AEC", "T: 45 mm")


def overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]],
             margin: float) -> bool:
    """Whether ``box`` comes within ``margin`` pixels of any of ``others`` (all x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in others)


def _text_mask(text: str, height_px: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(int(height_px), 6))
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(right - left, 1) + 4, max(bottom - top, 1) + 4))
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, fill=255, font=font)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _place(rng, image: np.ndarray, patch: np.ndarray, value: float, keep_clear, margin: float,
           *, air: np.ndarray | None) -> tuple[int, int, int, int] | None:
    """Stamp ``patch`` (alpha in [0, 1]) at a random spot clear of the boxes; prefer air if given."""
    rows, columns = image.shape
    ph, pw = patch.shape
    if ph >= rows or pw >= columns:
        return None
    for attempt in range(30):
        y, x = int(rng.integers(0, rows - ph)), int(rng.integers(0, columns - pw))
        box = (x, y, x + pw, y + ph)
        if overlaps(box, keep_clear, margin):
            continue
        if air is not None and attempt < 20:
            ay = min(int((y + ph / 2) * air.shape[0] / rows), air.shape[0] - 1)
            ax = min(int((x + pw / 2) * air.shape[1] / columns), air.shape[1] - 1)
            if not air[ay, ax]:
                continue
        region = image[y:y + ph, x:x + pw]
        region += (value - region) * patch
        return box
    return None


def draw_distractors(rng: np.random.Generator, image: np.ndarray, *, variety: Variety, spacing: float,
                     laterality: str, view: str, breast: np.ndarray,
                     masses: list[tuple[float, float, float, float]]) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Burn hard negatives into ``image`` (display brightness, [0, 1], final orientation), in place.

    None of them overlaps a mass box (with a 3 mm margin), so the labels stay true.
    ``breast`` is the coarse breast mask in the same orientation. Returns ``(kind, box)`` of
    each mark drawn (box ``x0, y0, x1, y1`` in pixels).
    """
    drawn: list[tuple[str, tuple[int, int, int, int]]] = []
    margin = 3 / spacing
    air = ~breast
    rows, columns = image.shape
    keep_clear = list(masses)

    def record(kind: str, box: tuple[int, int, int, int] | None) -> None:
        if box:
            keep_clear.append(box)
            drawn.append((kind, box))

    bright = float(rng.uniform(0.85, 1.0))
    if rng.uniform() < variety.distractors:
        text = _VIEW_TEXT[(laterality, view)][int(rng.integers(2))]
        record("view_letters", _place(rng, image, _text_mask(text, rng.uniform(8, 22) / spacing), bright,
                                      keep_clear, margin, air=air))
    if rng.uniform() < variety.distractors:
        for _ in range(int(rng.integers(1, 4))):
            text = _OTHER_TEXT[int(rng.integers(len(_OTHER_TEXT)))]
            text = text % int(rng.integers(1, 29)) if "%" in text else text
            record("text", _place(rng, image, _text_mask(text, rng.uniform(3, 9) / spacing), bright,
                                  keep_clear, margin, air=air if rng.uniform() < 0.8 else None))
    if rng.uniform() < variety.distractors * 0.5:
        length = int(rng.uniform(60, 150) / spacing)
        tick = 10 / spacing
        thick = max(int(0.6 / spacing), 1)
        patch = np.zeros((int(6 / spacing) + thick, length), dtype=np.float32)
        patch[:thick] = 1
        for i in range(int(length / (tick / 2)) + 1):
            x = int(i * tick / 2)
            patch[:int((6 if i % 2 == 0 else 3) / spacing), x:x + thick] = 1
        if rng.uniform() < 0.5:
            patch = np.ascontiguousarray(patch.T)
        record("ruler", _place(rng, image, patch, bright, keep_clear, margin, air=air))
    if rng.uniform() < variety.distractors:
        for _ in range(int(rng.integers(1, 4))):
            radius = rng.uniform(1.0, 2.5) / spacing  # a skin or nipple marker: a metal bead, saturated
            size = int(2 * radius + 3)
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
            disc = np.clip(radius - np.hypot(yy, xx) + 0.5, 0, 1)
            if rng.uniform() < 0.3:  # a ring marker (scar, mole)
                disc = disc * np.clip(np.hypot(yy, xx) - radius * 0.6 + 0.5, 0, 1)
            record("markers", _place(rng, image, disc, 1.0, keep_clear, margin, air=None))
    if rng.uniform() < variety.distractors * 0.5:
        # The compression paddle's edge: a straight line across the image, with a slight step.
        y = int(rng.uniform(0.02, 0.12) * rows) if rng.uniform() < 0.5 else int(rng.uniform(0.88, 0.98) * rows)
        line = (0, y - 2, columns, y + 3)
        if not overlaps(line, keep_clear, margin):
            step = float(rng.uniform(-0.04, 0.04))
            if y < rows / 2:
                image[:y] += step
            else:
                image[y:] += step
            image[max(y - 1, 0):y + 2] += float(rng.uniform(0.05, 0.15)) * (1 if rng.uniform() < 0.5 else -1)
            drawn.append(("paddle", line))
    return drawn


def unsharp(field: np.ndarray, amount: float, sigma_px: float) -> np.ndarray:
    """Edge enhancement as processing stations do it: field + amount x (field - blurred field)."""
    if amount <= 0:
        return field
    rows, columns = field.shape
    fy = np.fft.fftfreq(rows).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(columns).astype(np.float32)[None, :]
    gain = np.exp(-2 * (math.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    blurred = np.fft.irfft2(np.fft.rfft2(field) * gain, s=field.shape).astype(np.float32)
    return field + amount * (field - blurred)
