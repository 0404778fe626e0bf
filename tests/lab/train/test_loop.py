"""A real (tiny) training run on CPU: finite loss, checkpoints, exact resume, loadable export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.lab.train.conftest import tiny_config

from dicom_node.config import DetectorConfig
from dicom_node.errors import ConfigError
from dicom_node.lab.train.loop import (
    TrainSamples,
    latest_checkpoint,
    load_samples,
    lr_factor,
    train,
)
from dicom_node.model.checkpoints import DEMO_WEIGHTS_FILE, load_checkpoint, model_from_checkpoint
from dicom_node.pixels import resize_longest_side


def _metrics(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_train_checkpoints_resumes_exactly_and_exports_a_loadable_detector(tiny_phantoms, tmp_path):
    from dicom_node.model.detector import load_detector

    cfg = tiny_config(tiny_phantoms, tmp_path / "run")
    export = train(cfg, progress=False)

    losses = [record["loss"] for record in _metrics(cfg.output_dir) if "loss" in record]
    assert len(losses) == 2 and all(np.isfinite(losses))
    validation = [record["validation"] for record in _metrics(cfg.output_dir) if "validation" in record]
    assert len(validation) == 1 and validation[0]["images"] == 6
    assert latest_checkpoint(cfg.output_dir).name == "checkpoint_0000004.pt"
    assert (cfg.output_dir / "checkpoint_0000002.pt").is_file()
    uninterrupted = load_checkpoint(export)["state_dict"]

    # Lose the last checkpoint, as if the run had stopped after iteration 2: a rerun
    # resumes there and must reach the same parameters as the uninterrupted run.
    (cfg.output_dir / "checkpoint_0000004.pt").unlink()
    export.unlink()
    assert latest_checkpoint(cfg.output_dir).name == "checkpoint_0000002.pt"
    train(cfg, progress=False)
    iterations = [record["iteration"] for record in _metrics(cfg.output_dir) if "loss" in record]
    assert iterations == [2, 4, 4]  # the resumed run logged iteration 4 only, not 1..3 again
    resumed = load_checkpoint(export)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name

    checkpoint = load_checkpoint(export, architecture="retinanet_r18_fpn")
    assert checkpoint["input_size"] == 128
    assert checkpoint["label"].startswith("TEST WEIGHTS")
    assert checkpoint["trained"]["iterations"] == 4
    detector = load_detector(DetectorConfig(architecture="retinanet_r18_fpn", weights=str(export)))
    assert detector.input_size == 128
    image = resize_longest_side(np.random.default_rng(0).random((256, 200), dtype=np.float32), 128)
    assert len(detector.detect([image])) == 1


def test_export_in_half_precision_loads(tiny_phantoms, tmp_path):
    cfg = tiny_config(tiny_phantoms, tmp_path / "half", export_half=True, **{
        "optimizer.iterations": 1, "optimizer.lr_steps": [], "data.val_json": None})
    export = train(cfg, progress=False)
    stored = torch.load(export, map_location="cpu", weights_only=True)["state_dict"]
    assert any(t.dtype == torch.float16 for t in stored.values())
    assert all(t.dtype != torch.float16 for t in load_checkpoint(export)["state_dict"].values())


def test_training_samples_depend_only_on_seed_and_sample_number(tiny_phantoms, tmp_path):
    cfg = tiny_config(tiny_phantoms, tmp_path / "samples")
    samples = load_samples(cfg.data.train_json, input_size=128, cache=True)
    first, again = TrainSamples(samples, cfg), TrainSamples(samples, cfg)
    for number in (0, 5, 13):  # 13 is in the third epoch of 6 images
        a, b = first[number], again[number]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].shape[-2:] == (96, 96)
        assert (a[1][:, [0, 2]] <= 96).all() and (a[1][:, [1, 3]] <= 96).all()
    other = TrainSamples(samples, tiny_config(tiny_phantoms, tmp_path / "samples", seed=12))
    assert any(not torch.equal(first[n][0], other[n][0]) for n in range(6))


def test_resume_refuses_a_checkpoint_of_another_architecture_size_or_anchors(tiny_phantoms, tmp_path):
    cfg = tiny_config(tiny_phantoms, tmp_path / "run", **{
        "optimizer.iterations": 2, "optimizer.lr_steps": [], "data.val_json": None})
    train(cfg, progress=False)
    bigger = tiny_config(tiny_phantoms, tmp_path / "run", **{"model.input_size": 160})
    with pytest.raises(ConfigError, match="input_size 128"):
        train(bigger, progress=False)
    other_anchors = tiny_config(tiny_phantoms, tmp_path / "run", **{"model.smallest_anchor": 16})
    with pytest.raises(ConfigError, match="smallest_anchor 32, model.smallest_anchor is 16"):
        train(other_anchors, progress=False)


def test_missing_dataset_is_a_config_error(tmp_path):
    cfg = tiny_config(tmp_path / "nowhere" / "annotations.json", tmp_path / "run")
    with pytest.raises(ConfigError, match="annotations not found"):
        train(cfg, progress=False)


def test_learning_rate_warms_up_then_steps(tmp_path):
    cfg = tiny_config(tmp_path / "a.json", tmp_path, **{
        "optimizer.iterations": 100, "optimizer.lr_steps": [60, 80], "optimizer.warmup_iters": 10,
        "optimizer.warmup_factor": 0.1})
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.55)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(59, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1)
    assert lr_factor(85, cfg) == pytest.approx(0.01)


def test_training_on_phantoms_rendered_in_memory_exports_what_the_config_asks(tmp_path):
    """[data] train_phantoms / val_phantoms: no files written; the model keeps its anchors."""
    cfg = tiny_config(tmp_path / "unused.json", tmp_path / "run", **{
        "data": {"train_phantoms": {"n": 3, "seed": 5, "variety": "training"},
                 "val_phantoms": {"n": 2, "seed": 6, "variety": "texture_reticular"}, "phantom_workers": 1},
        "model.smallest_anchor": 16,
        "optimizer.iterations": 2, "optimizer.lr_steps": [1], "optimizer.warmup_iters": 1,
    })
    exported = train(cfg, progress=False)
    checkpoint = load_checkpoint(exported)
    assert checkpoint["model_options"]["smallest_anchor"] == 16
    assert checkpoint["trained"]["train_data"] == [{"n": 3, "seed": 5, "variety": "training"}]
    assert checkpoint["trained"]["validation"]["images"] == 2
    model, _ = model_from_checkpoint(exported)
    assert model.anchor_generator.sizes[0] == (16, 20, 25)
    assert not list(tmp_path.glob("**/*.dcm"))


def test_several_phantom_sets_train_together_and_on_device_augments_as_the_loader_does(tmp_path):
    """A list of sets, classic phantoms at a chosen size among them; ``data.on_device``
    (augmenting in the training process, on the GPU where there is one) trains to exactly
    the parameters the loader processes give."""
    from dicom_node.lab.train.loop import training_samples

    sets = [{"n": 2, "seed": 5, "variety": "training"},
            {"n": 2, "seed": 7, "variety": "classic", "rows": 400, "columns": 320}]
    common = {"data": {"train_phantoms": sets, "phantom_workers": 1}, "optimizer.iterations": 2,
              "optimizer.lr_steps": [], "optimizer.warmup_iters": 1, "optimizer.accumulation": 1}
    cfg = tiny_config(tmp_path / "unused.json", tmp_path / "loader", **common, num_workers=1)
    samples = training_samples(cfg)
    assert len(samples) == 4
    assert [tuple(s.pixels.shape) for s in samples[2:]] == [(128, 102)] * 2  # 400 x 320 resized
    assert tuple(samples[0].pixels.shape) != (128, 102)  # the variety draws its own sizes

    by_loader = load_checkpoint(train(cfg, progress=False, samples=samples, validation=([], None)))
    in_process = tiny_config(tmp_path / "unused.json", tmp_path / "in_process", **common, num_workers=1,
                             **{"data.on_device": True})
    by_device = load_checkpoint(train(in_process, progress=False, samples=samples, validation=([], None)))
    assert by_device["trained"]["train_data"] == sets
    for name, tensor in by_loader["state_dict"].items():
        assert torch.equal(tensor, by_device["state_dict"][name]), name


@pytest.mark.parametrize("phantoms, message", [
    ({"n": 1, "seed": 1, "variety": "training", "rows": 400, "columns": 320}, "size classic phantoms only"),
    ({"n": 1, "seed": 1, "variety": "classic", "rows": 400}, "both rows and columns"),
    ([], "give at least one set"),
])
def test_phantom_sets_refuse_what_cannot_be_drawn(tmp_path, phantoms, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path / "a.json", tmp_path, **{"data": {"train_phantoms": phantoms}})


def test_data_needs_exactly_one_training_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of train_json and train_phantoms"):
        tiny_config(tmp_path / "a.json", tmp_path, **{
            "data.train_phantoms": {"n": 3, "seed": 5}})
    with pytest.raises(ConfigError, match="unknown phantom variety 'marble'"):
        tiny_config(tmp_path / "a.json", tmp_path, **{
            "data": {"train_phantoms": {"n": 3, "seed": 5, "variety": "marble"}}})


def _parameters(state_dict: dict, model) -> dict:
    """The trainable tensors of a state dict (BatchNorm's running statistics move in any step)."""
    names = {name for name, _ in model.named_parameters()}
    return {name: tensor for name, tensor in state_dict.items() if name in names}


def test_training_starts_from_model_weights_without_their_score_calibration(tiny_phantoms, tmp_path):
    from dicom_node.lab.train.calibrate import classification_bias
    from dicom_node.model.architectures import build_model
    from dicom_node.model.checkpoints import save_checkpoint

    torch.manual_seed(99)  # not the run's seed: its own random start would differ
    start_model = build_model("retinanet_r18_fpn", num_classes=1)
    with torch.no_grad():
        classification_bias(start_model).add_(1.5)
    start = save_checkpoint(tmp_path / "site_model.pt", model=start_model, architecture="retinanet_r18_fpn",
                            input_size=512, label="SITE MODEL", trained={"calibration": {"logit_shift": 1.5}})
    expected = _parameters(start_model.state_dict(), start_model)
    expected["head.classification_head.cls_logits.bias"] = expected["head.classification_head.cls_logits.bias"] - 1.5

    # A learning rate so small that one step leaves the weights where they started.
    still = {"optimizer.iterations": 1, "optimizer.lr_steps": [], "optimizer.warmup_iters": 0,
             "optimizer.base_lr": 1e-9, "data.val_json": None}
    fine_tuned = train(tiny_config(tiny_phantoms, tmp_path / "tuned", **{"model.weights": str(start), **still}),
                       progress=False)
    from_scratch = train(tiny_config(tiny_phantoms, tmp_path / "scratch", **still), progress=False)

    tuned = load_checkpoint(fine_tuned)
    assert tuned["trained"]["started_from"] == "site_model.pt"
    assert tuned["input_size"] == 128  # the run's, not the starting model's
    for name, tensor in _parameters(tuned["state_dict"], start_model).items():
        assert torch.allclose(tensor, expected[name], atol=1e-5), name
    scratch = _parameters(load_checkpoint(from_scratch)["state_dict"], start_model)
    assert "started_from" not in load_checkpoint(from_scratch)["trained"]
    assert not all(torch.allclose(tensor, expected[name], atol=1e-5) for name, tensor in scratch.items())


def test_training_starts_from_the_demo_weights(tiny_phantoms, tmp_path):
    demo = load_checkpoint(DEMO_WEIGHTS_FILE)
    shift = demo["trained"]["calibration"]["logit_shift"]
    cfg = tiny_config(tiny_phantoms, tmp_path / "demo", **{
        "model.weights": "demo", "model.smallest_anchor": 16, "optimizer.iterations": 1, "optimizer.lr_steps": [],
        "optimizer.warmup_iters": 0, "optimizer.base_lr": 1e-9, "data.val_json": None})
    tuned = load_checkpoint(train(cfg, progress=False))
    assert tuned["trained"]["started_from"] == "demo"
    assert tuned["model_options"]["smallest_anchor"] == 16
    bias = "head.classification_head.cls_logits.bias"
    assert torch.allclose(tuned["state_dict"][bias], demo["state_dict"][bias] - shift, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"model.architecture": "retinanet_r50_fpn"}, "set model.architecture = 'retinanet_r18_fpn'"),
    ({"model.smallest_anchor": 32}, "set model.smallest_anchor = 16"),
])
def test_starting_weights_must_fit_the_run(tiny_phantoms, tmp_path, change, message):
    from dicom_node.errors import CheckpointError

    # A training checkpoint is a model to start from too, and it says how it was built.
    first = tiny_config(tiny_phantoms, tmp_path / "first", **{
        "model.smallest_anchor": 16, "optimizer.iterations": 2, "optimizer.lr_steps": [], "data.val_json": None})
    train(first, progress=False)
    checkpoint = first.output_dir / "checkpoint_0000002.pt"
    model, _ = model_from_checkpoint(checkpoint)
    assert model.build_options["smallest_anchor"] == 16  # evaluate builds the anchors it was trained with
    second = tiny_config(tiny_phantoms, tmp_path / "second", **{
        "model.weights": str(checkpoint), "model.smallest_anchor": 16, **change})
    with pytest.raises((ConfigError, CheckpointError), match=message):
        train(second, progress=False)
    assert not (second.output_dir / "checkpoint_0000002.pt").exists()
