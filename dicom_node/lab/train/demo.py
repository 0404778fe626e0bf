"""Build the packaged demo weights: phantoms -> train -> evaluation on fresh held-out phantoms.

``python -m dicom_node.lab.train.demo --config config/train/demo_phantom.toml`` (what
``scripts/train_demo_weights`` runs):

1. writes phantom sets with different seeds at the config's ``train_json`` and
   ``val_json`` and, beside them, the held-out ``test`` (the training size) and
   ``test_fullsize`` (the generator's default 3328 x 2560) sets, never seen in training
   or model selection; a set already written with the same parameters is reused;
2. trains with ``dicom_node.lab.train.train`` (which exports the checkpoint named by the
   config's ``export``, float16, with the DEMO label);
3. evaluates the exported file through the node's own path (``load_detector``,
   ``prepare``) on each held-out set with ``dicom_node.lab.evaluate``, writing the reports
   under ``<output_dir>/<set>/`` and the summaries to ``<output_dir>/heldout_summary.json``;
4. with ``--install`` (what the script passes), copies the exported file over the packaged
   ``dicom_node/weights/demo_retinanet_r18_fpn.pt``. Training itself never writes into
   the package (dicom_node.lab.train.config refuses such outputs).

The demo weights find SYNTHETIC phantom masses only. They are not for clinical use.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dicom_node.log import report_failure
from dicom_node.errors import ConfigError, NodeError
from dicom_node.log import configure_logging, get_logger

log = get_logger("dicom_node.lab.train.demo")


@dataclass(frozen=True)
class PhantomSet:
    """How one phantom set is drawn (dicom_node.lab.phantom.write_phantoms arguments)."""

    n: int
    seed: int
    rows: int = 1024
    columns: int = 800
    masses_per_image: tuple[int, int] = (0, 3)


# Reduced-size phantoms (1024 x 800, 0.33 mm pixels): the model sees them at its input
# size anyway. Training images always hold a mass (the crops supply the background);
# validation and held-out sets use the phantom defaults, empty images included.
TRAIN = PhantomSet(n=600, seed=1001, masses_per_image=(1, 3))
VAL = PhantomSet(n=24, seed=2002)
# Held out: the reduced size the demo trains on, and the generator's full default size
# (3328 x 2560, 0.1 mm pixels), as `dicom-node phantom` writes by default.
HELDOUT = {
    "test": PhantomSet(n=120, seed=3003),
    "test_fullsize": PhantomSet(n=40, seed=4004, rows=3328, columns=2560),
}


def ensure_phantoms(annotations: Path, spec: PhantomSet) -> Path:
    """Write the phantom set ``spec`` so that its COCO file is ``annotations`` (reused if present)."""
    from dicom_node.lab.phantom import write_phantoms

    stamp = annotations.parent / "phantom_set.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if annotations.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        return annotations
    if annotations.name != "annotations.json":
        raise ConfigError(f"{annotations}: demo phantom sets must be named annotations.json")
    started = time.monotonic()
    written = write_phantoms(annotations.parent, n=spec.n, seed=spec.seed, rows=spec.rows,
                             columns=spec.columns, masses_per_image=spec.masses_per_image)
    stamp.write_text(wanted, encoding="utf-8")
    log.info("phantoms_written", path=str(written), images=spec.n, seed=spec.seed,
             seconds=round(time.monotonic() - started, 1))
    return written


def evaluate_heldout(weights: Path, architecture: str, annotations: Path, out_dir: Path, *,
                     threshold: float = 0.5) -> dict:
    """Metrics of the checkpoint ``weights`` on the held-out set, through the node's detector."""
    from dicom_node.config import DetectorConfig
    from dicom_node.lab.evaluate.run import run_evaluation

    detector = DetectorConfig(architecture=architecture, weights=str(weights), score_threshold=threshold)
    result = run_evaluation(detector, annotations, out_dir, device="cpu")
    return result["summary"]


