"""The model library: architectures, checkpoints, the detector interface, Detectron2 import.

Shared by the node and the lab. The node's analysis workers (dicom_node.analyse) turn
images into detections through `load_detector` and `Detector.detect`; training and
evaluation (dicom_node.lab) build models with `build_model` and read and write
checkpoints with `save_checkpoint`/`load_checkpoint`. Nothing here imports the node or
the lab.
"""

from dicom_node.model.architectures import ARCHITECTURES, MASS_LABEL, build_model
from dicom_node.model.checkpoints import (
    CHECKPOINT_FORMAT,
    demo_weights_path,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from dicom_node.model.detector import (
    Detection,
    Detector,
    FixedBoxesDetector,
    TorchDetector,
    load_detector,
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
