"""`train(cfg)`: the training loop behind ``dicom-node train --config config/train/<name>.toml``.

What a run does, in order:
1. seeds every random source from ``cfg.seed``; picks the device (CUDA if asked and
   available); on CPU uses ``cfg.threads`` threads;
2. loads the COCO training set through the one pixel pipeline (the node's own
   ``prepare``), keeping the prepared images in memory when ``data.cache_images``;
3. builds the architecture with random weights (nothing is downloaded), or with those of
   ``model.weights`` (fine-tuning: a model of this architecture, its score calibration
   taken off);
4. resumes from the latest ``checkpoint_*.pt`` in ``output_dir`` if there is one
   (model and how to rebuild it, optimizer, scheduler, AMP scaler, iteration and RNG
   states), whatever ``model.weights`` says;
5. runs SGD with linear warm-up and step decay. Each optimizer step sums the gradients
   of ``accumulation`` micro-batches so that the effective batch is ``batch_size``
   whatever fits the GPU. AMP (autocast + GradScaler) is used on CUDA only;
6. writes a checkpoint every ``checkpoint_every`` iterations and validates (AP50,
   FROC via dicom_node.lab.evaluate) every ``eval_every`` iterations;
7. exports the deployable checkpoint (architecture, input size, label, metadata) that
   ``[detector].weights`` can point at, and returns its path.

Determinism: the image order and every augmentation draw are pure functions of the
seed and the global sample number (iteration x batch + position), so a resumed run
sees exactly the images and augmentations an uninterrupted run would. On CPU with the
same thread count, a resumed run reproduces the uninterrupted run's parameters.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicom_node.files import write_atomically
from dicom_node.errors import ConfigError, NodeError
from dicom_node.lab.train.augment import augment
from dicom_node.lab.train.config import CLASSIC, TrainConfig
from dicom_node.log import get_logger
from dicom_node.model.architectures import MASS_LABEL, smallest_anchor_of
from dicom_node.model.checkpoints import TRAIN_STATE_FORMAT as CHECKPOINT_FORMAT  # evaluate reads it too

log = get_logger("dicom_node.lab.train")

_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d{7})\.pt")
KEEP_CHECKPOINTS = 2
LOG_EVERY = 10  # iterations between lines of output_dir/metrics.jsonl


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Sample:
    """One prepared training image as the model sees it, with its boxes in the same pixels."""

    pixels: torch.Tensor  # HxW, [0, 1] (float16 when cached, to halve memory)
    boxes: torch.Tensor  # Nx4 float32, x0 y0 x1 y1 in resized pixels


def open_dataset(annotations: Path, *, input_size: int):
    """The COCO set at ``annotations`` read through the node's pixel pipeline."""
    from dicom_node.lab.datasets.coco import CocoDataset

    if not annotations.is_file():
        raise ConfigError(f"{annotations}: dataset annotations not found (check data.train_json / val_json)")
    return CocoDataset(annotations, input_size=input_size)


def _sample(item, *, half: bool) -> Sample:
    prepared, boxes, _image_id = item
    pixels = torch.from_numpy(np.ascontiguousarray(prepared.pixels))  # float32, or float16 already
    return Sample(
        pixels=pixels.half() if half else pixels.float(),
        boxes=torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
    )


class LazySamples(Sequence):
    """Samples prepared on access (for sets too large to keep in memory)."""

    def __init__(self, dataset):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        return _sample(self._dataset[index], half=False)


def load_samples(annotations: Path, *, input_size: int, cache: bool) -> Sequence[Sample]:
    """The training samples, all prepared up front (float16 in memory) when ``cache``."""
    dataset = open_dataset(annotations, input_size=input_size)
    if not cache:
        return LazySamples(dataset)
    return [_sample(dataset[i], half=True) for i in range(len(dataset))]


def _phantom_items(spec, *, input_size: int, workers: int, half: bool):
    """(items, coco) of the phantoms ``spec`` (a PhantomData), rendered in memory."""
    import os

    from dicom_node.lab.phantom import prepared_phantoms
    from dicom_node.lab.phantom_variety import VARIETIES

    started = time.monotonic()
    classic = spec.variety == CLASSIC
    size = {"rows": spec.rows, "columns": spec.columns} if classic and spec.rows is not None else {}
    items, coco = prepared_phantoms(n=spec.n, seed=spec.seed, variety=None if classic else VARIETIES[spec.variety],
                                    input_size=input_size, workers=workers or os.cpu_count() or 1, half=half,
                                    **size)
    log.info("phantoms_rendered", images=spec.n, seed=spec.seed, variety=spec.variety, **size,
             masses=len(coco["annotations"]), seconds=round(time.monotonic() - started, 1))
    return items, coco


