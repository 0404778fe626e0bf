"""Training: ``dicom-node train --config config/train/<name>.toml``.

- ``config``: the typed training config (TOML, unknown keys rejected).
- ``augment``: brightness / contrast / gamma jitter, small rotation, horizontal flip,
  with the boxes moved along (deterministic from a seeded generator).
- ``loop``: ``train(cfg)``: gradient accumulation, checkpoints with resume, AMP on CUDA,
  periodic validation, and the export of a checkpoint the node can load.
"""

from dicom_node.lab.train.config import TrainConfig, load_train_config
from dicom_node.lab.train.loop import train

__all__ = ["TrainConfig", "load_train_config", "train"]
