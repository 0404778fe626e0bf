"""The detector architectures, a small table of torchvision builders keyed by the config string.

As in the study's Detectron2 configs:

- RetinaNet: ResNet + FPN P3-P7 (P6 from C5, P7 from P6), 4-conv heads, focal
  loss, anchors of 3 scales x 3 aspect ratios per level, sizes 32..512.
- Faster R-CNN: ResNet + FPN P2-P6 (P6 by max pooling P5), RPN with one anchor
  size per level x 3 aspect ratios, RoIAlign 7x7 and two 1024-wide FC layers.

Conventions (the same for every architecture, so training and the detector need
no per-architecture cases):

- Class labels follow torchvision: 0 is background, ``MASS_LABEL`` (1) is a mass.
  Both model families therefore get ``num_classes + 1`` outputs; RetinaNet's
  background column is never a positive target and so learns to stay low.
- Input is the pixel pipeline's [0, 1] grayscale, replicated to 3 channels.
  ``IMAGE_MEAN``/``IMAGE_STD`` are (0, 0.25): zero mean keeps black, the air
  around the breast, at 0 after normalisation, the same value torchvision pads
  batches with; std 0.25 gives roughly unit variance for windowed mammograms.
  Checkpoints imported from Detectron2 carry their own mean/std (see
  detectron2_import) in the checkpoint's ``model_options``.
- The model never resizes: dicom_node.pixels already did, so the model's
  transform only normalises and pads; its output boxes are in the coordinates of
  the image it was given, which PreparedImage.boxes_to_original maps back.
- Backbones use trainable BatchNorm (there are no pretrained weights here to
  freeze, by rule nothing is downloaded); in eval mode it is the same affine
  map as Detectron2's FrozenBN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

MASS_LABEL = 1
IMAGE_MEAN = (0.0, 0.0, 0.0)
IMAGE_STD = (0.25, 0.25, 0.25)
# Low on purpose: evaluation needs the whole score range (FROC, AP); the
# detector applies config.detector.score_threshold on top.
MODEL_SCORE_THRESHOLD = 0.05
# Detectron2's and torchvision's smallest anchor (on P3 for RetinaNet, P2 for Faster R-CNN);
# each level doubles it. The demo weights use 16 so that 4 mm masses on a full-size image,
# about 14 pixels at a 1024-pixel input, have anchors of their size.
DEFAULT_SMALLEST_ANCHOR = 32


@dataclass(frozen=True)
class ArchitectureSpec:
    family: Literal["retinanet", "faster_rcnn"]
    depth: Literal[18, 50, 101]
    fpn_channels: int = 256


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "retinanet_r101_fpn": ArchitectureSpec("retinanet", 101),
    "retinanet_r50_fpn": ArchitectureSpec("retinanet", 50),
    "faster_rcnn_r101_fpn": ArchitectureSpec("faster_rcnn", 101),
    "faster_rcnn_r50_fpn": ArchitectureSpec("faster_rcnn", 50),
    # The shipped demo weights: small enough for the package (< 30 MB in fp16).
    "retinanet_r18_fpn": ArchitectureSpec("retinanet", 18, fpn_channels=128),
}


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform without the resize: normalise and pad to a multiple of 32 only."""

    def resize(self, image, target=None):
        return image, target


