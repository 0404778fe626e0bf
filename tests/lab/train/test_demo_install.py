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


def test_the_builder_installs_only_weights_that_meet_the_targets_or_beat_the_packaged_ones(monkeypatch, tmp_path):
    """Below target and not better than the packaged weights everywhere: nothing is installed,
    and the error names each short set; better everywhere, or on target: installed."""
    from dicom_node.errors import NodeError
    from dicom_node.lab.train import demo

    exported = tmp_path / "run" / "demo_retinanet_r18_fpn.pt"
    exported.parent.mkdir()
    exported.write_bytes(b"not installed")
    config = tmp_path / "demo.toml"
    config.write_text(f'output_dir = "{exported.parent}"\nexport = "{exported}"\n'
                      '[model]\narchitecture = "retinanet_r18_fpn"\ninput_size = 128\n'
                      '[data]\ntrain_phantoms = { n = 1, seed = 1 }\n')
    monkeypatch.setattr(demo, "ensure_heldout", lambda folder, spec, workers=1: folder / "annotations.json")
    from dicom_node.model.checkpoints import DEMO_WEIGHTS_FILE

    scores = {"in_distribution": 0.95, "texture_reticular": 0.5, "contrast_band": 0.9, "size_3328x2560": 0.2}
    packaged = {"in_distribution": 0.1, "texture_reticular": 0.1, "contrast_band": 0.1, "size_3328x2560": 0.3}
    monkeypatch.setattr(demo, "evaluate_heldout", lambda weights, annotations, out, device="cpu": {
        "ap50": (packaged if weights == DEMO_WEIGHTS_FILE else scores)[annotations.parent.name],
        "sensitivity_at_fp_per_image": {}})
    installed = []
    monkeypatch.setattr(demo, "install_demo_weights", lambda source: installed.append(source))
    with pytest.raises(NodeError, match=r"texture_reticular 0\.500 < 0\.85, size_3328x2560 0\.200 < 0\.85\) "
                                        r"and not better than the packaged demo weights on size_3328x2560 "
                                        r"\(0\.200 <= 0\.300\)"):
        demo.build(config, evaluate_only=True, install=True)
    assert installed == []
    scores.update(size_3328x2560=0.31)  # still short of the target, but better everywhere
    figures = demo.build(config, evaluate_only=True, install=True)
    assert installed == [exported]
    assert figures["sets"]["size_3328x2560"]["packaged"]["ap50"] == 0.3
    packaged.update(texture_reticular=0.9)  # the packaged file is better there, the candidate on target
    scores.update(texture_reticular=0.86, size_3328x2560=0.9)
    demo.build(config, evaluate_only=True, install=True)
    assert installed == [exported, exported]


def test_the_builder_trains_on_from_the_packaged_weights_when_asked(tmp_path):
    """`--weights demo`: a lent GPU's minutes add to the packaged weights' training."""
    from dicom_node.lab.train import demo
    from dicom_node.model.checkpoints import load_checkpoint

    exported = tmp_path / "run" / "demo_retinanet_r18_fpn.pt"
    config = tmp_path / "demo.toml"
    config.write_text(
        f'output_dir = "{exported.parent}"\nexport = "{exported}"\ndevice = "cpu"\nthreads = 2\n'
        '[model]\narchitecture = "retinanet_r18_fpn"\ninput_size = 128\nsmallest_anchor = 16\n'
        '[data]\ntrain_phantoms = { n = 2, seed = 1, variety = "classic", rows = 256, columns = 200 }\n'
        '[optimizer]\nbatch_size = 2\niterations = 1\nlr_steps = []\nwarmup_iters = 0\n', encoding="utf-8")
    assert demo.main(["--config", str(config), "--train-only", "--weights", "demo"]) == 0
    assert load_checkpoint(exported)["trained"]["started_from"] == "demo"
    exported.unlink()
    for checkpoint in exported.parent.glob("checkpoint_*.pt"):
        checkpoint.unlink()
    assert demo.main(["--config", str(config), "--train-only"]) == 0
    assert "started_from" not in load_checkpoint(exported)["trained"]
