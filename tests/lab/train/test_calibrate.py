"""Score calibration moves the node's threshold to a chosen operating point and keeps the
ranking of every detection (so AP50 and the FROC curve do not change)."""

from __future__ import annotations

import math

import pytest
import torch

from dicom_node.config import DetectorConfig
from dicom_node.errors import ConfigError
from dicom_node.lab.phantom import prepared_phantoms
from dicom_node.lab.train.calibrate import calibrate_checkpoint, score_at_fp_rate
from dicom_node.model.architectures import MODEL_SCORE_THRESHOLD
from dicom_node.model.checkpoints import DEMO_WEIGHTS_FILE, load_checkpoint
from dicom_node.model.detector import load_detector


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_the_score_at_a_false_positive_rate_is_the_lowest_threshold_within_it():
    froc = {"thresholds": [None, 0.9, 0.7, 0.4, 0.2], "fp_per_image": [0.0, 0.0, 0.25, 0.5, 1.5]}
    assert score_at_fp_rate(froc, 0.5) == 0.4
    assert score_at_fp_rate(froc, 1.0) == 0.4
    assert score_at_fp_rate(froc, 2.0) == 0.2
    assert score_at_fp_rate({"thresholds": [None], "fp_per_image": [0.0]}, 0.5) is None


@pytest.mark.slow
def test_calibrated_demo_weights_keep_every_box_and_its_rank_with_scores_moved_to_the_threshold(tmp_path):
    # Classic phantoms at a small size: what the packaged demo weights mark.
    items, coco = prepared_phantoms(n=4, seed=77, variety=None, input_size=1024, rows=1600, columns=1280)
    out = tmp_path / "calibrated.pt"
    record = calibrate_checkpoint(DEMO_WEIGHTS_FILE, out, items, coco, fp_per_image=1.0, at=0.5)
    assert record["fp_per_image"] == 1.0 and record["validation_images"] == 4
    assert record["logit_shift"] == pytest.approx(_logit(0.5) - _logit(record["validation_score"]), abs=1e-5)
    saved = load_checkpoint(out)
    assert saved["trained"]["calibration"] == record
    assert saved["label"] == load_checkpoint(DEMO_WEIGHTS_FILE)["label"]  # still says DEMO WEIGHTS

    before = load_detector(DetectorConfig(weights=str(DEMO_WEIGHTS_FILE), score_threshold=0.05))
    after = load_detector(DetectorConfig(weights=str(out), score_threshold=0.0))
    old, new = before.detect([items[0][0]])[0], after.detect([items[0][0]])[0]
    assert old, "the demo weights marked nothing on a classic phantom"
    moved = {tuple(round(v) for v in d.box): d.score for d in new}
    kept = []
    for d in old:  # every box is still there, its score moved by the shift (float16 weights)...
        expected = 1 / (1 + math.exp(-(_logit(d.score) + record["logit_shift"])))
        if expected < MODEL_SCORE_THRESHOLD + 0.01:
            continue  # ...unless a shift down took it under the model's own low cut
        assert moved[tuple(round(v) for v in d.box)] == pytest.approx(expected, abs=0.02)
        kept.append(d)
    assert kept
    ranks = [tuple(round(v) for v in d.box) for d in kept]
    assert [b for b in sorted(moved, key=moved.get, reverse=True) if b in ranks] == ranks


def test_calibration_is_refused_where_it_cannot_act(tmp_path):
    from tests.lab.train.conftest import tiny_config

    with pytest.raises(ConfigError, match="RetinaNet only"):
        tiny_config(tmp_path / "a.json", tmp_path, calibrate_fp_per_image=0.5,
                    **{"model.architecture": "faster_rcnn_r50_fpn"})
    with pytest.raises(ConfigError, match="needs a validation set"):
        tiny_config(tmp_path / "a.json", tmp_path, calibrate_fp_per_image=0.5,
                    **{"data": {"train_json": str(tmp_path / "a.json")}})
    model = torch.nn.Linear(2, 2)
    from dicom_node.lab.train.calibrate import shift_scores

    with pytest.raises(ConfigError, match="classification logits"):
        shift_scores(model, from_score=0.2, to_score=0.5)
