"""Fixtures for the detector tests: small randomly initialised checkpoints (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dicom_node.model.architectures import build_model
from dicom_node.model.checkpoints import save_checkpoint

R18_LABEL = "TEST CHECKPOINT - random weights"


@pytest.fixture(scope="session")
def r18_label() -> str:
    return R18_LABEL


@pytest.fixture(scope="session")
def r18_checkpoint(tmp_path_factory) -> Path:
    """A retinanet_r18_fpn checkpoint with random weights, trained at input size 160."""
    torch.manual_seed(0)
    model = build_model("retinanet_r18_fpn")
    path = tmp_path_factory.mktemp("checkpoints") / "r18.pt"
    return save_checkpoint(
        path,
        model=model,
        architecture="retinanet_r18_fpn",
        input_size=160,
        label=R18_LABEL,
        trained={"epochs": 0, "data": Path("/nowhere")},
    )
