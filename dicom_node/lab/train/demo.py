"""Build the packaged demo weights: varied phantoms -> train -> held-out sets drawn outside the training ranges.

``python -m dicom_node.lab.train.demo --config config/train/demo_phantom.toml`` (what
``scripts/train_demo_weights`` runs):

1. trains with ``dicom_node.lab.train.train`` on phantoms rendered in memory from the
   ``training`` variety (dicom_node.lab.phantom_variety: sizes, bit depths, MONOCHROME1/2,
   VOI LUTs, processing looks, textures, 4-60 mm masses from subtle to obvious, and burned-in
   text, view letters, rulers, markers and paddle edges as hard negatives); the export is
   the float16 checkpoint with the DEMO label;
2. writes the held-out sets (:data:`HELDOUT_SETS`) as DICOM files with COCO labels under
   ``.data/demo/heldout/<name>/``: one in distribution and one per property moved outside
   the training ranges (a texture family, a mass-contrast band, an image size), each with
   at least 200 masses, never seen in training or model selection; a set already written
   with the same parameters is reused;
3. evaluates the exported file through the node's own path (``load_detector``,
   ``prepare``, dicom_node.lab.evaluate, as ``dicom-node evaluate`` does) on each set,
   writing reports under ``<output_dir>/heldout/<name>/`` and the figures to
   ``<output_dir>/heldout_summary.json``; ``--compare FILE`` evaluates another checkpoint
   (the previous demo weights, say) on the same sets for a before/after table;
4. with ``--install`` (what the script passes), also evaluates the packaged
   ``dicom_node/weights/demo_retinanet_r18_fpn.pt`` on the same sets and copies the exported
   file over it if it meets the held-out targets (:data:`TARGET_AP50`), or, short of them,
   if it is better than the packaged file on every set: a newcomer gets the best demo
   measured, never a regression, and the shortfall is logged (``demo_below_target``).
   Training itself never writes into the package (dicom_node.lab.train.config refuses such
   outputs).

``--fit-seconds S`` (for a lent GPU with a fixed time budget) renders the data, times a
few iterations, and sets the schedule (iterations, LR step) so that the run ends within
``S`` seconds of its start; the schedule it chose is logged and recorded in the exported
checkpoint (``trained.optimizer``), so a rerun with those numbers in the config repeats it.
``--weights demo`` starts from the packaged weights instead of random ones (the config's
``model.weights``; their calibration is taken off and made again at export): one lent GPU's
minutes then add to the earlier runs' instead of starting over.

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

from dicom_node.errors import ConfigError, NodeError
from dicom_node.log import configure_logging, get_logger, report_failure

log = get_logger("dicom_node.lab.train.demo")


@dataclass(frozen=True)
class HeldOutSet:
    """One held-out phantom set: a named variety (dicom_node.lab.phantom_variety.HELDOUT), n, seed."""

    variety: str
    n: int
    seed: int


# 170 images of 0-3 masses each give a little over 200 masses (checked when written).
HELDOUT_SETS = {
    "in_distribution": HeldOutSet("in_distribution", n=170, seed=3101),
    "texture_reticular": HeldOutSet("texture_reticular", n=170, seed=3102),
    "contrast_band": HeldOutSet("contrast_band", n=170, seed=3103),
    "size_3328x2560": HeldOutSet("size_3328x2560", n=170, seed=3104),
}
MIN_HELDOUT_MASSES = 200
# What the package ships only when met (issue #9): AP50 on each held-out set.
TARGET_AP50 = {"in_distribution": 0.9, "texture_reticular": 0.85, "contrast_band": 0.85, "size_3328x2560": 0.85}
FROC_REPORTED = (0.5, 1.0, 2.0)  # false positives per image


def ensure_heldout(folder: Path, spec: HeldOutSet, *, workers: int = 1) -> Path:
    """Write the held-out set ``spec`` under ``folder`` (reused if already written alike)."""
    from dicom_node.lab.phantom import ANNOTATIONS_NAME, write_phantoms
    from dicom_node.lab.phantom_variety import HELDOUT

    annotations = folder / ANNOTATIONS_NAME
    stamp = folder / "phantom_set.json"
    wanted = json.dumps({**asdict(spec), "variety_ranges": HELDOUT[spec.variety].describe()}, sort_keys=True)
    if annotations.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        return annotations
    started = time.monotonic()
    written = write_phantoms(folder, n=spec.n, seed=spec.seed, variety=HELDOUT[spec.variety], workers=workers)
    masses = len(json.loads(written.read_text(encoding="utf-8"))["annotations"])
    if masses < MIN_HELDOUT_MASSES:
        raise ConfigError(f"{written}: held-out set {spec.variety} has {masses} masses, "
                          f"fewer than {MIN_HELDOUT_MASSES}; raise its n")
    stamp.write_text(wanted, encoding="utf-8")
    log.info("phantoms_written", path=str(written), images=spec.n, masses=masses, seed=spec.seed,
             seconds=round(time.monotonic() - started, 1))
    return written


def evaluate_heldout(weights: Path, annotations: Path, out_dir: Path, *, device: str = "cpu",
                     threshold: float = 0.5) -> dict:
    """Figures of the checkpoint ``weights`` on one held-out set, through the node's detector."""
    from dicom_node.config import DetectorConfig
    from dicom_node.lab.evaluate.run import run_evaluation

    # No architecture: the checkpoint names its own (read once, by the detector).
    detector = DetectorConfig(weights=str(weights), score_threshold=threshold)
    summary = run_evaluation(detector, annotations, out_dir, device=device)["summary"]
    froc = dict(zip(summary["froc"]["fp_rates"], summary["froc"]["sensitivities"]))
    return {
        "images": summary["images"],
        "masses": summary["lesions"],
        "ap50": summary["ap50"],
        "sensitivity_at_fp_per_image": {str(rate): froc[rate] for rate in FROC_REPORTED},
        "precision": summary["precision"],
        "recall": summary["recall"],
        "fp_per_image": summary["fp_per_image"],
        "threshold": threshold,
    }


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


