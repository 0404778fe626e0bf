"""`dicom-node evaluate`'s error paths: exit status 2 and one line, never a traceback.

Most run the CLI's main() in this process (the console script's code, without 5 s of
imports per case); the first also through `python -m dicom_node`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dicom_node.cli import main
from tests import synthetic


CONFIG = Path(__file__).resolve().parents[3] / "config" / "dicom-node.toml"


@pytest.fixture
def dataset(tmp_path):
    synthetic.write(synthetic.mammogram(rows=128, columns=96, seed=1), tmp_path / "images" / "1.dcm")
    path = tmp_path / "test.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "images/1.dcm", "width": 96, "height": 128}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "iscrowd": 0,
                         "area": 900}],
        "categories": [{"id": 1, "name": "mass"}],
    }))
    return path


def one_line_exit_2(capsys, *args) -> str:
    status = main(["evaluate", "--config", str(CONFIG), *map(str, args)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_missing_data_file_through_the_console_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dicom_node", "evaluate", "--config", str(CONFIG),
                             "--data", str(tmp_path / "absent.json"), "--out", str(tmp_path / "report"), "--weights", "demo"],
                            capture_output=True, text=True, timeout=180)
    assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr
    assert "absent.json" in result.stderr and "not found" in result.stderr


def test_weights_that_are_not_a_checkpoint(dataset, tmp_path, capsys):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    err = one_line_exit_2(capsys, "--data", dataset, "--out", tmp_path / "r", "--weights", garbage)
    assert f"{garbage}: not a dicom-node checkpoint" in err


def test_a_whole_pickled_model_is_refused_without_torchs_advice(dataset, tmp_path, capsys):
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # torch.save(model), not its state dict
    err = one_line_exit_2(capsys, "--data", dataset, "--out", tmp_path / "r", "--weights", pickled)
    assert "Python objects other than weights" in err
    assert "Weights only load failed" not in err and "weights_only" not in err


def test_architecture_that_disagrees_with_the_checkpoint_names_both(dataset, tmp_path, capsys):
    err = one_line_exit_2(capsys, "--data", dataset, "--out", tmp_path / "r", "--weights", "demo",
                          "--architecture", "retinanet_r50_fpn")
    assert "'retinanet_r18_fpn', --architecture asks for 'retinanet_r50_fpn'" in err


def test_unknown_architecture(dataset, tmp_path, capsys):
    err = one_line_exit_2(capsys, "--data", dataset, "--out", tmp_path / "r", "--architecture", "yolo")
    assert "--architecture: unknown architecture 'yolo'" in err


def test_demo_weights_run_without_architecture(dataset, tmp_path, capsys):
    """The README's `--weights demo` (it crashed: input_size None reached the dataset reader)."""
    assert main(["evaluate", "--config", str(CONFIG), "--data", str(dataset), "--out", str(tmp_path / "r"),
                 "--weights", "demo"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["label"].startswith("retinanet_r18_fpn (DEMO WEIGHTS")
