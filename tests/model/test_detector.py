"""The detector interface: box placement in original pixels, thresholds, loading errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dicom_node.config import DetectorConfig
from dicom_node.errors import CheckpointError, ConfigError
from dicom_node.model.architectures import MASS_LABEL
from dicom_node.model.checkpoints import model_from_checkpoint, save_checkpoint
from dicom_node.model.detector import (
    Detection,
    FixedBoxesDetector,
    TorchDetector,
    load_detector,
    resolve_device,
)
from dicom_node.pixels import prepare
from tests.synthetic import mammogram

RELATIVE_BOXES = [[0.25, 0.5, 0.5, 0.75, 0.9], [0.0, 0.0, 1.0, 1.0, 0.6], [0.1, 0.1, 0.2, 0.2, 0.3]]


def boxes_file(tmp_path, boxes=RELATIVE_BOXES, label="TEST DOUBLE - fixed boxes"):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"label": label, "boxes": boxes}))
    return path


def images():
    """Two mammograms of different sizes and aspect ratios, prepared at 128."""
    return [
        prepare(mammogram(rows=256, columns=192, seed=1), input_size=128),
        prepare(mammogram(rows=150, columns=401, seed=2), input_size=128),
    ]


def test_fixed_boxes_land_on_the_original_pixels(tmp_path):
    config = DetectorConfig(
        architecture="fixed_boxes",
        weights=str(boxes_file(tmp_path)),
        score_threshold=0.5,
        input_size=128,
    )
    detector = load_detector(config)
    assert isinstance(detector, FixedBoxesDetector)
    assert detector.input_size == 128 and detector.label.startswith("TEST DOUBLE")
    prepared = images()
    results = detector.detect(prepared)
    assert len(results) == 2
    for image, detections in zip(prepared, results, strict=True):
        rows, columns = image.original_shape
        kept = [b for b in RELATIVE_BOXES if b[4] >= 0.5]  # the 0.3 box is under the threshold
        assert [d.score for d in detections] == [b[4] for b in kept]
        for detection, box in zip(detections, kept, strict=True):
            expected = np.array(box[:4]) * [columns, rows, columns, rows]
            np.testing.assert_allclose(detection.box, expected, atol=1e-6)
            assert detection.label == "mass"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "not found"),
        ("{not json", "not a JSON boxes file"),
        (json.dumps({"label": "real model", "boxes": []}), "TEST DOUBLE"),
        (json.dumps({"label": "TEST DOUBLE", "boxes": [[0, 0, 2, 1, 0.5]]}), r"\[0, 1\]"),
        (json.dumps({"label": "TEST DOUBLE", "boxes": [[0, 0, 1]]}), "x0, y0, x1, y1, score"),
        (json.dumps({"label": "TEST DOUBLE", "boxes": [[0] * 10]}), "x0, y0, x1, y1, score"),
        (json.dumps({"label": "TEST DOUBLE", "boxes": [[0, 0, 1, 1, 1], [0, 1]]}), "score"),
    ],
)
def test_bad_fixed_boxes_file(tmp_path, content, match):
    path = tmp_path / "boxes.json"
    if content is not None:
        path.write_text(content)
    config = DetectorConfig(architecture="fixed_boxes", weights=str(path))
    with pytest.raises(CheckpointError, match=match) as error:
        load_detector(config)
    assert str(path) in str(error.value)


class StubModel(nn.Module):
    """Returns fixed outputs in the coordinates of the image it is given (as torchvision does)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, images):
        self.seen.append([tuple(image.shape) for image in images])
        outputs = []
        for image in images:
            height, width = image.shape[-2:]
            outputs.append(
                {
                    "boxes": torch.tensor(
                        [
                            [0.0, 0.0, width / 2, height / 2],  # mass, high score
                            [width / 4, 0.0, width, height],  # mass, below threshold
                            [0.0, 0.0, width, height],  # background label
                            [width / 2, height / 2, width, height],  # mass, best score
                        ]
                    ),
                    "scores": torch.tensor([0.7, 0.2, 0.99, 0.8]),
                    "labels": torch.tensor([MASS_LABEL, MASS_LABEL, 0, MASS_LABEL]),
                }
            )
        return outputs


