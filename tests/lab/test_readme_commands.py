"""README.md's "Training and evaluation" commands, run exactly as written.

The command lines are read from the ```sh block of that README section, so the README
cannot change without this test running what it then says. Each runs as its own
`python -m dicom_node` process (what the `dicom-node` console script runs) in a folder
laid out as the README assumes a checkout to be:

- `CBIS-DDSM/` and the two `mass_case_description_*.csv`: a synthetic CBIS-DDSM download
  (tests/lab/datasets/conftest.FakeCbis; synthetic images, no patient data);
- `config/dicom-node.toml`: the repository's file (evaluate reads its [detector] threshold);
- `config/train/retinanet_r101_fpn.toml`: the repository's file with what the README says
  to edit ([data] paths: the split's files) and, so that the module stays well under a
  minute on the 2 cores of CI, a smaller run: 2 iterations of batch 2 (schedule steps
  moved inside them), input size 128, no data-loading processes, 2 threads, a checkpoint
  at every iteration, and the demo's architecture (retinanet_r18_fpn) in place of R101:
  measured on the loaded 2-core machine, R101 took 38 s to train these 2 iterations
  (three 420 MB checkpoints) and 18 s per evaluation of 4 images, R18 a few seconds.
  The README's lines are run as written; the file at that path is this copy. So the
  exported `model_final.pt` is an R18, which `evaluate --weights` finds in the file;
- `coco_instances_results.json`: detections made "elsewhere" (from the test split's
  ground truth, moved and scored), and `model_final.pth`: Detectron2 R101 weights of the
  right names and shapes (tests/model/test_detectron2_import.detectron2_shapes), zeros.

An optional part in brackets (`[--by density]`) is run both without and with it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TRAIN_CONFIG = "config/train/retinanet_r101_fpn.toml"
REPORT_FILES = {"metrics.json", "detections.json", "report.md", "pr_curve.png", "froc_curve.png"}
PATIENTS = 12  # enough for the study's split shares to leave a patient in val and test
DENSITIES = (1, 2, 3, 4)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def readme_commands() -> list[str]:
    """The command lines of the ```sh block under "## Training and evaluation" (comments dropped)."""
    section = README.read_text(encoding="utf-8").split("\n## Training and evaluation\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)\n```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    return [" ".join(shlex.split(line, comments=True)) for line in joined.splitlines() if line.strip()]


def variants(command: str) -> list[str]:
    """`a [b]` -> ["a", "a b"]: an optional part is run without and with it."""
    optional = re.search(r"\s*\[([^\]]+)\]", command)
    if not optional:
        return [command]
    return [command[: optional.start()] + command[optional.end():], command.replace(f"[{optional.group(1)}]",
                                                                                    optional.group(1))]


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "dicom-node", command
    result = subprocess.run([sys.executable, "-m", "dicom_node", *words[1:]], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result


def fake_download(folder: Path) -> None:
    from tests.lab.datasets.conftest import FakeCbis

    for part, prefix, first in (("train", "Mass-Training", 0), ("test", "Mass-Test", PATIENTS * 3 // 4)):
        cbis = FakeCbis(root=folder / "CBIS-DDSM")
        last = PATIENTS * 3 // 4 if part == "train" else PATIENTS
        for number in range(first, last):
            cbis.add_case(patient=f"P_{number:05d}", view=("CC", "MLO")[number % 2], prefix=prefix,
                          shape=(160, 120), density=DENSITIES[number % len(DENSITIES)],
                          lesions=[{"box": (20 + 4 * number, 30, 60 + 4 * number, 80)}])
        cbis.write_csv(folder / f"mass_case_description_{part}_set.csv")


def small_train_config(folder: Path) -> None:
    text = (ROOT / TRAIN_CONFIG).read_text(encoding="utf-8")
    changes = {
        # What the README says to edit: the split's files (paths relative to the config's folder).
        'train_json = "../../data/train/annotations.json"': 'train_json = "../../data/cbis/annotations_train.json"',
        'val_json = "../../data/val/annotations.json"': 'val_json = "../../data/cbis/annotations_val.json"',
        # Only for speed on CI (2 cores): a 2-iteration run of the same model.
        "checkpoint_every = 1000": "checkpoint_every = 1",
        "eval_every = 2000": "eval_every = 0",
        'device = "auto"': 'device = "cpu"\nthreads = 2',
        "num_workers = 4": "num_workers = 0",
        "input_size = 1333": "input_size = 128",
        "batch_size = 16": "batch_size = 2",
        "accumulation = 8": "accumulation = 1",
        "iterations = 24000": "iterations = 2",
        "lr_steps = [18000]": "lr_steps = [1]",
        "warmup_iters = 1000": "warmup_iters = 1",
        'architecture = "retinanet_r101_fpn"': 'architecture = "retinanet_r18_fpn"  # R101: too slow for CI',
    }
    for old, new in changes.items():
        assert text.count(old) == 1, f"{TRAIN_CONFIG} no longer has {old!r}: update this test"
        text = text.replace(old, new)
    target = folder / TRAIN_CONFIG
    target.parent.mkdir(parents=True)
    target.write_text(text, encoding="utf-8")
    assert tomllib.loads(text)["model"]["architecture"] == "retinanet_r18_fpn"


def detections_made_elsewhere(test_split: Path, target: Path) -> None:
    """Per lesion a box a little off and one on normal tissue, scores with ties."""
    coco = json.loads(test_split.read_text(encoding="utf-8"))
    results = []
    for n, ann in enumerate(coco["annotations"]):
        x, y, w, h = ann["bbox"]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + 2, y + 1, w, h], "score": 0.9 if n % 2 else 0.6})
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [5, 100, 20, 20], "score": 0.6})
    target.write_text(json.dumps(results), encoding="utf-8")