def architecture_spec(architecture: str) -> ArchitectureSpec:
    """The table entry for `architecture`; ValueError listing the known ones otherwise."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        ) from None


def smallest_anchor_of(build_options: dict) -> int:
    """The anchor size a model was built with, from its recorded ``build_options`` (a
    checkpoint's ``model_options``), where build_model records it only when not the default."""
    return build_options.get("smallest_anchor", DEFAULT_SMALLEST_ANCHOR)


def build_model(
    architecture: str,
    *,
    num_classes: int = 1,
    image_mean: tuple[float, ...] | list[float] = IMAGE_MEAN,
    image_std: tuple[float, ...] | list[float] = IMAGE_STD,
    stride_in_1x1: bool = False,
    smallest_anchor: int = DEFAULT_SMALLEST_ANCHOR,
) -> nn.Module:
    """A randomly initialised torchvision detector for `architecture` (never downloads).

    `num_classes` counts foreground classes; background is added (label 0).
    `image_mean`/`image_std` are per RGB channel for [0, 1] input. `stride_in_1x1`
    puts the stride of each stage's first bottleneck in its 1x1 conv, as the MSRA
    ResNets that Detectron2 models start from do (torchvision: in the 3x3).
    `smallest_anchor` is the anchor size on the finest level (pixels of the model's input).
    The keyword arguments are recorded in ``model.build_options`` so that a
    checkpoint can rebuild the same model (``smallest_anchor`` only when not the default,
    so checkpoints written before it existed read the same).
    """
    spec = architecture_spec(architecture)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    options = {
        "image_mean": [float(v) for v in image_mean],
        "image_std": [float(v) for v in image_std],
        "stride_in_1x1": bool(stride_in_1x1),
    }
    if len(options["image_mean"]) != 3 or len(options["image_std"]) != 3:
        raise ValueError("image_mean and image_std need one value per RGB channel")
    if stride_in_1x1 and spec.depth == 18:
        raise ValueError("stride_in_1x1 applies to bottleneck ResNets (50, 101), not ResNet-18")
    if not 4 <= int(smallest_anchor) <= 256:
        raise ValueError(f"smallest_anchor must be 4..256 pixels, not {smallest_anchor}")
    if int(smallest_anchor) != DEFAULT_SMALLEST_ANCHOR:
        options["smallest_anchor"] = int(smallest_anchor)

    body = _resnet(spec.depth, stride_in_1x1=stride_in_1x1)
    if spec.family == "retinanet":
        model = _retinanet(body, spec, num_classes + 1, int(smallest_anchor))
    else:
        model = _faster_rcnn(body, spec, num_classes + 1, int(smallest_anchor))
    # Sizes are unused: NoResizeTransform never resizes.
    model.transform = NoResizeTransform(
        min_size=800,
        max_size=1333,
        image_mean=options["image_mean"],
        image_std=options["image_std"],
    )
    model.build_options = options
    return model


def _resnet(depth: int, *, stride_in_1x1: bool) -> resnet.ResNet:
    builder = {18: resnet.resnet18, 50: resnet.resnet50, 101: resnet.resnet101}[depth]
    body = builder(weights=None, norm_layer=nn.BatchNorm2d)
    if stride_in_1x1:
        for stage in (body.layer2, body.layer3, body.layer4):
            first = stage[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, first.conv1.stride
    return body


def _fpn_backbone(
    body: resnet.ResNet, spec: ArchitectureSpec, *, stages: list[int], extra_blocks
) -> BackboneWithFPN:
    in_channels = [_block_out_channels(getattr(body, f"layer{stage}")[-1]) for stage in stages]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{stage}": str(index) for index, stage in enumerate(stages)},
        in_channels_list=in_channels,
        out_channels=spec.fpn_channels,
        extra_blocks=extra_blocks,
    )


def _block_out_channels(block: nn.Module) -> int:
    last_conv = block.conv3 if hasattr(block, "conv3") else block.conv2
    return last_conv.out_channels


def _retinanet(body: resnet.ResNet, spec: ArchitectureSpec, classes: int, smallest_anchor: int) -> RetinaNet:
    c5_channels = _block_out_channels(body.layer4[-1])
    # P6 from C5, as Detectron2's RetinaNet (torchvision's v1 builder takes P5).
    backbone = _fpn_backbone(
        body, spec, stages=[2, 3, 4], extra_blocks=LastLevelP6P7(c5_channels, spec.fpn_channels)
    )
    # torchvision's default head is the v1 one (no GroupNorm), like Detectron2's
    # default RetinaNet head; anchors are 3 scales x 3 ratios per level (32..512 by default).
    # The same rounding as torchvision's default generator, so that 32 builds exactly it.
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (smallest_anchor * 2**i for i in range(5)))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return RetinaNet(backbone, num_classes=classes, score_thresh=MODEL_SCORE_THRESHOLD,
                     anchor_generator=anchors)


def _faster_rcnn(body: resnet.ResNet, spec: ArchitectureSpec, classes: int, smallest_anchor: int) -> FasterRCNN:
    backbone = _fpn_backbone(body, spec, stages=[1, 2, 3, 4], extra_blocks=LastLevelMaxPool())
    sizes = tuple((smallest_anchor * 2**i,) for i in range(5))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return FasterRCNN(backbone, num_classes=classes, box_score_thresh=MODEL_SCORE_THRESHOLD,
                      rpn_anchor_generator=anchors)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (for logs and the checkpoint size check)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ARCHITECTURES",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MASS_LABEL",
    "MODEL_SCORE_THRESHOLD",
    "ArchitectureSpec",
    "NoResizeTransform",
    "architecture_spec",
    "build_model",
    "count_parameters",
    "smallest_anchor_of",
]