def training_samples(cfg: TrainConfig) -> Sequence[Sample]:
    """The training samples the config names: a COCO set, or phantoms rendered in memory."""
    data = cfg.data
    if data.train_phantoms is None:
        return load_samples(data.train_json, input_size=cfg.model.input_size, cache=data.cache_images)
    samples = []
    for spec in data.train_phantom_sets:
        items, _coco = _phantom_items(spec, input_size=cfg.model.input_size, workers=data.phantom_workers,
                                      half=True)
        samples += [_sample(item, half=True) for item in items]
    return samples


def validation_items(cfg: TrainConfig) -> tuple[list, dict | None]:
    """(items, COCO ground truth) of the validation set, or ([], None) without one."""
    data = cfg.data
    if data.val_phantoms is not None:
        return _phantom_items(data.val_phantoms, input_size=cfg.model.input_size,
                              workers=data.phantom_workers, half=False)
    if data.val_json is None:
        return [], None
    val_set = open_dataset(data.val_json, input_size=cfg.model.input_size)
    return [val_set[i] for i in range(len(val_set))], val_set.coco


def derived_seed(seed: int, purpose: int, number: int) -> int:
    """A seed for one use (``purpose``: 0 augmentation, 1 epoch order) and number, from ``seed``."""
    return int(np.random.SeedSequence([seed, purpose, number]).generate_state(1)[0])


class TrainSamples(torch.utils.data.Dataset):
    """Augmented training samples indexed by the global sample number.

    Sample ``s`` is image ``perm(epoch)[s % n]`` with ``epoch = s // n`` and ``perm`` a
    seeded permutation, augmented with a generator seeded from ``(seed, s)``. Nothing
    depends on what was drawn before, so a resumed run continues exactly.
    """

    def __init__(self, samples: Sequence[Sample], cfg: TrainConfig):
        if len(samples) == 0:
            raise ConfigError(f"{cfg.data.train_json or 'data.train_phantoms'}: the training set has no images")
        self.samples = samples
        self.augment = cfg.augment
        self.seed = cfg.seed
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) last used

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, 1, epoch))
            self._order = (epoch, torch.randperm(len(self.samples), generator=generator))
        return self._order[1]

    def __len__(self) -> int:
        return 2**62  # indexed by global sample number

    def __getitem__(self, sample_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(sample_number, len(self.samples))
        sample = self.samples[int(self._permutation(epoch)[position])]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, 0, sample_number))
        return augment(sample.pixels.float(), sample.boxes, self.augment, generator=generator)


def _collate(batch):
    return [image for image, _ in batch], [boxes for _, boxes in batch]


# ---------------------------------------------------------------- model, optimizer, schedule


def model_input(pixels: torch.Tensor) -> torch.Tensor:
    """One image as the model takes it: grayscale [0, 1] replicated to 3xHxW (as TorchDetector)."""
    return pixels.float().reshape(1, *pixels.shape[-2:]).expand(3, -1, -1)


def targets(boxes: Sequence[torch.Tensor], device: torch.device) -> list[dict]:
    return [
        {"boxes": b.to(device), "labels": torch.full((len(b),), MASS_LABEL, dtype=torch.int64, device=device)}
        for b in boxes
    ]


def lr_factor(iteration: int, cfg: TrainConfig) -> float:
    """Linear warm-up then a step decay by ``lr_gamma`` at each of ``lr_steps`` (Detectron2's)."""
    opt = cfg.optimizer
    factor = opt.lr_gamma ** sum(1 for step in opt.lr_steps if iteration >= step)
    if iteration < opt.warmup_iters:
        alpha = iteration / opt.warmup_iters
        factor *= opt.warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    opt = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=opt.base_lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    return optimizer, scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The training-state checkpoint with the highest iteration in ``output_dir``, if any."""
    found = sorted(
        (int(m.group(1)), p) for p in output_dir.glob("checkpoint_*.pt") if (m := _CHECKPOINT_NAME.fullmatch(p.name))
    )
    return found[-1][1] if found else None


def _atomic_save(obj, path: Path) -> None:
    write_atomically(path, lambda handle: torch.save(obj, handle))


def save_state(path: Path, *, iteration: int, model, optimizer, scheduler, scaler, cfg: TrainConfig) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "iteration": iteration,
        "architecture": cfg.model.architecture,
        "input_size": cfg.model.input_size,
        # How to rebuild the model (anchors; an imported model's normalisation): a resumed
        # run and `dicom-node evaluate --weights checkpoint_*.pt` build it from these.
        "model_options": dict(model.build_options),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    _atomic_save(state, path)


def read_state(path: Path, cfg: TrainConfig) -> dict:
    """A training state of this run's architecture and input size, to resume from."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise NodeError(f"{path}: cannot read training checkpoint ({error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise NodeError(f"{path}: not a dicom-node training checkpoint")
    if (state["architecture"], state["input_size"]) != (cfg.model.architecture, cfg.model.input_size):
        raise ConfigError(
            f"{path}: checkpoint is {state['architecture']} at input_size {state['input_size']}, the config "
            f"asks for {cfg.model.architecture} at {cfg.model.input_size}; use another output_dir"
        )
    # A state written before states recorded model_options says nothing of its anchors.
    if "model_options" in state and (anchor := smallest_anchor_of(state["model_options"])) != cfg.model.smallest_anchor:
        raise ConfigError(
            f"{path}: checkpoint was trained with smallest_anchor {anchor}, model.smallest_anchor is "
            f"{cfg.model.smallest_anchor}; use another output_dir"
        )
    return state