def detectron2_weights(target: Path) -> None:
    from tests.model.test_detectron2_import import detectron2_shapes

    # Zeros: drawing 55 million random numbers would cost seconds and prove nothing more here.
    torch.save({"model": {name: torch.zeros(shape) for name, shape in detectron2_shapes("retinanet_r101_fpn").items()}},
               target)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkout")
    fake_download(folder)
    (folder / "config").mkdir()
    shutil.copy(ROOT / "config" / "dicom-node.toml", folder / "config" / "dicom-node.toml")
    small_train_config(folder)
    return folder


def test_the_readme_block_is_what_this_test_runs():
    commands = readme_commands()
    verbs = [shlex.split(c)[1] for c in commands]
    assert verbs[:3] == ["convert-cbis-ddsm", "split", "train"] and verbs[-1] == "import-detectron2"
    evaluations = [c for c in commands if shlex.split(c)[1] == "evaluate"]
    assert any("--by" in c for c in evaluations)
    assert {"--weights demo", "--detections"} <= {w for c in evaluations for w in ("--weights demo", "--detections")
                                                  if w in c}


def test_readme_commands_run_as_written(checkout):
    written = []
    for command in readme_commands():
        words = shlex.split(command)
        if "--detections" in words:
            detections_made_elsewhere(checkout / "data/cbis/annotations_test.json",
                                      checkout / words[words.index("--detections") + 1])
        if words[1] == "import-detectron2":
            detectron2_weights(checkout / words[2])
        for variant in variants(command):
            run(variant, checkout)
            written.append(variant)
            words = shlex.split(variant)
            if words[1] == "evaluate":
                out = checkout / words[words.index("--out") + 1]
                produced = {p.name for p in out.iterdir()}
                assert produced >= REPORT_FILES, (variant, produced)
                metrics = json.loads((out / "metrics.json").read_text())
                assert metrics["summary"]["images"] >= 1 and metrics["skipped_images"] == []
                if "--by" in words:
                    field = words[words.index("--by") + 1]
                    assert {f"pr_curve_by_{field}.png", f"froc_curve_by_{field}.png"} <= produced
                    assert metrics["by"][field]
                if "--detections" in words:
                    assert metrics["summary"]["tp"] == metrics["summary"]["lesions"] > 0
            elif words[1] == "convert-cbis-ddsm":
                assert (checkout / words[words.index("--out") + 1]).is_file()
            elif words[1] == "split":
                for part in ("train", "val", "test"):
                    assert json.loads((checkout / f"data/cbis/annotations_{part}.json").read_text())["images"], part
            elif words[1] == "import-detectron2":
                from dicom_node.model.checkpoints import load_checkpoint

                assert load_checkpoint(checkout / words[3])["architecture"] == "retinanet_r101_fpn"
    assert len(written) == len(readme_commands()) + 1  # one [optional] part



def test_a_training_checkpoint_of_the_run_evaluates(checkout, monkeypatch, capsys):
    """As the comment on the evaluate line says: its architecture and input size are taken from it.

    Through the CLI's main() in this process: a sixth process start would cost 5 s of imports.
    """
    from dicom_node.cli import main

    checkpoint = checkout / "var/train/retinanet_r101_fpn/checkpoint_0000002.pt"
    if not checkpoint.is_file():
        pytest.skip("needs test_readme_commands_run_as_written's training run")
    monkeypatch.chdir(checkout)
    status = main(["evaluate", "--data", "data/cbis/annotations_test.json", "--out", "reports/state",
                   "--weights", str(checkpoint.relative_to(checkout))])
    assert status == 0, capsys.readouterr().err
    metrics = json.loads((checkout / "reports/state/metrics.json").read_text())
    assert metrics["label"] == ("retinanet_r18_fpn (training checkpoint checkpoint_0000002.pt (iteration 2))")
    assert {p.name for p in (checkout / "reports/state").iterdir()} >= REPORT_FILES