def fit_schedule(cfg, *, seconds_per_iteration: float, seconds: float):
    """``cfg`` with iterations (a multiple of 100) and the LR step at 85 % fitted into ``seconds``."""
    iterations = max(int(seconds / seconds_per_iteration) // 100 * 100, 100)
    optimizer = cfg.optimizer.model_copy(update={
        "iterations": iterations, "lr_steps": [int(iterations * 0.85)],
        "warmup_iters": min(cfg.optimizer.warmup_iters, iterations // 10)})
    return cfg.model_copy(update={"optimizer": optimizer, "checkpoint_every": max(iterations // 4, 1),
                                  "eval_every": 0})


def _time_iterations(cfg, samples, *, device: str) -> float:
    """Seconds per iteration of ``cfg`` on ``device``, read off a short run's metrics log
    after its 20th iteration (model building, loader start-up and the first, slower steps
    left out). The window is four times what the loader's workers hold ready (2 batches
    each): timed within that depth, a data-bound run looks as fast as the GPU (measured:
    0.145 s against 0.25 s per iteration once the prefetched batches were used up)."""
    import tempfile

    from dicom_node.lab.train.loop import train

    loader_workers = 0 if cfg.data.on_device else cfg.num_workers
    iterations = max(40, 8 * loader_workers) // 10 * 10
    with tempfile.TemporaryDirectory() as scratch:
        optimizer = cfg.optimizer.model_copy(update={"iterations": iterations + 20, "lr_steps": [],
                                                     "warmup_iters": 0})
        train(cfg.model_copy(update={"optimizer": optimizer, "output_dir": Path(scratch), "eval_every": 0,
                                     "export": Path(scratch) / "probe.pt", "checkpoint_every": 10**6}),
              device=device, progress=False, samples=samples, validation=([], None))
        records = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()]
        elapsed = {r["iteration"]: r["elapsed_s"] for r in records if "elapsed_s" in r}
        return (elapsed[iterations + 20] - elapsed[20]) / iterations


def build(config_path: Path, *, train_only: bool = False, evaluate_only: bool = False,
          install: bool = False, device: str | None = None, fit_seconds: float | None = None,
          compare: Path | None = None, workers: int = 1, start_weights: str | None = None) -> dict:
    """Training and held-out evaluation for the demo config; returns the held-out figures.

    `start_weights` ("demo" or a file) starts the training from that model (the config's
    model.weights): a lent GPU's minutes then add to what earlier runs learned."""
    from dicom_node.lab.train.config import load_train_config
    from dicom_node.lab.train.loop import train, training_samples, validation_items

    started = time.monotonic()
    cfg = load_train_config(config_path, overrides={"model.weights": start_weights} if start_weights else None)
    if not evaluate_only:
        samples = training_samples(cfg)
        validation = validation_items(cfg)
        if fit_seconds is not None:
            import torch

            torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest kernels
            per_iteration = _time_iterations(cfg, samples, device=device or cfg.device)
            reserve = 90  # export, validation and leaving the machine
            cfg = fit_schedule(cfg, seconds_per_iteration=per_iteration,
                               seconds=fit_seconds - (time.monotonic() - started) - reserve)
            log.info("demo_schedule_fitted", seconds_per_iteration=round(per_iteration, 3),
                     iterations=cfg.optimizer.iterations, lr_steps=cfg.optimizer.lr_steps)
        weights = train(cfg, device=device, samples=samples, validation=validation)
        log.info("demo_trained", weights=str(weights), minutes=round((time.monotonic() - started) / 60, 1))
    weights = cfg.export_path
    if train_only:
        if install:
            raise ConfigError("--install needs the held-out evaluation (drop --train-only): the package "
                              "ships only weights that meet the held-out targets or beat the packaged ones")
        return {}
    data_root = cfg.output_dir.parent / "heldout"
    figures: dict = {"weights": str(weights), "file_bytes": weights.stat().st_size, "sets": {}}
    candidates = {"demo": weights, **({"compare": compare} if compare else {})}
    if install:
        from dicom_node.model.checkpoints import DEMO_WEIGHTS_FILE

        candidates["packaged"] = DEMO_WEIGHTS_FILE
    for name, spec in HELDOUT_SETS.items():
        annotations = ensure_heldout(data_root / name, spec, workers=workers)
        entry = {"phantoms": asdict(spec)}
        for role, checkpoint in candidates.items():
            out = cfg.output_dir / "heldout" / (name if role == "demo" else f"{name}_{role}")
            entry[role] = evaluate_heldout(checkpoint, annotations, out, device=device or "cpu")
            log.info("demo_heldout", set=name, weights=role, ap50=entry[role]["ap50"],
                     sensitivity=entry[role]["sensitivity_at_fp_per_image"])
        figures["sets"][name] = entry
    (cfg.output_dir / "heldout_summary.json").write_text(json.dumps(figures, indent=2, default=str) + "\n",
                                                        encoding="utf-8")
    if install:
        check_installable(weights, figures["sets"])
        figures["installed"] = str(install_demo_weights(weights))
    return figures


def check_installable(weights: Path, sets: dict) -> None:
    """Raise NodeError unless ``weights`` meet every held-out target or, short of them, beat
    the packaged demo weights (``sets[name]["packaged"]``) on every set."""
    ap50 = {name: entry["demo"]["ap50"] or 0.0 for name, entry in sets.items()}
    short = {name: value for name, value in ap50.items() if value < TARGET_AP50[name]}
    if not short:
        return
    shortfall = ", ".join(f"{name} {value:.3f} < {TARGET_AP50[name]}" for name, value in short.items())
    not_better = {name: entry["packaged"]["ap50"] or 0.0 for name, entry in sets.items()
                  if ap50[name] <= (entry["packaged"]["ap50"] or 0.0)}
    if not_better:
        raise NodeError(f"{weights}: not installed; held-out AP50 below target ({shortfall}) and not better "
                        "than the packaged demo weights on " + ", ".join(
                            f"{name} ({ap50[name]:.3f} <= {packaged:.3f})" for name, packaged in not_better.items()))
    log.warning("demo_below_target", weights=str(weights), shortfall=shortfall,
                packaged={name: entry["packaged"]["ap50"] for name, entry in sets.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node.lab.train.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/train/demo_phantom.toml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--train-only", action="store_true", help="skip the held-out evaluation")
    group.add_argument("--evaluate-only", action="store_true", help="evaluate the exported weights only")
    parser.add_argument("--install", action="store_true",
                        help="then copy the exported weights over the packaged demo weights")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's)")
    parser.add_argument("--fit-seconds", type=float,
                        help="fit the schedule so that the whole run ends within this many seconds")
    parser.add_argument("--compare", type=Path, help="also evaluate this checkpoint on the held-out sets")
    parser.add_argument("--workers", type=int, default=1, help="processes writing the held-out phantoms")
    parser.add_argument("--weights", help="start from these weights (demo, or a file) instead of random ones")
    args = parser.parse_args(argv)
    configure_logging("info", "console")
    try:
        figures = build(Path(args.config), train_only=args.train_only, evaluate_only=args.evaluate_only,
                        install=args.install, device=args.device, fit_seconds=args.fit_seconds,
                        compare=args.compare, workers=args.workers, start_weights=args.weights)
    except NodeError as error:
        return report_failure(error)
    for name, entry in figures.get("sets", {}).items():
        for role in ("demo", "compare", "packaged"):
            if role in entry:
                print(json.dumps({"set": name, "weights": role, **entry[role]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
