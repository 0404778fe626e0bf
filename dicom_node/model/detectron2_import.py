"""Import Detectron2 RetinaNet / Faster R-CNN (R50/R101-FPN) weights into our checkpoint format.

Detectron2 writes ``model_final.pth`` (torch.save of ``{"model": state_dict, ...}``)
and the model zoo ships ``.pkl`` files (pickle of ``{"model": {name: numpy array}}``).
Both are mapped name by name onto the torchvision models of
dicom_node.model.architectures; every Detectron2 weight must find a place and
every weight of ours must be filled, or the import fails naming the keys.

What differs between the two frameworks, and what the mapping does about it:

- Input: Detectron2 feeds BGR pixels in 0..255 minus ``PIXEL_MEAN`` divided by
  ``PIXEL_STD`` (MSRA backbones: mean 103.530, 116.280, 123.675, std 1). We feed
  RGB in [0, 1]. The stem conv's input channels are reversed to RGB, and the
  checkpoint's ``model_options`` get ``image_mean = mean/255`` and
  ``image_std = std/255`` (RGB order), which gives the network the same numbers.
- ResNet: MSRA backbones stride in the first 1x1 conv of a stage; torchvision in
  the 3x3. ``stride_in_1x1`` (Detectron2's RESNETS.STRIDE_IN_1X1, default True)
  is stored in ``model_options`` and rebuilt on load. FrozenBN statistics map to
  BatchNorm buffers (identical in eval mode, eps 1e-5 in both).
- RetinaNet anchors: Detectron2 orders a location's anchors size-major (for
  each size, each aspect ratio), torchvision ratio-major; cls_score and
  bbox_pred output channels are permuted accordingly. torchvision's anchor sizes
  are whole pixels (40 and 50 instead of 40.3 and 50.8): decoded boxes differ by
  under 1 % in size. Detectron2 has no background class in RetinaNet; our
  torchvision convention has label 0 = background, filled with a zero weight and
  the focal-loss prior bias (score 0.01, below any threshold).
- Faster R-CNN classes: Detectron2's cls_score puts background LAST, torchvision
  FIRST (rows are rotated); Detectron2's class-specific bbox_pred has no rows for
  background, torchvision's does (zero rows are inserted).
- Box regression weights are not in the state dict; the defaults agree and are
  left as they are: RetinaNet (1, 1, 1, 1), RPN (1, 1, 1, 1), ROI heads
  (10, 10, 5, 5). Detectron2's ROIAlignV2 (aligned=True) differs from
  torchvision's MultiScaleRoIAlign by half a pixel in sampling: Faster R-CNN
  scores can differ slightly from Detectron2's.
- Resizing: Detectron2 resizes the shortest side (e.g. 800, max 1333); we resize
  the longest side to ``input_size``. Pick the input_size that gives the same
  scale for your images (e.g. 1040 for 800 on a 4:3 mammogram).
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dicom_node.errors import CheckpointError
from dicom_node.model.architectures import architecture_spec, build_model
from dicom_node.model.checkpoints import load_state, save_checkpoint

# Detectron2 MSRA defaults (configs/Base-*.yaml): BGR order, 0..255 scale.
MSRA_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
MSRA_PIXEL_STD_BGR = (1.0, 1.0, 1.0)
_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_ANCHOR_SIZES = 3  # RetinaNet: 3 scales per level ...
_ANCHOR_RATIOS = 3  # ... x 3 aspect ratios
_PRIOR_PROBABILITY = 0.01  # focal loss prior, as both frameworks initialise cls_score
_KEYS_SHOWN = 5


def import_detectron2(
    src: str | Path,
    dst: str | Path,
    *,
    architecture: str,
    input_size: int = 1333,
    label: str | None = None,
    stride_in_1x1: bool = True,
    input_format: Literal["BGR", "RGB"] = "BGR",
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    half: bool = False,
) -> Path:
    """Convert the Detectron2 checkpoint `src` (.pkl or .pth) into our checkpoint `dst`.

    `pixel_mean`/`pixel_std` are the Detectron2 config's MODEL.PIXEL_MEAN/STD in
    `input_format` order on the 0..255 scale; by default they are read from the
    checkpoint when it has them, else the MSRA values. Raises CheckpointError
    naming the file and architecture when the weights do not fit.
    """
    src, dst = Path(src), Path(dst)
    try:
        detectron2_key_map(architecture)
    except ValueError as error:
        raise CheckpointError(f"{src}: cannot import into {architecture}: {error}") from None
    source = read_detectron2_weights(src)
    mean = _pixel_statistic(source, "pixel_mean", pixel_mean, MSRA_PIXEL_MEAN_BGR, input_format)
    std = _pixel_statistic(source, "pixel_std", pixel_std, MSRA_PIXEL_STD_BGR, input_format)
    # Detectron2's channel order -> RGB, 0..255 -> [0, 1].
    mean_rgb = mean[::-1] if input_format == "BGR" else mean
    std_rgb = std[::-1] if input_format == "BGR" else std
    state_dict = map_state_dict(
        source, architecture=architecture, path=src, bgr_input=input_format == "BGR"
    )
    model = build_model(
        architecture,
        image_mean=[m / 255.0 for m in mean_rgb],
        image_std=[s / 255.0 for s in std_rgb],
        stride_in_1x1=stride_in_1x1,
    )
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state_dict[name] = torch.zeros_like(tensor)
    load_state(model, state_dict, path=src, architecture=architecture)
    return save_checkpoint(
        dst,
        model=model,
        architecture=architecture,
        input_size=input_size,
        label=label or f"Detectron2 weights imported from {src.name}; not for clinical use",
        trained={
            "source": "detectron2",
            "file": src.name,
            "stride_in_1x1": stride_in_1x1,
            "input_format": input_format,
            "pixel_mean": mean,
            "pixel_std": std,
        },
        half=half,
    )


def read_detectron2_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a Detectron2 .pkl or .pth file, as tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: Detectron2 checkpoint not found")
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as handle:
                content = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle and torch raise many types for a bad file
        raise CheckpointError(f"{path}: cannot read as a Detectron2 checkpoint: {error}") from None
    model = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(model, dict) or not model:
        raise CheckpointError(f"{path}: no 'model' state dict in this Detectron2 checkpoint")
    weights: dict[str, torch.Tensor] = OrderedDict()
    for name, value in model.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value))
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {name} is a {type(value).__name__}, not an array")
        weights[name.removeprefix("module.")] = value
    return weights


def detectron2_key_map(architecture: str) -> dict[str, str]:
    """Detectron2 parameter/buffer name -> our state-dict name, for `architecture`."""
    spec = architecture_spec(architecture)
    if spec.depth not in _BLOCKS:
        raise ValueError(f"{architecture}: Detectron2 import supports ResNet-50/101 FPN models")
    names: dict[str, str] = {}

    def conv_norm(d2: str, ours_conv: str, ours_norm: str) -> None:
        names[f"{d2}.weight"] = f"{ours_conv}.weight"
        for buffer in _NORM_BUFFERS:
            names[f"{d2}.norm.{buffer}"] = f"{ours_norm}.{buffer}"

    def conv(d2: str, ours: str) -> None:
        names[f"{d2}.weight"] = f"{ours}.weight"
        names[f"{d2}.bias"] = f"{ours}.bias"

    bottom_up, body = "backbone.bottom_up", "backbone.body"
    conv_norm(f"{bottom_up}.stem.conv1", f"{body}.conv1", f"{body}.bn1")
    for stage, blocks in enumerate(_BLOCKS[spec.depth], start=2):
        for block in range(blocks):
            d2, ours = f"{bottom_up}.res{stage}.{block}", f"{body}.layer{stage - 1}.{block}"
            for index in (1, 2, 3):
                conv_norm(f"{d2}.conv{index}", f"{ours}.conv{index}", f"{ours}.bn{index}")
            if block == 0:
                conv_norm(f"{d2}.shortcut", f"{ours}.downsample.0", f"{ours}.downsample.1")

    levels = [3, 4, 5] if spec.family == "retinanet" else [2, 3, 4, 5]
    for index, level in enumerate(levels):
        conv(f"backbone.fpn_lateral{level}", f"backbone.fpn.inner_blocks.{index}.0")
        conv(f"backbone.fpn_output{level}", f"backbone.fpn.layer_blocks.{index}.0")

    if spec.family == "retinanet":
        conv("backbone.top_block.p6", "backbone.fpn.extra_blocks.p6")
        conv("backbone.top_block.p7", "backbone.fpn.extra_blocks.p7")
        for index in range(4):  # Sequential of conv, ReLU: the convs are 0, 2, 4, 6
            conv(f"head.cls_subnet.{2 * index}", f"head.classification_head.conv.{index}.0")
            conv(f"head.bbox_subnet.{2 * index}", f"head.regression_head.conv.{index}.0")
        conv("head.cls_score", "head.classification_head.cls_logits")
        conv("head.bbox_pred", "head.regression_head.bbox_reg")
    else:
        conv("proposal_generator.rpn_head.conv", "rpn.head.conv.0.0")
        conv("proposal_generator.rpn_head.objectness_logits", "rpn.head.cls_logits")
        conv("proposal_generator.rpn_head.anchor_deltas", "rpn.head.bbox_pred")
        conv("roi_heads.box_head.fc1", "roi_heads.box_head.fc6")
        conv("roi_heads.box_head.fc2", "roi_heads.box_head.fc7")
        conv("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.cls_score")
        conv("roi_heads.box_predictor.bbox_pred", "roi_heads.box_predictor.bbox_pred")
    return names


def map_state_dict(
    source: dict[str, torch.Tensor],
    *,
    architecture: str,
    path: str | Path = "<state dict>",
    bgr_input: bool = True,
) -> OrderedDict[str, torch.Tensor]:
    """Rename and convert a Detectron2 state dict to ours (without BatchNorm counters)."""
    names = detectron2_key_map(architecture)
    ignored = [key for key in source if _is_ignored(key)]
    missing = [key for key in names if key not in source]
    unexpected = [key for key in source if key not in names and key not in ignored]
    if missing or unexpected:
        details = [
            f"{len(keys)} {title}: {', '.join(keys[:_KEYS_SHOWN])}"
            + (f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else "")
            for title, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise CheckpointError(
            f"{path}: Detectron2 weights do not fit architecture {architecture}: "
            + "; ".join(details)
        )
    family = architecture_spec(architecture).family
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for d2_name, ours in names.items():
        tensor = source[d2_name].detach().to(torch.float32)
        if d2_name == "backbone.bottom_up.stem.conv1.weight" and bgr_input:
            tensor = tensor.flip(1)  # BGR input channels -> RGB
        elif family == "retinanet" and d2_name.startswith("head.cls_score."):
            tensor = _retinanet_classes(tensor, path=path, architecture=architecture)
        elif family == "retinanet" and d2_name.startswith("head.bbox_pred."):
            tensor = _permute_anchors(tensor, per_anchor=4)
        elif d2_name.startswith("roi_heads.box_predictor.cls_score."):
            tensor = _background_first(tensor, path=path, architecture=architecture)
        elif d2_name.startswith("roi_heads.box_predictor.bbox_pred."):
            tensor = torch.cat([torch.zeros_like(tensor[:4]), tensor])  # background's rows
        mapped[ours] = tensor
    return mapped


def detectron2_anchor_order() -> list[int]:
    """For each torchvision anchor index (ratio-major), the Detectron2 index (size-major)."""
    return [
        size * _ANCHOR_RATIOS + ratio
        for ratio in range(_ANCHOR_RATIOS)
        for size in range(_ANCHOR_SIZES)
    ]


def _permute_anchors(tensor: torch.Tensor, *, per_anchor: int) -> torch.Tensor:
    anchors = _ANCHOR_SIZES * _ANCHOR_RATIOS
    grouped = tensor.reshape(anchors, per_anchor, *tensor.shape[1:])
    return grouped[detectron2_anchor_order()].reshape(tensor.shape)


def _retinanet_classes(tensor: torch.Tensor, *, path, architecture: str) -> torch.Tensor:
    anchors = _ANCHOR_SIZES * _ANCHOR_RATIOS
    classes = tensor.shape[0] // anchors
    if classes != 1:
        raise CheckpointError(
            f"{path}: RetinaNet cls_score has {classes} classes; {architecture} imports "
            "single-class (mass) models only"
        )
    ours = _permute_anchors(tensor, per_anchor=classes).reshape(anchors, classes, *tensor.shape[1:])
    background = torch.zeros_like(ours[:, :1])
    if tensor.dim() == 1:  # bias: the focal-loss prior keeps background scores at 0.01
        background.fill_(-math.log((1 - _PRIOR_PROBABILITY) / _PRIOR_PROBABILITY))
    return torch.cat([background, ours], dim=1).reshape(anchors * (classes + 1), *tensor.shape[1:])


def _background_first(tensor: torch.Tensor, *, path, architecture: str) -> torch.Tensor:
    if tensor.shape[0] != 2:
        raise CheckpointError(
            f"{path}: Faster R-CNN cls_score has {tensor.shape[0] - 1} classes; {architecture} "
            "imports single-class (mass) models only"
        )
    return torch.cat([tensor[-1:], tensor[:-1]])


def _is_ignored(key: str) -> bool:
    # Not weights: pixel statistics (read separately), anchor buffers that older
    # Detectron2 versions saved, and BatchNorm counters of non-frozen norms.
    return (
        key in ("pixel_mean", "pixel_std")
        or ".cell_anchors." in key
        or key.endswith("num_batches_tracked")
    )


def _pixel_statistic(
    source: dict[str, torch.Tensor],
    key: str,
    given: Sequence[float] | None,
    default_bgr: tuple[float, ...],
    input_format: str,
) -> list[float]:
    if given is not None:
        values = [float(v) for v in given]
    elif key in source:
        values = [float(v) for v in source[key].reshape(-1)]
    else:
        values = list(default_bgr if input_format == "BGR" else default_bgr[::-1])
    if len(values) != 3:
        raise ValueError(f"{key} needs 3 values, got {values}")
    return values


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a .pkl cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (out-of-band buffers)
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # Python 3 pickles of numpy data at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")
        return super().find_class(module, name)


__all__ = [
    "MSRA_PIXEL_MEAN_BGR",
    "MSRA_PIXEL_STD_BGR",
    "detectron2_anchor_order",
    "detectron2_key_map",
    "import_detectron2",
    "map_state_dict",
    "read_detectron2_weights",
]
