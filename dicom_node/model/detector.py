"""The detector interface: prepared images in, mass boxes in original pixels out.

`load_detector` picks the implementation from ``config.detector.architecture``:
a torchvision model loaded from a checkpoint (TorchDetector), or for tests the
FixedBoxesDetector, which returns the boxes listed in a JSON file. Both map boxes
with PreparedImage.boxes_to_original, the pipeline's one box mapping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from dicom_node.config import DetectorConfig
from dicom_node.errors import CheckpointError, ConfigError
from dicom_node.log import get_logger
from dicom_node.model.architectures import MASS_LABEL
from dicom_node.model.checkpoints import model_from_checkpoint, weights_file
from dicom_node.pixels import PreparedImage

FIXED_BOXES = "fixed_boxes"
_TEST_DOUBLE_PREFIX = "TEST DOUBLE"

log = get_logger(__name__)


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in ORIGINAL pixel coordinates
    score: float
    label: str = "mass"


class Detector(Protocol):
    architecture: str  # the checkpoint's (or fixed_boxes)
    input_size: int
    label: str  # what the weights are, e.g. "DEMO WEIGHTS - synthetic masses only, ..."
    # Tells models apart: results of another model get other UIDs (analyse.worker.result_uid).
    fingerprint: str

    def detect(self, images: Sequence[PreparedImage]) -> list[list[Detection]]:
        """One list of detections per image, in original pixel coordinates, best first."""
        ...


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a config value: auto (CUDA if available, else CPU), cpu, cuda[:N]."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"workers.device: {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"workers.device: {device!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    return resolved


class TorchDetector:
    """A torchvision detector loaded once, run in eval mode under inference_mode."""

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int,
        score_threshold: float,
        label: str = "unlabelled weights",
        device: str | torch.device = "cpu",
        batch_size: int = 2,
        fingerprint: str | None = None,
        architecture: str = "unnamed",
    ):
        self.device = resolve_device(device)
        self.architecture = architecture
        self.model = model.to(self.device).eval()
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.label = label
        # load_detector passes the checkpoint's; a model built in memory has only its label.
        self.fingerprint = fingerprint or model_fingerprint(label=label, input_size=input_size,
                                                            score_threshold=score_threshold)
        self.batch_size = max(1, batch_size)

    def detect(self, images: Sequence[PreparedImage]) -> list[list[Detection]]:
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            # Grayscale replicated to the 3 channels the backbone expects.
            tensors = [
                torch.from_numpy(np.ascontiguousarray(image.pixels, dtype=np.float32))
                .to(self.device)
                .expand(3, -1, -1)
                for image in batch
            ]
            with torch.inference_mode():
                outputs = self.model(tensors)
            for image, output in zip(batch, outputs, strict=True):
                keep = (output["labels"] == MASS_LABEL) & (output["scores"] >= self.score_threshold)
                boxes = output["boxes"][keep].float().cpu().numpy()
                scores = output["scores"][keep].float().cpu().numpy()
                results.append(_detections(image, boxes, scores))
        return results


# The test double has no checkpoint to take its input size from.
FIXED_BOXES_INPUT_SIZE = 1333


class FixedBoxesDetector:
    """Test double: the same boxes, given relative to the image, for every image.

    The weights file is JSON: ``{"label": "TEST DOUBLE ...", "boxes": [[x0, y0, x1,
    y1, score], ...]}`` with coordinates in [0, 1] of the image width/height.
    """

    architecture = FIXED_BOXES

    def __init__(self, boxes: np.ndarray, *, label: str, input_size: int, score_threshold: float):
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        self.label = label
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.fingerprint = model_fingerprint(
            architecture=FIXED_BOXES, boxes=self.boxes.tolist(), input_size=input_size,
            score_threshold=score_threshold,
        )

    @classmethod
    def from_file(
        cls, path: str | Path, *, input_size: int, score_threshold: float
    ) -> FixedBoxesDetector:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: boxes file not found (architecture {FIXED_BOXES})"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"{path}: not a JSON boxes file (architecture {FIXED_BOXES}): {error}"
            ) from None
        label = data.get("label") if isinstance(data, dict) else None
        if not isinstance(label, str) or not label.startswith(_TEST_DOUBLE_PREFIX):
            raise CheckpointError(
                f"{path}: a {FIXED_BOXES} file needs a label starting with {_TEST_DOUBLE_PREFIX!r}"
            )
        try:
            boxes = np.asarray(data.get("boxes", []), dtype=np.float64)
        except (TypeError, ValueError):  # ragged or non-numeric lists
            boxes = np.full((1, 1), np.nan)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 5)
        if boxes.ndim != 2 or boxes.shape[1] != 5 or not np.all((boxes >= 0) & (boxes <= 1)):
            raise CheckpointError(
                f"{path}: boxes must be [[x0, y0, x1, y1, score], ...] with values in [0, 1] "
                f"(architecture {FIXED_BOXES})"
            )
        return cls(boxes, label=label, input_size=input_size, score_threshold=score_threshold)

    def detect(self, images: Sequence[PreparedImage]) -> list[list[Detection]]:
        results = []
        kept = self.boxes[self.boxes[:, 4] >= self.score_threshold]
        for image in images:
            rows, columns = image.pixels.shape
            # Relative -> the model's (resized) pixels, then the one mapping back,
            # exactly the path a real model's boxes take.
            resized = kept[:, :4] * np.array([columns, rows, columns, rows])
            results.append(_detections(image, resized, kept[:, 4]))
        return results


def model_fingerprint(**facts) -> str:
    """A short digest of what makes a model's output what it is (weights, sizes, threshold)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_detector(
    config: DetectorConfig, *, device: str = "cpu", asked_by: str = "detector.architecture"
) -> Detector:
    """The detector that `config` names; CheckpointError naming file and architecture.

    The checkpoint names its architecture and input size; `config.architecture`, when
    set, must agree (a CheckpointError naming both and `asked_by` otherwise), and
    `config.input_size`, when set, overrides the checkpoint's. The node and evaluation
    both come here, so both follow this one rule.
    """
    if config.architecture == FIXED_BOXES:
        return FixedBoxesDetector.from_file(
            config.weights,
            input_size=config.input_size or FIXED_BOXES_INPUT_SIZE,
            score_threshold=config.score_threshold,
        )
    path = weights_file(config.weights)
    model, checkpoint = model_from_checkpoint(path, architecture=config.architecture, asked_by=asked_by)
    architecture = checkpoint["architecture"]
    input_size = checkpoint["input_size"]
    # The checkpoint knows the size it was trained at; an input_size set in the config overrides it.
    if config.input_size is not None and config.input_size != input_size:
        log.warning(
            "input_size_override",
            checkpoint_input_size=input_size,
            config_input_size=config.input_size,
            weights=str(path),
        )
        input_size = config.input_size
    detector = TorchDetector(
        model,
        input_size=input_size,
        score_threshold=config.score_threshold,
        label=checkpoint["label"],
        device=device,
        architecture=architecture,
        fingerprint=model_fingerprint(
            architecture=architecture, weights_sha256=file_sha256(path),
            input_size=input_size, score_threshold=config.score_threshold,
        ),
    )
    log.info(
        "detector_loaded",
        architecture=architecture,
        weights=str(path),
        input_size=input_size,
        device=str(detector.device),
        label=checkpoint["label"],
    )
    return detector


def _detections(image: PreparedImage, boxes: np.ndarray, scores: np.ndarray) -> list[Detection]:
    original = image.boxes_to_original(boxes)
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [
        Detection(box=tuple(float(v) for v in original[i]), score=float(scores[i]))
        for i in order
        if original[i, 2] > original[i, 0] and original[i, 3] > original[i, 1]
    ]


__all__ = [
    "FIXED_BOXES",
    "Detection",
    "Detector",
    "FixedBoxesDetector",
    "TorchDetector",
    "load_detector",
    "resolve_device",
]
