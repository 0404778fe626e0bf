"""Mass detection: torchvision architectures, checkpoints, the detector interface.

The worker (dicom_node.analyse.worker) turns jobs into detections through
`load_detector` and `Detector.detect`; training and evaluation build models with
`build_model` and read/write checkpoints with `save_checkpoint`/`load_checkpoint`.
"""

from dicom_node.analyse.architectures import ARCHITECTURES, MASS_LABEL, build_model
from dicom_node.analyse.detector import (
    Detection,
    Detector,
    FixedBoxesDetector,
    TorchDetector,
    load_detector,
)
from dicom_node.analyse.weights import (
    CHECKPOINT_FORMAT,
    demo_weights_path,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FORMAT",
    "MASS_LABEL",
    "Detection",
    "Detector",
    "FixedBoxesDetector",
    "TorchDetector",
    "build_model",
    "demo_weights_path",
    "load_checkpoint",
    "load_detector",
    "model_from_checkpoint",
    "save_checkpoint",
]
