"""The demo builder's last step: only a demo checkpoint replaces the packaged demo weights,
and only when asked (`python -m dicom_node.lab.train.demo --install`, run by scripts/train_demo_weights)."""

from __future__ import annotations

import pytest

from dicom_node.errors import ConfigError
from dicom_node.lab.train.demo import install_demo_weights
from dicom_node.model.architectures import build_model
from dicom_node.model.checkpoints import save_checkpoint


def checkpoint(path, *, label: str, architecture: str = "retinanet_r18_fpn"):
    save_checkpoint(path, model=build_model(architecture, num_classes=1), architecture=architecture,
                    input_size=128, label=label, trained={}, half=True)  # fmt: skip
    return path


def test_a_demo_checkpoint_is_installed_in_place_of_the_target(tmp_path):
    source = checkpoint(tmp_path / "demo.pt", label="DEMO WEIGHTS - synthetic phantoms only")
    target = tmp_path / "package" / "weights.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    assert install_demo_weights(source, target) == target
    assert target.read_bytes() == source.read_bytes()


def test_anything_else_is_refused_and_the_target_is_left_alone(tmp_path):
    source = checkpoint(tmp_path / "site.pt", label="trained with dicom-node train - not for clinical use")
    target = tmp_path / "weights.pt"
    target.write_bytes(b"old")
    with pytest.raises(ConfigError, match="not demo weights"):
        install_demo_weights(source, target)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        install_demo_weights(tmp_path / "junk.pt", target)
    assert target.read_bytes() == b"old"