DEMO_ARCHITECTURE = "retinanet_r18_fpn"


def install_demo_weights(source: Path, target: Path | None = None) -> Path:
    """Copy the demo checkpoint `source` over the packaged demo weights (atomically).

    Only a checkpoint of the demo architecture whose label says DEMO WEIGHTS is taken:
    whatever the package ships as "demo" must be recognisable as such.
    """
    import torch

    from dicom_node.model.checkpoints import DEMO_WEIGHTS_FILE
    from dicom_node.files import SHARED, write_atomically

    target = DEMO_WEIGHTS_FILE if target is None else target
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:  # missing, or not a torch file
        raise ConfigError(f"{source}: cannot read the checkpoint to install ({error})") from None
    if not isinstance(checkpoint, dict):
        checkpoint = {}
    if checkpoint.get("architecture") != DEMO_ARCHITECTURE or "DEMO WEIGHTS" not in str(checkpoint.get("label")):
        raise ConfigError(
            f"{source}: not demo weights ({checkpoint.get('architecture')}, label {checkpoint.get('label')!r}); "
            f"the package ships only a {DEMO_ARCHITECTURE} checkpoint labelled DEMO WEIGHTS"
        )
    write_atomically(target, source.read_bytes(), mode=SHARED)
    log.info("demo_weights_installed", source=str(source), target=str(target))
    return target


def build(config_path: Path, *, train_only: bool = False, evaluate_only: bool = False,
          install: bool = False) -> dict:
    """Phantoms, training and held-out evaluation for the demo config; returns the held-out summaries."""
    from dicom_node.lab.train.config import load_train_config
    from dicom_node.lab.train.loop import train

    cfg = load_train_config(config_path)
    if cfg.data.val_json is None:
        raise ConfigError(f"{config_path}: data.val_json is required for the demo")
    data_root = cfg.data.train_json.parent.parent
    if not evaluate_only:
        ensure_phantoms(cfg.data.train_json, TRAIN)
        ensure_phantoms(cfg.data.val_json, VAL)
        started = time.monotonic()
        weights = train(cfg)
        log.info("demo_trained", weights=str(weights), minutes=round((time.monotonic() - started) / 60, 1))
    weights = cfg.export_path
    if train_only:
        if install:
            install_demo_weights(weights)
        return {}
    summaries = {"weights": str(weights), "file_bytes": weights.stat().st_size}
    for name, spec in HELDOUT.items():
        annotations = ensure_phantoms(data_root / name / "annotations.json", spec)
        summary = evaluate_heldout(weights, cfg.model.architecture, annotations, cfg.output_dir / name)
        summaries[name] = {**summary, "phantoms": asdict(spec)}
        log.info("demo_heldout", set=name, ap50=summary["ap50"],
                 froc=summary["froc"]["sensitivities"])
    (cfg.output_dir / "heldout_summary.json").write_text(
        json.dumps(summaries, indent=2, default=str) + "\n", encoding="utf-8")
    if install:
        summaries["installed"] = str(install_demo_weights(weights))
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node.lab.train.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/train/demo_phantom.toml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--train-only", action="store_true", help="skip the held-out evaluation")
    group.add_argument("--evaluate-only", action="store_true", help="evaluate the exported weights only")
    parser.add_argument("--install", action="store_true",
                        help="then copy the exported weights over the packaged demo weights")
    args = parser.parse_args(argv)
    configure_logging("info", "console")
    try:
        summary = build(Path(args.config), train_only=args.train_only, evaluate_only=args.evaluate_only,
                        install=args.install)
    except NodeError as error:
        return report_failure(error)
    for name in HELDOUT:
        if name in summary:
            result = summary[name]
            print(json.dumps({"set": name, "ap50": result["ap50"], "froc_fp_rates": result["froc"]["fp_rates"],
                              "froc_sensitivities": result["froc"]["sensitivities"],
                              "precision": result["precision"], "recall": result["recall"],
                              "file_bytes": summary["file_bytes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
