"""Checkpoint files: round trip, float16 storage, and every error naming file and architecture."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dicom_node.errors import CheckpointError
from dicom_node.model import checkpoints as weights
from dicom_node.model.architectures import build_model
from dicom_node.model.checkpoints import (
    CHECKPOINT_FORMAT,
    TRAIN_STATE_FORMAT,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

MAX_DEMO_BYTES = 30 * 1024 * 1024


def test_round_trip(r18_checkpoint, r18_label):
    checkpoint = load_checkpoint(r18_checkpoint, architecture="retinanet_r18_fpn")
    assert checkpoint["format"] == CHECKPOINT_FORMAT
    assert checkpoint["input_size"] == 160
    assert checkpoint["label"] == r18_label
    assert checkpoint["trained"] == {"epochs": 0, "data": "/nowhere"}  # paths stored as text
    torch.manual_seed(0)
    original = build_model("retinanet_r18_fpn").state_dict()
    model, _ = model_from_checkpoint(r18_checkpoint, architecture="retinanet_r18_fpn")
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_half_precision_is_small_and_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    model = build_model("retinanet_r18_fpn")
    path = save_checkpoint(
        tmp_path / "demo.pt",
        model=model,
        architecture="retinanet_r18_fpn",
        input_size=512,
        label="DEMO",
        trained={},
        half=True,
    )
    # The packaged demo checkpoint must stay under 30 MB.
    assert path.stat().st_size < MAX_DEMO_BYTES
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a node running as another user
    loaded = load_checkpoint(path)["state_dict"]
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert loaded[name].dtype == torch.float32
            torch.testing.assert_close(loaded[name], tensor, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(loaded[name], tensor)


def test_half_refuses_values_beyond_float16(tmp_path):
    model = build_model("retinanet_r18_fpn")
    with torch.no_grad():
        model.backbone.body.bn1.running_var.fill_(1e6)
    with pytest.raises(ValueError, match="bn1.running_var"):
        save_checkpoint(
            tmp_path / "x.pt",
            model=model,
            architecture="retinanet_r18_fpn",
            input_size=64,
            label="x",
            trained={},
            half=True,
        )
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.pt"
    with pytest.raises(CheckpointError) as error:
        model_from_checkpoint(path, architecture="retinanet_r50_fpn")
    assert str(path) in str(error.value) and "retinanet_r50_fpn" in str(error.value)


@pytest.mark.parametrize(
    "write",
    [
        lambda path: path.write_bytes(b"\x00not a checkpoint" * 10),
        lambda path: path.write_text(json.dumps({"boxes": []})),
        lambda path: torch.save({"model": {}}, path),
        lambda path: torch.save([1, 2, 3], path),
    ],
    ids=["garbage", "json", "other-dict", "list"],
)
def test_wrong_format(tmp_path, write):
    path = tmp_path / "wrong.pt"
    write(path)
    with pytest.raises(CheckpointError) as error:
        model_from_checkpoint(path, architecture="retinanet_r101_fpn")
    message = str(error.value)
    assert str(path) in message and "retinanet_r101_fpn" in message


class NotAWeight:
    pass


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": NotAWeight()}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, architecture="retinanet_r18_fpn")
    # One line of ours: torch's text suggests loading the file anyway (running its code).
    assert "Python objects other than weights" in str(error.value)
    assert "Weights only load failed" not in str(error.value) and "\n" not in str(error.value)
    assert "\x1b" not in str(error.value)


def test_training_checkpoint_gives_its_model(tmp_path, r18_checkpoint):
    """What lab.train.loop.save_state writes: the model among optimizer and RNG states (numpy's too)."""
    exported = load_checkpoint(r18_checkpoint)
    path = tmp_path / "checkpoint_0000004.pt"
    torch.save({
        "format": TRAIN_STATE_FORMAT, "iteration": 4, "architecture": "retinanet_r18_fpn", "input_size": 160,
        "model": exported["state_dict"], "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {}, "scaler": {},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": []},
    }, path)
    model, checkpoint = model_from_checkpoint(path)
    assert (checkpoint["architecture"], checkpoint["input_size"]) == ("retinanet_r18_fpn", 160)
    assert checkpoint["label"] == "training checkpoint checkpoint_0000004.pt (iteration 4)"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, exported["state_dict"][name]), name
    with pytest.raises(CheckpointError, match="'retinanet_r18_fpn', --architecture asks for 'retinanet_r50_fpn'"):
        load_checkpoint(path, architecture="retinanet_r50_fpn", asked_by="--architecture")


def test_architecture_mismatch_names_both(r18_checkpoint):
    with pytest.raises(CheckpointError) as error:
        model_from_checkpoint(r18_checkpoint, architecture="retinanet_r50_fpn")
    message = str(error.value)
    assert str(r18_checkpoint) in message
    assert "'retinanet_r18_fpn'" in message and "'retinanet_r50_fpn'" in message


def test_weights_that_do_not_fit_list_keys(tmp_path, r18_checkpoint):
    # Claims to be R50 but holds R18 weights: keys and shapes do not fit.
    checkpoint = torch.load(r18_checkpoint, weights_only=True)
    checkpoint["architecture"] = "retinanet_r50_fpn"
    path = tmp_path / "relabelled.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as error:
        model_from_checkpoint(path, architecture="retinanet_r50_fpn")
    message = str(error.value)
    assert str(path) in message and "retinanet_r50_fpn" in message
    assert "missing" in message and "backbone.body.layer1.0.conv3.weight" in message
    assert "shape" in message


def test_unknown_model_options_are_refused(tmp_path, r18_checkpoint):
    checkpoint = torch.load(r18_checkpoint, weights_only=True)
    checkpoint["model_options"]["dilation"] = 2
    path = tmp_path / "options.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="dilation"):
        model_from_checkpoint(path, architecture="retinanet_r18_fpn")


def test_missing_demo_weights_say_so(tmp_path, monkeypatch):
    missing = tmp_path / "weights" / "demo_retinanet_r18_fpn.pt"
    monkeypatch.setattr(weights, "DEMO_WEIGHTS_FILE", missing)
    with pytest.raises(CheckpointError) as error:
        weights.demo_weights_path()
    assert "demo weights are not installed" in str(error.value)
    assert str(missing) in str(error.value)


def test_installed_demo_weights_are_found(tmp_path, monkeypatch, r18_checkpoint):
    monkeypatch.setattr(weights, "DEMO_WEIGHTS_FILE", r18_checkpoint)
    assert weights.demo_weights_path() == r18_checkpoint


def test_packaged_demo_weights_location():
    # setup.cfg packages dicom_node/weights/*.pt
    assert weights.DEMO_WEIGHTS_FILE.parent.name == "weights"
    assert weights.DEMO_WEIGHTS_FILE.parent.parent.name == "dicom_node"
