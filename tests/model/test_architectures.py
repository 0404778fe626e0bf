"""Every architecture builds without weights and runs on a small seeded tensor."""

from __future__ import annotations

import pytest
import torch

from dicom_node.config import ARCHITECTURES as CONFIG_ARCHITECTURES
from dicom_node.model.architectures import (
    ARCHITECTURES,
    MASS_LABEL,
    NoResizeTransform,
    build_model,
)


def test_table_covers_every_configurable_network():
    assert set(ARCHITECTURES) == set(CONFIG_ARCHITECTURES) - {"fixed_boxes"}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_builds_and_runs_without_resizing(architecture):
    torch.manual_seed(0)
    model = build_model(architecture).eval()
    assert isinstance(model.transform, NoResizeTransform)
    images = [torch.rand(3, 128, 96), torch.rand(3, 96, 80)]
    with torch.inference_mode():
        batch, _ = model.transform(images)
        outputs = model(images)
    # The model normalises and pads but keeps the sizes the pixel pipeline chose.
    assert batch.image_sizes == [(128, 96), (96, 80)]
    assert len(outputs) == 2
    for output, (height, width) in zip(outputs, [(128, 96), (96, 80)], strict=True):
        boxes = output["boxes"]
        assert boxes.shape[1] == 4 and len(boxes) == len(output["scores"]) == len(output["labels"])
        # boxes are in the coordinates of the image given, not of a resized one
        if len(boxes):
            assert boxes[:, 0::2].max() <= width and boxes[:, 1::2].max() <= height
            assert output["scores"].min() >= 0.05


@pytest.mark.parametrize("architecture", ["retinanet_r18_fpn", "faster_rcnn_r50_fpn"])
def test_trains_with_the_mass_label(architecture):
    torch.manual_seed(0)
    model = build_model(architecture).train()
    target = {
        "boxes": torch.tensor([[20.0, 30.0, 60.0, 80.0]]),
        "labels": torch.tensor([MASS_LABEL]),
    }
    losses = model([torch.rand(3, 128, 96)], [target])
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert model.backbone.body.conv1.weight.grad is not None


def test_one_foreground_class_plus_background():
    retinanet = build_model("retinanet_r18_fpn")
    assert retinanet.head.classification_head.num_classes == 2
    faster = build_model("faster_rcnn_r50_fpn")
    assert faster.roi_heads.box_predictor.cls_score.out_features == 2


def test_normalisation_and_build_options_are_recorded():
    model = build_model(
        "retinanet_r50_fpn", image_mean=[0.1, 0.2, 0.3], image_std=[1, 2, 3], stride_in_1x1=True
    )
    assert model.transform.image_mean == [0.1, 0.2, 0.3]
    assert model.build_options == {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [1.0, 2.0, 3.0],
        "stride_in_1x1": True,
    }


def test_stride_in_1x1_moves_the_stride_not_the_output_size():
    plain = build_model("retinanet_r50_fpn").eval()
    msra = build_model("retinanet_r50_fpn", stride_in_1x1=True).eval()
    for stage in ("layer2", "layer3", "layer4"):
        block = getattr(msra.backbone.body, stage)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
        assert getattr(plain.backbone.body, stage)[0].conv2.stride == (2, 2)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        shapes = [tuple(v.shape) for v in msra.backbone(x).values()]
        assert shapes == [tuple(v.shape) for v in plain.backbone(x).values()]


def test_unknown_or_non_network_architecture_is_refused():
    with pytest.raises(ValueError, match="retinanet_r101_fpn"):
        build_model("yolo")
    with pytest.raises(ValueError, match="unknown architecture 'fixed_boxes'"):
        build_model("fixed_boxes")
    with pytest.raises(ValueError, match="ResNet-18"):
        build_model("retinanet_r18_fpn", stride_in_1x1=True)
