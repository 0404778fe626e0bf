"""Training configs: the shipped files load, and mistakes are errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from dicom_node.lab.train.config import load_train_config, parse_train_config
from dicom_node.model.checkpoints import DEMO_WEIGHTS_FILE

CONFIG_DIR = Path(__file__).resolve().parents[3] / "config" / "train"
STUDY = ["retinanet_r101_fpn", "retinanet_r50_fpn", "faster_rcnn_r101_fpn", "faster_rcnn_r50_fpn"]


def _minimal(**tables) -> dict:
    data = {
        "output_dir": "out",
        "model": {"architecture": "retinanet_r50_fpn", "input_size": 1333},
        "data": {"train_json": "train.json"},
    }
    for key, value in tables.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.mark.parametrize("name", STUDY)
def test_study_configs_have_the_study_schedule(name):
    cfg = load_train_config(CONFIG_DIR / f"{name}.toml")
    assert cfg.model.architecture == name
    opt = cfg.optimizer
    assert (opt.batch_size, opt.base_lr, opt.iterations, opt.lr_steps, opt.lr_gamma) == (16, 0.001, 24000, [18000], 0.1)
    assert opt.batch_size == opt.micro_batch * opt.accumulation
    assert cfg.loss == ("focal" if name.startswith("retinanet") else "cross_entropy")
    # Dataset paths are placeholders relative to the file, resolved to absolute paths.
    assert cfg.data.train_json.is_absolute() and cfg.data.train_json.name == "annotations.json"
    assert cfg.augment.gamma > 0 and cfg.augment.rotation_degrees > 0 and cfg.augment.horizontal_flip > 0


def test_demo_config_exports_labelled_half_precision_weights_outside_the_package():
    cfg = load_train_config(CONFIG_DIR / "demo_phantom.toml")
    assert cfg.model.architecture == "retinanet_r18_fpn"
    assert cfg.export_half
    assert cfg.export_path.name == "demo_retinanet_r18_fpn.pt"
    assert cfg.export_path != DEMO_WEIGHTS_FILE
    for path in (cfg.export_path, cfg.output_dir):
        assert not path.resolve().is_relative_to(DEMO_WEIGHTS_FILE.parent.parent), path
    assert "DEMO WEIGHTS" in cfg.label and "not for clinical use" in cfg.label


@pytest.mark.parametrize(
    "key, value",
    [
        ("export", str(DEMO_WEIGHTS_FILE)),  # the packaged demo weights themselves
        ("export", "{package}/weights/other.pt"),
        ("output_dir", "{package}/runs"),  # model_final.pt and checkpoints there
    ],
)
def test_training_outputs_inside_the_package_are_refused(tmp_path, key, value):
    value = value.format(package=DEMO_WEIGHTS_FILE.parent.parent)
    with pytest.raises(ConfigError, match=rf"{key}: .* is inside the dicom_node package .*demo weights"):
        parse_train_config(_minimal(**{key: value}), base_dir=tmp_path)


def test_train_cli_refuses_to_overwrite_the_packaged_demo_weights(tmp_path):
    before = DEMO_WEIGHTS_FILE.stat()
    config = tmp_path / "demo.toml"
    shipped = (CONFIG_DIR / "demo_phantom.toml").read_text()
    # The demo config as it was: exporting onto the packaged file.
    config.write_text(shipped.replace('export = "../../.data/demo/run/demo_retinanet_r18_fpn.pt"',
                                      f"export = {str(DEMO_WEIGHTS_FILE)!r}"))  # fmt: skip
    assert str(DEMO_WEIGHTS_FILE) in config.read_text()
    result = subprocess.run([sys.executable, "-m", "dicom_node", "train", "--config", str(config)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"config error: {config}: export: {DEMO_WEIGHTS_FILE} is inside the dicom_node")
    assert "Traceback" not in result.stderr
    after = DEMO_WEIGHTS_FILE.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.base_lrr: unknown key"):
        parse_train_config(_minimal(optimizer={"base_lrr": 0.1}), base_dir=tmp_path)


def test_loss_that_the_architecture_does_not_train_with_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model: .*does not match retinanet_r50_fpn"):
        parse_train_config(_minimal(model={"loss": "cross_entropy"}), base_dir=tmp_path)


def test_batch_must_split_into_micro_batches(tmp_path):
    with pytest.raises(ConfigError, match="not divisible by accumulation 3"):
        parse_train_config(_minimal(optimizer={"batch_size": 16, "accumulation": 3}), base_dir=tmp_path)


def test_lr_steps_must_fall_inside_the_run(tmp_path):
    with pytest.raises(ConfigError, match="must be below iterations"):
        parse_train_config(_minimal(optimizer={"iterations": 100, "lr_steps": [100]}), base_dir=tmp_path)


def test_fixed_boxes_cannot_be_trained(tmp_path):
    with pytest.raises(ConfigError, match="model.architecture"):
        parse_train_config(_minimal(model={"architecture": "fixed_boxes"}), base_dir=tmp_path)


def test_paths_resolve_against_the_file_and_overrides_apply(tmp_path):
    path = tmp_path / "sub" / "run.toml"
    path.parent.mkdir()
    path.write_text(
        'output_dir = "out"\n[model]\narchitecture = "faster_rcnn_r50_fpn"\ninput_size = 800\n'
        '[data]\ntrain_json = "../data/train.json"\n', encoding="utf-8")
    cfg = load_train_config(path, overrides={"optimizer.iterations": 50000, "optimizer.lr_steps": [40000]})
    assert cfg.data.train_json == (tmp_path / "data" / "train.json").resolve()
    assert cfg.export_path == (tmp_path / "sub" / "out" / "model_final.pt").resolve()
    assert cfg.optimizer.iterations == 50000
    assert cfg.loss == "cross_entropy"


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read training config"):
        load_train_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("output_dir = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(bad)


def test_starting_weights_resolve_against_the_config_file_and_demo_stays_demo(tmp_path):
    (tmp_path / "train.toml").write_text(
        'output_dir = "out"\n'
        '[model]\narchitecture = "retinanet_r50_fpn"\ninput_size = 1333\nweights = "models/site.pt"\n'
        '[data]\ntrain_json = "train.json"\n', encoding="utf-8")
    cfg = load_train_config(tmp_path / "train.toml")
    assert cfg.model.weights == str(tmp_path.resolve() / "models" / "site.pt")
    demo = parse_train_config(_minimal(model={"weights": "demo"}), base_dir=tmp_path)
    assert demo.model.weights == "demo"
    assert parse_train_config(_minimal(), base_dir=tmp_path).model.weights is None