def restore_state(state: dict, *, model, optimizer, scheduler, scaler) -> int:
    """Put a training state back; return the iteration it was saved at."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without AMP (CPU)
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["iteration"])


def starting_weights(cfg: TrainConfig) -> dict:
    """The checkpoint `model.weights` names, checked against the config: its architecture
    and its anchors must be the run's (the head's outputs mean boxes around those anchors)."""
    from dicom_node.model.checkpoints import load_checkpoint, weights_file

    path = weights_file(cfg.model.weights)
    checkpoint = load_checkpoint(path)
    found = {"architecture": checkpoint["architecture"],
             "smallest_anchor": smallest_anchor_of(checkpoint["model_options"])}
    for key, value in found.items():
        if value != getattr(cfg.model, key):
            raise ConfigError(
                f"model.weights: {path} is a {found['architecture']} model with smallest_anchor "
                f"{found['smallest_anchor']}, model.{key} is {getattr(cfg.model, key)!r}: set "
                f"model.{key} = {value!r} to start from it"
            )
    checkpoint["path"] = path
    return checkpoint


def model_options(cfg: TrainConfig, state: dict | None, start: dict | None) -> dict:
    """build_model's options: a resumed run's own (a state saved before they were recorded:
    the config's anchors, as then), else the starting weights', else the config's."""
    if state is not None and "model_options" in state:
        return dict(state["model_options"])
    if start is not None:
        return dict(start["model_options"])
    return {"smallest_anchor": cfg.model.smallest_anchor}


def load_starting_weights(model: torch.nn.Module, start: dict) -> float:
    """Load the starting checkpoint into `model`, without its score calibration (the run
    calibrates its own export, dicom_node.lab.train.calibrate); return the shift taken off."""
    from dicom_node.model.checkpoints import load_state as load_weights

    load_weights(model, start["state_dict"], path=start["path"], architecture=start["architecture"])
    shift = float((start["trained"].get("calibration") or {}).get("logit_shift") or 0.0)
    if shift:
        from dicom_node.lab.train.calibrate import classification_bias

        with torch.no_grad():
            classification_bias(model).sub_(shift)
    return shift


def _prune(output_dir: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    found = sorted(p for p in output_dir.glob("checkpoint_*.pt") if _CHECKPOINT_NAME.fullmatch(p.name))
    for old in found[:-keep]:
        old.unlink(missing_ok=True)


# ---------------------------------------------------------------- validation


def validate(model, items, gt_coco: dict, *, device: torch.device, input_size: int,
             threshold: float) -> dict:
    """Summary metrics (AP50, precision/recall/F1 at ``threshold``, FROC) of ``model``.

    ``items`` are CocoDataset items ``(PreparedImage, boxes, image_id)`` of ``gt_coco``.
    """
    return _validated(model, items, gt_coco, device=device, input_size=input_size, threshold=threshold)[1]


def _validated(model, items, gt_coco: dict, *, device: torch.device, input_size: int,
               threshold: float) -> tuple[list[dict], dict]:
    """(detections, summary metrics) of ``model`` on the validation ``items``."""
    from dicom_node.lab.evaluate.run import evaluate_detections

    detections = detections_of(model, items, gt_coco, device=device, input_size=input_size)
    return detections, evaluate_detections(gt_coco, detections, threshold=threshold)["summary"]


def detections_of(model, items, gt_coco: dict, *, device: torch.device, input_size: int) -> list[dict]:
    """COCO detections of ``model`` on ``items`` (CocoDataset items of ``gt_coco``).

    The model runs through the node's own TorchDetector (the deployment path: same input
    tensor, same box mapping) at the model's own low cut, without the node's threshold.
    """
    from dicom_node.model.architectures import MODEL_SCORE_THRESHOLD
    from dicom_node.model.detector import TorchDetector

    was_training = model.training
    detector = TorchDetector(model, input_size=input_size, score_threshold=MODEL_SCORE_THRESHOLD,
                             label="validation", device=str(device), batch_size=4)
    category_id = (gt_coco.get("categories") or [{"id": 1}])[0]["id"]
    detections = []
    try:
        for prepared, _boxes, image_id in items:
            for det in detector.detect([prepared])[0]:
                x0, y0, x1, y1 = det.box
                detections.append({"image_id": image_id, "category_id": category_id,
                                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": det.score})
    finally:
        model.train(was_training)
    return detections


# ---------------------------------------------------------------- the loop


def _batches(dataset: TrainSamples, cfg: TrainConfig, start_iteration: int) -> Iterator[tuple[list, list]]:
    micro = cfg.optimizer.micro_batch
    first = start_iteration * cfg.optimizer.batch_size
    total = cfg.optimizer.iterations * cfg.optimizer.batch_size
    sampler = range(first, total)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=micro, sampler=sampler, num_workers=0 if cfg.data.on_device else cfg.num_workers,
        collate_fn=_collate, persistent_workers=False,
    )
    return iter(loader)


def on_device(samples: Sequence[Sample], device: torch.device) -> list[Sample]:
    """The samples with their pixels in ``device``'s memory (boxes stay on the CPU, where
    the augmentations move them), for ``data.on_device``."""
    return [Sample(pixels=s.pixels.to(device), boxes=s.boxes) for s in samples]


def _append_metrics(output_dir: Path, record: dict) -> None:
    with open(output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def train(cfg: TrainConfig, *, device: str | None = None, progress: bool = True,
          samples: Sequence[Sample] | None = None, validation: tuple[list, dict | None] | None = None) -> Path:
    """Train ``cfg``; resume from ``cfg.output_dir`` if it holds a checkpoint. Return the export path.

    ``samples`` and ``validation`` (from :func:`training_samples` and
    :func:`validation_items`) skip loading the config's data again, for a caller that
    trains several times on the same data.
    """
    from tqdm import tqdm

    from dicom_node.model.architectures import build_model
    from dicom_node.model.checkpoints import save_checkpoint

    dev = resolve_device(device or cfg.device)
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    output_dir = cfg.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    run_log = log.bind(architecture=cfg.model.architecture, output_dir=str(output_dir))

    # What the model starts from, before the data (minutes, for a large set) is loaded.
    resume_from = latest_checkpoint(output_dir)
    state = read_state(resume_from, cfg) if resume_from is not None else None
    start = starting_weights(cfg) if state is None and cfg.model.weights is not None else None

    started = time.monotonic()
    samples = training_samples(cfg) if samples is None else samples
    val_items, val_gt = validation_items(cfg) if validation is None else validation
    run_log.info("train_data_loaded", train_images=len(samples), val_images=len(val_items),
                 seconds=round(time.monotonic() - started, 1))

    model = build_model(cfg.model.architecture, num_classes=1, **model_options(cfg, state, start))
    if start is not None:
        shift = load_starting_weights(model, start)
        run_log.info("train_starts_from_weights", weights=str(start["path"]), label=start["label"],
                     calibration_removed=shift)
    model.to(dev).train()
    optimizer, scheduler = build_optimizer(model, cfg)
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    iteration = 0
    if state is not None:
        iteration = restore_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        del state
        run_log.info("train_resumed", checkpoint=str(resume_from), iteration=iteration)

    opt = cfg.optimizer
    dataset = TrainSamples(on_device(samples, dev) if cfg.data.on_device else samples, cfg)
    # Creating a DataLoader iterator draws from the global torch RNG; keep that draw out
    # of the training's RNG stream so a resumed run matches an uninterrupted one.
    rng_state = torch.get_rng_state()
    batches = _batches(dataset, cfg, iteration)
    torch.set_rng_state(rng_state)
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=torch.float16)) if use_amp else nullcontext
    run_log.info("train_started", iteration=iteration, iterations=opt.iterations, batch_size=opt.batch_size,
                 accumulation=opt.accumulation, device=str(dev), amp=use_amp, loss=cfg.loss, seed=cfg.seed)

    bar = tqdm(total=opt.iterations, initial=iteration, disable=not progress, unit="it", dynamic_ncols=True)
    smoothed = None
    last_metrics: dict | None = None
    last_detections: list[dict] = []
    train_started = time.monotonic()
    try:
        while iteration < opt.iterations:
            loss_value = 0.0
            parts: dict[str, float] = {}
            for _ in range(opt.accumulation):
                images, boxes = next(batches)
                with autocast():
                    losses = model([model_input(i).to(dev) for i in images], targets(boxes, dev))
                    loss = sum(losses.values()) / opt.accumulation
                scaler.scale(loss).backward()
                loss_value += float(loss.detach())
                for name, value in losses.items():
                    parts[name] = parts.get(name, 0.0) + float(value.detach()) / opt.accumulation
            if not math.isfinite(loss_value):
                raise NodeError(
                    f"training diverged: loss is {loss_value} at iteration {iteration + 1} "
                    f"(lower optimizer.base_lr or set optimizer.clip_grad_norm)"
                )
            if opt.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            iteration += 1

            smoothed = loss_value if smoothed is None else 0.9 * smoothed + 0.1 * loss_value
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
            if iteration % LOG_EVERY == 0 or iteration % cfg.checkpoint_every == 0 or iteration == opt.iterations:
                _append_metrics(output_dir, {"iteration": iteration, "loss": loss_value, **parts,
                                             "lr": scheduler.get_last_lr()[0],
                                             "elapsed_s": round(time.monotonic() - train_started, 1)})
            if iteration % cfg.checkpoint_every == 0 or iteration == opt.iterations:
                path = output_dir / f"checkpoint_{iteration:07d}.pt"
                save_state(path, iteration=iteration, model=model, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, cfg=cfg)
                _prune(output_dir)
                run_log.info("checkpoint_saved", iteration=iteration, path=str(path))
            due = cfg.eval_every and iteration % cfg.eval_every == 0
            if val_items and (due or iteration == opt.iterations):
                last_detections, last_metrics = _validated(model, val_items, val_gt, device=dev,
                                                           input_size=cfg.model.input_size,
                                                           threshold=cfg.eval_threshold)
                _append_metrics(output_dir, {"iteration": iteration, "validation": last_metrics})
                run_log.info("validation", iteration=iteration, ap50=last_metrics.get("ap50"),
                             recall=last_metrics.get("recall"), precision=last_metrics.get("precision"))
    finally:
        bar.close()
    if last_metrics is None and val_items:  # resumed a finished run: validate what is exported
        last_detections, last_metrics = _validated(model, val_items, val_gt, device=dev,
                                                   input_size=cfg.model.input_size, threshold=cfg.eval_threshold)

    calibration = None
    if cfg.calibrate_fp_per_image is not None and val_items:
        from dicom_node.lab.train.calibrate import calibrate

        # The last validation ran on this model, at the last iteration: its detections are these.
        calibration = calibrate(model, last_detections, val_gt, fp_per_image=cfg.calibrate_fp_per_image,
                                at=cfg.eval_threshold)
        last_metrics = validate(model, val_items, val_gt, device=dev, input_size=cfg.model.input_size,
                                threshold=cfg.eval_threshold)

    export = cfg.export_path
    export.parent.mkdir(parents=True, exist_ok=True)
    trained = {
        "iterations": opt.iterations,
        "seed": cfg.seed,
        "loss": cfg.loss,
        "optimizer": opt.model_dump(),
        "augment": cfg.augment.model_dump(),
        "train_data": ([spec.model_dump(exclude_none=True) for spec in cfg.data.train_phantom_sets]
                       or f"{cfg.data.train_json.parent.name}/{cfg.data.train_json.name}"),
        "train_images": len(samples),
        # "demo", or the file's name: not where it was on the machine that trained.
        **({"started_from": Path(cfg.model.weights).name} if cfg.model.weights else {}),
        "validation": _scalars(last_metrics),
        **({"calibration": calibration} if calibration else {}),
        "torch": torch.__version__,
        "device": dev.type,
        "seconds_this_process": round(time.monotonic() - train_started, 1),
    }
    save_checkpoint(export, model=model, architecture=cfg.model.architecture, input_size=cfg.model.input_size,
                    label=cfg.label, trained=trained, half=cfg.export_half)
    run_log.info("train_finished", export=str(export), iteration=iteration, validation=trained["validation"])
    return export


def _scalars(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    keep = ("images", "lesions", "ap50", "precision", "recall", "f1", "threshold", "froc")
    return {k: metrics[k] for k in keep if k in metrics}
