"""The typed training configuration, loaded from a TOML file under ``config/train/``.

Like the node's config, every table forbids unknown keys, so a typo fails at load time
with the key's name (``ConfigError: ...: optimizer.base_lrr: unknown key``). Relative
paths (datasets, output folder, export file, starting weights) resolve against the TOML
file's folder.

The study's four configurations share one schedule: effective batch 16, base LR 0.001,
24000 iterations, the LR divided by 10 at iteration 18000. The loss is not a setting: it
comes with the architecture (focal loss in torchvision's RetinaNet head, cross-entropy
for the Faster R-CNN box classifier); ``loss`` records which one a file expects and is
checked against the architecture, so a file cannot silently claim the wrong loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import dicom_node
from dicom_node.config import DEMO_WEIGHTS, Architecture, Device, read_toml, validate_model
from dicom_node.errors import ConfigError

# The loss each detector family trains with (fixed by the torchvision heads).
LOSS_BY_FAMILY = {"retinanet": "focal", "faster_rcnn": "cross_entropy"}

DEFAULT_LABEL = "trained with dicom-node train - not for clinical use"


def loss_for(architecture: str) -> str:
    """The classification loss that ``architecture`` trains with."""
    family = "retinanet" if architecture.startswith("retinanet") else "faster_rcnn"
    return LOSS_BY_FAMILY[family]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


CLASSIC = "classic"  # the phantom look without a variety


class PhantomData(_Table):
    """Phantoms rendered in memory (dicom_node.lab.phantom.prepared_phantoms), never written."""

    n: Annotated[int, Field(ge=1)]
    seed: Annotated[int, Field(ge=0)]
    # A named variety of dicom_node.lab.phantom_variety ("training" or a held-out one), or
    # "classic": the one look `dicom-node phantom` writes without --variety.
    variety: str = "training"
    # Classic phantoms only: their size (default 3328 x 2560, as `dicom-node phantom`).
    rows: Annotated[int, Field(ge=64)] | None = None
    columns: Annotated[int, Field(ge=64)] | None = None

    @field_validator("variety")
    @classmethod
    def _known(cls, value: str) -> str:
        from dicom_node.lab.phantom_variety import VARIETIES

        if value != CLASSIC and value not in VARIETIES:
            raise ValueError(f"unknown phantom variety {value!r}; known: {', '.join([*VARIETIES, CLASSIC])}")
        return value

    @model_validator(mode="after")
    def _size_for_classic_only(self) -> PhantomData:
        if (self.rows is None) != (self.columns is None):
            raise ValueError("give both rows and columns, or neither")
        if self.rows is not None and self.variety != CLASSIC:
            raise ValueError(f"rows and columns size classic phantoms only; the {self.variety!r} variety "
                             "draws its own sizes")
        return self


class DataConfig(_Table):
    """COCO annotation files (image paths inside them are relative to each JSON file), or
    phantoms rendered in memory (``train_phantoms`` / ``val_phantoms``) instead."""

    train_json: Path | None = None
    val_json: Path | None = None
    # One set, or a list of sets trained on together (e.g. varied and classic phantoms).
    train_phantoms: PhantomData | list[PhantomData] | None = None
    val_phantoms: PhantomData | None = None
    # Processes rendering phantoms (0: one per CPU).
    phantom_workers: Annotated[int, Field(ge=0)] = 0
    # Keep every prepared (decoded, resized) training image in memory as float16.
    cache_images: bool = True
    # Keep the prepared training images on the training device (GPU memory) and augment
    # them there, in the training process, instead of in `num_workers` loader processes:
    # on a GPU, CPU augmentation bounds the speed (measured on one H200: 4 iterations/s).
    # Needs phantoms or cache_images.
    on_device: bool = False

    @model_validator(mode="after")
    def _one_source_each(self) -> DataConfig:
        if self.train_phantoms == []:
            raise ValueError("train_phantoms: give at least one set")
        if (self.train_json is None) == (self.train_phantoms is None):
            raise ValueError("give exactly one of train_json and train_phantoms")
        if self.val_json is not None and self.val_phantoms is not None:
            raise ValueError("give at most one of val_json and val_phantoms")
        if self.on_device and self.train_json is not None and not self.cache_images:
            raise ValueError("on_device needs cache_images (the images are kept in the device's memory)")
        return self

    @property
    def train_phantom_sets(self) -> list[PhantomData]:
        """``train_phantoms`` as a list (empty when training on files)."""
        sets = self.train_phantoms
        return [] if sets is None else [sets] if isinstance(sets, PhantomData) else list(sets)


class ModelConfig(_Table):
    architecture: Architecture
    # Longest image side fed to the model, as in the node's [detector].input_size.
    input_size: Annotated[int, Field(ge=64, le=8192)]
    loss: Literal["focal", "cross_entropy"] | None = None  # None: the architecture's own
    # Anchor size on the finest level, in input pixels (dicom_node.model.architectures).
    smallest_anchor: Annotated[int, Field(ge=4, le=256)] = 32
    # Start from this model's weights instead of random ones (Detectron2's MODEL.WEIGHTS, for
    # fine-tuning): "demo", an exported file, a training checkpoint or an imported Detectron2
    # model, of this architecture and smallest_anchor. The optimizer and the schedule start
    # afresh; a calibrated RetinaNet's score shift is taken off first; a run that resumes from
    # its own checkpoint has its weights already. None: random weights.
    weights: str | None = None

    @field_validator("architecture")
    @classmethod
    def _trainable(cls, value: str) -> str:
        if value == "fixed_boxes":
            raise ValueError("fixed_boxes is a test double and cannot be trained")
        return value

    @model_validator(mode="after")
    def _loss_matches(self) -> ModelConfig:
        expected = loss_for(self.architecture)
        if self.loss is not None and self.loss != expected:
            raise ValueError(
                f"loss {self.loss!r} does not match {self.architecture} (it trains with {expected!r})"
            )
        return self


class OptimizerConfig(_Table):
    name: Literal["sgd"] = "sgd"
    # Effective batch: images per optimizer step. Each step runs `accumulation`
    # micro-batches of batch_size / accumulation images and sums their gradients.
    batch_size: Annotated[int, Field(ge=1)] = 16
    accumulation: Annotated[int, Field(ge=1)] = 1
    base_lr: Annotated[float, Field(gt=0)] = 0.001
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 0.0001
    iterations: Annotated[int, Field(ge=1)] = 24000
    lr_steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [18000])
    lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    warmup_iters: Annotated[int, Field(ge=0)] = 1000
    warmup_factor: Annotated[float, Field(gt=0, le=1)] = 0.001
    # Clip the global gradient norm (None: no clipping).
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> OptimizerConfig:
        if self.batch_size % self.accumulation:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by accumulation {self.accumulation}"
            )
        if sorted(self.lr_steps) != self.lr_steps:
            raise ValueError(f"lr_steps {self.lr_steps} must be increasing")
        if any(step >= self.iterations for step in self.lr_steps):
            raise ValueError(f"lr_steps {self.lr_steps} must be below iterations {self.iterations}")
        return self

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulation


class AugmentConfig(_Table):
    """Photometric jitter ranges and geometric augmentations (see dicom_node.lab.train.augment).

    The study's "saturation" jitter has no meaning on a single-channel image; it is
    replaced by gamma jitter (``gamma``), which changes mid-grey contrast the way
    saturation changes colour intensity, without moving black and white.
    """

    brightness: Annotated[float, Field(ge=0, lt=1)] = 0.1  # add U(-b, b)
    contrast: Annotated[float, Field(ge=0, lt=1)] = 0.1  # scale around the mean by U(1-c, 1+c)
    gamma: Annotated[float, Field(ge=0, lt=1)] = 0.1  # x ** U(1-g, 1+g)
    rotation_degrees: Annotated[float, Field(ge=0, le=45)] = 10.0  # U(-d, d)
    horizontal_flip: Annotated[float, Field(ge=0, le=1)] = 0.5  # probability
    # Not in the study: train on crop_size x crop_size windows (0: whole images), centred
    # near a mass with probability crop_focus. Cheap training at full scale (demo weights).
    crop_size: Annotated[int, Field(ge=0)] = 0
    crop_focus: Annotated[float, Field(ge=0, le=1)] = 0.5


class TrainConfig(_Table):
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    output_dir: Path
    # The deployable checkpoint (what [detector].weights points at). None: output_dir/model_final.pt
    export: Path | None = None
    export_half: bool = False  # store the exported weights as float16 (smaller file)
    label: str = DEFAULT_LABEL
    seed: Annotated[int, Field(ge=0)] = 0
    checkpoint_every: Annotated[int, Field(ge=1)] = 1000
    eval_every: Annotated[int, Field(ge=0)] = 2000  # 0: validate only at the end
    # Score threshold for the precision/recall/F1 part of validation (AP50 uses all scores).
    eval_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    # RetinaNet only: before export, shift the scores so that eval_threshold (the node's
    # default score_threshold) is the operating point of this many false positives per
    # image on the validation set (dicom_node.lab.train.calibrate). None: no shift.
    calibrate_fp_per_image: Annotated[float, Field(gt=0)] | None = None
    device: Device = "auto"
    amp: bool = True  # CUDA only: ignored on CPU
    num_workers: Annotated[int, Field(ge=0)] = 0
    threads: Annotated[int, Field(ge=1)] | None = None  # torch.set_num_threads on CPU

    @property
    def loss(self) -> str:
        return self.model.loss or loss_for(self.model.architecture)

    @model_validator(mode="after")
    def _calibration_needs(self) -> TrainConfig:
        if self.calibrate_fp_per_image is not None:
            if not self.model.architecture.startswith("retinanet"):
                raise ValueError("calibrate_fp_per_image: RetinaNet only (Faster R-CNN scores are a softmax)")
            if self.data.val_json is None and self.data.val_phantoms is None:
                raise ValueError("calibrate_fp_per_image needs a validation set (data.val_json or data.val_phantoms)")
        return self

    @property
    def export_path(self) -> Path:
        return self.export if self.export is not None else self.output_dir / "model_final.pt"


def _resolve(config: TrainConfig, base: Path) -> TrainConfig:
    def resolve(path: Path | None) -> Path | None:
        if path is None or path.is_absolute():
            return path
        return (base / path).resolve()

    data = config.data.model_copy(
        update={"train_json": resolve(config.data.train_json), "val_json": resolve(config.data.val_json)}
    )
    model = config.model
    if model.weights not in (None, DEMO_WEIGHTS):
        model = model.model_copy(update={"weights": str(resolve(Path(model.weights)))})
    return config.model_copy(
        update={"data": data, "model": model, "output_dir": resolve(config.output_dir),
                "export": resolve(config.export)}
    )


# The installed dicom_node package (its demo weights included): never a training output.
PACKAGE_DIR = Path(dicom_node.__file__).resolve().parent


def _refuse_package_outputs(config: TrainConfig, source: str) -> TrainConfig:
    """ConfigError when the run would write into the package, e.g. over the demo weights.

    Training writes checkpoints and exports where the config says; a config that points
    into the package (as the demo config once did) would silently replace the shipped
    demo weights. The demo builder installs new ones explicitly (`train.demo --install`).
    """
    for key, path in (("output_dir", config.output_dir), ("export", config.export_path)):
        if path.resolve().is_relative_to(PACKAGE_DIR):
            raise ConfigError(
                f"{source}: {key}: {path} is inside the dicom_node package ({PACKAGE_DIR}); training "
                "never writes there (it would replace the packaged demo weights): choose a folder "
                "such as runs/<name>/"
            )
    return config


def parse_train_config(data: dict, *, base_dir: Path, source: str = "train config") -> TrainConfig:
    """Validate a training config mapping; relative paths resolve against ``base_dir``.

    Outputs inside the dicom_node package are refused (see `_refuse_package_outputs`).
    """
    return _refuse_package_outputs(_resolve(validate_model(TrainConfig, data, source=source), base_dir), source)


def load_train_config(path: str | Path, *, overrides: dict | None = None) -> TrainConfig:
    """Load ``path`` (TOML); ``overrides`` ({"optimizer.iterations": 10, ...}) replace keys."""
    path = Path(path)
    data = read_toml(path, what="training config")
    for dotted, value in (overrides or {}).items():
        table = data
        *parents, key = dotted.split(".")
        for part in parents:
            table = table.setdefault(part, {})
        table[key] = value
    return parse_train_config(data, base_dir=path.resolve().parent, source=str(path))
