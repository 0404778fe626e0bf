"""Detector checkpoints: one file format written by training and the Detectron2 import,
read by the detector and evaluation.

A checkpoint is ``torch.save`` of a plain dict::

    {"format": "dicom-node-detector/1", "architecture": str, "input_size": int,
     "state_dict": {...}, "label": str, "trained": {...free-form metadata...},
     "model_options": {...build_model keyword arguments, optional...}}

It is read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
A training checkpoint (``checkpoint_NNNNNNN.pt``, TRAIN_STATE_FORMAT, written by
dicom_node.lab.train.loop to resume a run) is read the same way and gives its model:
it records architecture and input size too; it has no label, so one is made from the
file name and iteration. Its only non-tensor objects are numpy's RNG state arrays,
allowed by name (_TRAIN_STATE_GLOBALS), nothing else.
Tensors may be stored in float16 to halve the file (the packaged demo weights);
they are converted back to float32 on load. Every problem (missing file, not a
checkpoint, wrong architecture, keys or shapes that do not fit) is a
CheckpointError naming the file and the architecture.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dicom_node.files import SHARED, write_atomically
from dicom_node.config import DEMO_WEIGHTS
from dicom_node.errors import CheckpointError
from dicom_node.model.architectures import build_model

CHECKPOINT_FORMAT = "dicom-node-detector/1"
TRAIN_STATE_FORMAT = "dicom-node-train-state/1"
# What np.random.get_state() pickles to (an ndarray of uint32), in a training state.
_TRAIN_STATE_GLOBALS = [
    np.ndarray, np.dtype, np.dtypes.UInt32DType,
    (getattr(np, "_core", None) or np.core).multiarray._reconstruct,
]
DEMO_WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "weights" / "demo_retinanet_r18_fpn.pt"
_MODEL_OPTIONS = ("image_mean", "image_std", "stride_in_1x1", "smallest_anchor")
_KEYS_SHOWN = 5


def weights_file(weights: str) -> Path:
    """The checkpoint a config's ``detector.weights`` names: a path, or ``demo`` for the
    packaged demo weights (dicom_node.config.DEMO_WEIGHTS)."""
    return demo_weights_path() if weights == DEMO_WEIGHTS else Path(weights)


def demo_weights_path() -> Path:
    """The packaged demo checkpoint; CheckpointError if it is not installed.

    Writers (the demo training script) use ``DEMO_WEIGHTS_FILE`` directly.
    """
    if not DEMO_WEIGHTS_FILE.is_file():
        raise CheckpointError(
            f"{DEMO_WEIGHTS_FILE}: the demo weights are not installed "
            "(architecture retinanet_r18_fpn); train them with the demo training script "
            "or set detector.weights to a checkpoint file"
        )
    return DEMO_WEIGHTS_FILE


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    architecture: str,
    input_size: int,
    label: str,
    trained: dict,
    half: bool = False,
) -> Path:
    """Write `model`'s weights and metadata to `path` atomically (temp file, fsync, rename).

    `half` stores floating-point tensors as float16; it refuses (ValueError) a
    tensor that float16 cannot hold. `trained` must be JSON-like metadata
    (values that are not, such as paths, are stored as strings).
    """
    path = Path(path)
    state_dict = model.state_dict()
    stored: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if half and tensor.is_floating_point():
            converted = tensor.half()
            if not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
                raise ValueError(f"{name}: values beyond float16 range, save with half=False")
            tensor = converted
        stored[name] = tensor.clone()
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "architecture": architecture,
        "input_size": int(input_size),
        "state_dict": stored,
        "label": str(label),
        "trained": json.loads(json.dumps(trained, default=str)),
        "model_options": dict(getattr(model, "build_options", {})),
    }
    # Readable by the node's service user (systemd DynamicUser), which must load it.
    write_atomically(path, lambda handle: torch.save(checkpoint, handle), mode=SHARED)
    return path


def load_checkpoint(
    path: str | Path, *, architecture: str | None = None, asked_by: str = "detector.architecture"
) -> dict:
    """Read and check a checkpoint (or a training checkpoint); float16 tensors come back as float32.

    The checkpoint names its architecture. With `architecture` (what `asked_by`, a config
    key or a command-line option, says), a checkpoint for another one is a CheckpointError
    naming both.
    """
    path = Path(path)
    wanted = f" (architecture {architecture})" if architecture else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found{wanted}")
    checkpoint = _read(path, wanted)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == TRAIN_STATE_FORMAT:
        checkpoint = _from_train_state(checkpoint, path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = (
            checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        hint = ""
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
            hint = " (Detectron2 weights? convert them with dicom-node import-detectron2)"
        raise CheckpointError(
            f"{path}: not a dicom-node checkpoint{wanted}; "
            f"expected format {CHECKPOINT_FORMAT!r}, found {found!r}{hint}"
        )
    problems = [
        key
        for key, kind in (
            ("architecture", str),
            ("input_size", int),
            ("state_dict", dict),
            ("label", str),
        )
        if not isinstance(checkpoint.get(key), kind)
    ]
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint lacks or has invalid {', '.join(problems)}{wanted}"
        )
    if architecture is not None and checkpoint["architecture"] != architecture:
        raise CheckpointError(
            f"{path}: checkpoint is for architecture {checkpoint['architecture']!r}, "
            f"{asked_by} asks for {architecture!r} (leave {asked_by} out to use the checkpoint's)"
        )
    checkpoint["state_dict"] = OrderedDict(
        (name, tensor.float() if tensor.dtype == torch.float16 else tensor)
        for name, tensor in checkpoint["state_dict"].items()
    )
    checkpoint.setdefault("trained", {})
    checkpoint.setdefault("model_options", {})
    return checkpoint


def _read(path: Path, wanted: str):
    """torch.load with weights_only (plus numpy's RNG arrays); one-line CheckpointError otherwise."""
    try:
        with torch.serialization.safe_globals(_TRAIN_STATE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise CheckpointError(
                f"{path}: not a dicom-node checkpoint{wanted}: {_first_line(error)}"
            ) from None
        # torch's text here suggests loading the file anyway, running its code: never.
        raise CheckpointError(
            f"{path}: not a dicom-node checkpoint{wanted}: it holds Python objects other than "
            "weights (a whole pickled model?), which are not loaded; export a checkpoint with "
            "dicom-node train or dicom-node import-detectron2"
        ) from None
    except Exception as error:  # torch raises several types for a file it cannot read
        raise CheckpointError(
            f"{path}: not a dicom-node checkpoint{wanted}: {_first_line(error)}"
        ) from None


def _from_train_state(state: dict, path: Path) -> dict:
    """The model of a training checkpoint as a checkpoint dict (no label: made from the file)."""
    iteration = state.get("iteration")
    return {
        "format": CHECKPOINT_FORMAT,
        "architecture": state.get("architecture"),
        "input_size": state.get("input_size"),
        "state_dict": state.get("model"),
        "label": f"training checkpoint {path.name} (iteration {iteration})",
        "trained": {"iterations": iteration, "training_checkpoint": path.name},
        # How training built the model; a state saved before they were recorded has none
        # (build_model's defaults, as then for every config but the demo's anchors).
        "model_options": state.get("model_options") or {},
    }


def model_from_checkpoint(
    path: str | Path, *, architecture: str | None = None, asked_by: str = "detector.architecture"
) -> tuple[nn.Module, dict]:
    """Build the checkpoint's architecture and load the checkpoint at `path` into it (strictly).

    `architecture`, when given, must be the checkpoint's (see load_checkpoint).
    Returns (model in eval mode on the CPU, checkpoint dict).
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, architecture=architecture, asked_by=asked_by)
    architecture = checkpoint["architecture"]
    options = checkpoint["model_options"]
    unknown = sorted(set(options) - set(_MODEL_OPTIONS))
    if unknown:
        raise CheckpointError(
            f"{path}: unknown model_options {unknown} (architecture {architecture})"
        )
    try:
        model = build_model(architecture, **options)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: model_options do not fit {architecture}: {error}") from None
    load_state(model, checkpoint["state_dict"], path=path, architecture=architecture)
    model.eval()
    return model, checkpoint


def load_state(model: nn.Module, state_dict: dict, *, path: Path | str, architecture: str) -> None:
    """Load `state_dict` into `model`; missing, unexpected or mis-shaped keys: CheckpointError."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        details = []
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:_KEYS_SHOWN])
                more = f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
                details.append(f"{len(keys)} {title}: {shown}{more}")
        raise CheckpointError(
            f"{path}: weights do not fit architecture {architecture}: " + "; ".join(details)
        )
    model.load_state_dict(state_dict, strict=True)


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()  # torch colours its text
    return text[0] if text else type(error).__name__


__all__ = [
    "CHECKPOINT_FORMAT",
    "DEMO_WEIGHTS_FILE",
    "TRAIN_STATE_FORMAT",
    "demo_weights_path",
    "weights_file",
    "load_checkpoint",
    "load_state",
    "model_from_checkpoint",
    "save_checkpoint",
]
