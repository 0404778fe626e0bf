"""Score calibration: make the node's score threshold an operating point chosen on validation data.

A RetinaNet trained from scratch for a short while ranks masses well (AP50, FROC) but
scores them low: on the demo's validation phantoms most true masses scored 0.2 to 0.5,
so at the node's default ``detector.score_threshold`` of 0.5 a newcomer saw few marks.
Calibration adds one constant to every classification logit of the RetinaNet head
(``cls_logits.bias``), chosen so that the threshold ``at`` (the node's default, 0.5) falls
where the validation set has ``fp_per_image`` false positives per image.

One constant added to every logit keeps the order of all detections, so the precision-
recall and FROC curves (and AP50) keep their shape; only which boxes pass a given
threshold changes. (The model's own low cut, MODEL_SCORE_THRESHOLD, applies to the
shifted scores, so a few more low-scoring candidates survive it.) The shift and the
validation operating point are recorded in the checkpoint's ``trained.calibration``.

Faster R-CNN scores come from a softmax over classes, where one shift does not act the
same way on every box: calibration is refused for it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger("dicom_node.lab.train.calibrate")


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _last_point_within(froc: dict, fp_per_image: float) -> int:
    """Index of the last FROC point with at most ``fp_per_image`` false positives per image."""
    rates = np.asarray(froc["fp_per_image"], dtype=np.float64)
    return int(np.searchsorted(rates, fp_per_image, side="right")) - 1


def score_at_fp_rate(froc: dict, fp_per_image: float) -> float | None:
    """The lowest score threshold whose operating point has at most ``fp_per_image`` false
    positives per image, on a FROC curve of dicom_node.lab.evaluate (None: no detection)."""
    last = _last_point_within(froc, fp_per_image)
    return froc["thresholds"][last] if last >= 0 else None


def classification_bias(model: torch.nn.Module) -> torch.nn.Parameter:
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is None:
        raise ConfigError("calibration shifts a RetinaNet's classification logits; this model has none "
                          "(Faster R-CNN scores are a softmax over classes)")
    return head.cls_logits.bias


def shift_scores(model: torch.nn.Module, *, from_score: float, to_score: float) -> float:
    """Shift ``model``'s scores so that a detection scored ``from_score`` scores ``to_score``;
    returns the logit shift."""
    shift = _logit(to_score) - _logit(from_score)
    with torch.no_grad():
        classification_bias(model).add_(shift)
    return shift


def calibrate(model: torch.nn.Module, validation_detections: list[dict], gt_coco: dict, *,
              fp_per_image: float, at: float) -> dict:
    """Shift ``model`` (in place) so that ``at`` is its ``fp_per_image`` operating point on the
    validation set; returns what is recorded as ``trained.calibration``.

    ``validation_detections`` are the model's COCO detections on ``gt_coco`` before the shift,
    at the model's own low cut (MODEL_SCORE_THRESHOLD), as ``validate`` makes them.
    """
    from dicom_node.lab.evaluate.run import evaluate_detections

    result = evaluate_detections(gt_coco, validation_detections, threshold=at)
    category = next(iter(result["categories"].values()))
    froc = category["curves"]["froc"]
    score = score_at_fp_rate(froc, fp_per_image)
    if score is None:
        raise ConfigError(f"calibrate_fp_per_image: no detection on the validation set reaches "
                          f"{fp_per_image} false positives per image or fewer")
    shift = shift_scores(model, from_score=score, to_score=at)
    point = _last_point_within(froc, fp_per_image)
    record = {"fp_per_image": fp_per_image, "threshold": at, "validation_score": round(float(score), 6),
              "logit_shift": round(shift, 6), "validation_images": froc["images"],
              "validation_sensitivity": round(float(froc["sensitivity"][point]), 4)}
    log.info("scores_calibrated", **record)
    return record


def calibrate_checkpoint(weights: Path, out: Path, items: list, gt_coco: dict, *, fp_per_image: float,
                         at: float = 0.5, device: str = "cpu") -> dict:
    """Calibrate the exported checkpoint ``weights`` on validation ``items`` (CocoDataset items
    of ``gt_coco``) and write the result to ``out``; returns the calibration record."""
    from dicom_node.lab.train.loop import detections_of
    from dicom_node.model.checkpoints import model_from_checkpoint, save_checkpoint

    model, checkpoint = model_from_checkpoint(weights)
    detections = detections_of(model, items, gt_coco, device=torch.device(device),
                               input_size=checkpoint["input_size"])
    record = calibrate(model, detections, gt_coco, fp_per_image=fp_per_image, at=at)
    half = any(t.dtype == torch.float16 for t in torch.load(weights, map_location="cpu",
                                                            weights_only=True)["state_dict"].values())
    trained = {**(checkpoint.get("trained") or {}), "calibration": record}
    save_checkpoint(out, model=model, architecture=checkpoint["architecture"], input_size=checkpoint["input_size"],
                    label=checkpoint["label"], trained=trained, half=half)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m dicom_node.lab.train.calibrate --config C --weights IN --out OUT``: calibrate an
    exported checkpoint on the config's validation set at its ``calibrate_fp_per_image``."""
    import argparse
    import json

    from dicom_node.errors import NodeError
    from dicom_node.lab.train.config import load_train_config
    from dicom_node.lab.train.loop import validation_items
    from dicom_node.log import configure_logging, report_failure

    parser = argparse.ArgumentParser(prog="python -m dicom_node.lab.train.calibrate", description=main.__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    configure_logging("info", "console")
    try:
        cfg = load_train_config(args.config)
        if cfg.calibrate_fp_per_image is None:
            raise ConfigError(f"{args.config}: calibrate_fp_per_image is not set")
        items, coco = validation_items(cfg)
        record = calibrate_checkpoint(args.weights, args.out, items, coco, fp_per_image=cfg.calibrate_fp_per_image,
                                      at=cfg.eval_threshold, device=args.device)
    except NodeError as error:
        return report_failure(error)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