def test_torch_detector_filters_sorts_and_maps_boxes():
    model = StubModel()
    detector = TorchDetector(model, input_size=128, score_threshold=0.5, label="stub", batch_size=2)
    prepared = images() + images()[:1]
    results = detector.detect(prepared)
    # batches of two; grayscale replicated to three channels, at the prepared size
    assert [len(batch) for batch in model.seen] == [2, 1]
    assert model.seen[0][0] == (3, *prepared[0].pixels.shape)
    assert len(results) == 3
    for image, detections in zip(prepared, results, strict=True):
        rows, columns = image.original_shape
        assert [d.score for d in detections] == pytest.approx([0.8, 0.7])
        np.testing.assert_allclose(
            detections[0].box, [columns / 2, rows / 2, columns, rows], rtol=1e-6
        )
        np.testing.assert_allclose(detections[1].box, [0, 0, columns / 2, rows / 2], rtol=1e-6)


def test_real_model_detections_are_in_original_pixels(tmp_path, r18_checkpoint, r18_label):
    # Make every anchor a confident mass so the real postprocessing yields boxes.
    model, checkpoint = model_from_checkpoint(r18_checkpoint, architecture="retinanet_r18_fpn")
    with torch.no_grad():
        bias = model.head.classification_head.cls_logits.bias.view(-1, 2)
        bias[:, 1] = 4.0
    path = save_checkpoint(
        tmp_path / "confident.pt",
        model=model,
        architecture="retinanet_r18_fpn",
        input_size=checkpoint["input_size"],
        label=r18_label,
        trained={},
    )
    config = DetectorConfig(
        architecture="retinanet_r18_fpn", weights=str(path), score_threshold=0.3
    )
    detector = load_detector(config)
    assert detector.input_size == 160  # from the checkpoint: the config did not set one
    assert detector.label == r18_label
    ds = mammogram(rows=300, columns=220, seed=4)
    results = detector.detect([prepare(ds, input_size=detector.input_size)])
    assert len(results) == 1 and results[0]
    scores = [d.score for d in results[0]]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.3
    boxes = np.array([d.box for d in results[0]])
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 220 and boxes[:, 3].max() <= 300
    # boxes span the original image, not just the 160-pixel model input
    assert boxes[:, 3].max() > 200
    assert all(isinstance(d, Detection) for d in results[0])


def test_explicit_config_input_size_overrides_the_checkpoint(r18_checkpoint):
    config = DetectorConfig(
        architecture="retinanet_r18_fpn", weights=str(r18_checkpoint), input_size=96
    )
    assert load_detector(config).input_size == 96


def test_the_checkpoint_names_architecture_and_input_size(r18_checkpoint):
    """`weights` alone is enough: no architecture in the config, or an input_size given as None."""
    for config in (DetectorConfig(weights=str(r18_checkpoint)),
                   DetectorConfig.model_validate({"weights": str(r18_checkpoint), "input_size": None})):
        detector = load_detector(config)
        assert (detector.architecture, detector.input_size) == ("retinanet_r18_fpn", 160)


def test_checkpoint_for_another_architecture(r18_checkpoint):
    config = DetectorConfig(architecture="retinanet_r101_fpn", weights=str(r18_checkpoint))
    with pytest.raises(CheckpointError) as error:
        load_detector(config)
    assert str(r18_checkpoint) in str(error.value) and "retinanet_r101_fpn" in str(error.value)
    assert "'retinanet_r18_fpn', detector.architecture asks for 'retinanet_r101_fpn'" in str(error.value)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    config = DetectorConfig(architecture="faster_rcnn_r50_fpn", weights=str(path))
    with pytest.raises(CheckpointError) as error:
        load_detector(config)
    assert str(path) in str(error.value) and "faster_rcnn_r50_fpn" in str(error.value)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_empty_input_gives_empty_output(r18_checkpoint):
    detector = load_detector(
        DetectorConfig(architecture="retinanet_r18_fpn", weights=str(r18_checkpoint))
    )
    assert detector.detect([]) == []


def test_fixed_boxes_file_without_boxes_finds_nothing(tmp_path):
    path = boxes_file(tmp_path, boxes=[])
    detector = load_detector(DetectorConfig(architecture="fixed_boxes", weights=str(path)))
    assert detector.detect(images()) == [[], []]
