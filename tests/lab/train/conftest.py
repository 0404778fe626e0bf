"""Tiny phantom sets and training configs for the training tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.lab.train.config import TrainConfig, parse_train_config


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """Six small synthetic phantoms (256 x 200 pixels) with at least one mass each."""
    from dicom_node.lab.phantom import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    return write_phantoms(out, n=6, seed=7, rows=256, columns=200, masses_per_image=(1, 2))


def tiny_config(annotations: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A few iterations of the demo architecture at a 128-pixel input."""
    data = {
        "seed": 11,
        "output_dir": str(output_dir),
        "checkpoint_every": 2,
        "eval_every": 0,
        "device": "cpu",
        "threads": 2,
        "label": "TEST WEIGHTS - synthetic phantoms, not for clinical use",
        "model": {"architecture": "retinanet_r18_fpn", "input_size": 128},
        "data": {"train_json": str(annotations), "val_json": str(annotations)},
        "optimizer": {"batch_size": 2, "accumulation": 2, "base_lr": 0.005, "iterations": 4,
                      "lr_steps": [3], "warmup_iters": 2, "clip_grad_norm": 10.0},
        "augment": {"rotation_degrees": 10, "horizontal_flip": 0.5, "crop_size": 96, "crop_focus": 0.5},
    }
    for key, value in overrides.items():
        table = data
        *parents, last = key.split(".")
        for part in parents:
            table = table[part]
        table[last] = value
    return parse_train_config(data, base_dir=output_dir)
