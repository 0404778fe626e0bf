"""The whole node against a real Orthanc: receive, queue, analyse, report, deliver.

A real `dicom-node serve` process receives studies from dcmtk storescu (a modality) and
from Orthanc's own C-STORE (a PACS routing rule), and its GSPS must arrive in Orthanc,
pass dciodvfy, reference exactly the images sent, and carry boxes where the detector put
them. Placement is checked with the `fixed_boxes` test double behind the detector
interface; one test runs the real RetinaNet with the shipped demo weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests import synthetic
from tests.dciodvfy import assert_dciodvfy_clean

from .dcmtk import storescu
from .gsps_read import GSPS_SOP_CLASS, boxes_by_image, referenced_images, texts_by_image
from .node_process import NodeProcess, write_config
from .process import wait_for

pytestmark = pytest.mark.integration

SYNTAXES = ["explicit-little", "jpeg-ls-lossless", "jpeg2000-lossless", "rle"]
RELATIVE_BOX = (0.25, 0.30, 0.50, 0.55, 0.91)
GSPS_TIMEOUT_SECONDS = 180
PHI_VALUES = (
    synthetic.FAKE_PATIENT_NAME,
    synthetic.FAKE_PATIENT_ID,
    synthetic.FAKE_ACCESSION,
    synthetic.FAKE_BIRTH_DATE,
)


def fixed_boxes_file(folder: Path, boxes) -> Path:
    path = folder / "boxes.json"
    path.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": [list(b) for b in boxes]}))
    return path


def start_node(
    tmp_path: Path, orthanc, detector: dict, sections: dict | None = None, *, outputs: list[str] | None = None
) -> NodeProcess:
    """A node delivering to `orthanc` (`outputs`: what it sends there, the default when None);
    `sections` adds config sections (e.g. [queue])."""
    config = write_config(
        tmp_path / "node.toml",
        {
            **(sections or {}),
            "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data")},
            "security": {"allowed_callers": [{"ae_title": "STORESCU"}, {"ae_title": "ORTHANC"}]},
            "study": {"stable_seconds": 1},
            "workers": {"count": 1, "device": "cpu"},
            "detector": detector,
            "delivery": {"retry_backoff_seconds": 1, "max_backoff_seconds": 5},
        },
        destinations=[{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                       "port": orthanc.dicom_port, **({"outputs": outputs} if outputs else {})}],
    )
    node = NodeProcess(config).start()
    orthanc.client.put_modality("dicom_node", ae_title="DICOM_NODE", host="127.0.0.1", port=node.port)
    return node


@pytest.fixture
def node_factory(tmp_path, orthanc):
    """Start `dicom-node serve` processes; each must exit 0 on SIGTERM at teardown."""
    nodes = []

    def start(detector: dict) -> NodeProcess:
        folder = tmp_path / f"node-{len(nodes) + 1}"
        folder.mkdir()
        node = start_node(folder, orthanc, detector)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        status = node.stop()
        print(node.output())  # shown by pytest when the test failed
        assert status == 0, "dicom-node did not exit 0 on SIGTERM"


def gsps_for_study(orthanc, study_uid: str, sop_class_uid: str = GSPS_SOP_CLASS) -> list[pydicom.Dataset]:
    """The study's objects of `sop_class_uid` (default: GSPS) that Orthanc holds."""
    found = []
    for instance_id in orthanc.client.find_by_sop_class(sop_class_uid):
        ds = orthanc.client.instance_dataset(instance_id)
        if ds.StudyInstanceUID == study_uid:
            found.append(ds)
    return found


def wait_for_gsps(orthanc, study_uid: str, node: NodeProcess) -> pydicom.Dataset:
    def arrived():
        if node.process.poll() is not None:
            raise RuntimeError(f"dicom-node exited:\n{node.output()}")
        return gsps_for_study(orthanc, study_uid)

    found = wait_for(arrived, GSPS_TIMEOUT_SECONDS, description=f"a GSPS for study {study_uid}")
    assert len(found) == 1
    return found[0]


def check_valid(gsps: pydicom.Dataset, folder: Path) -> None:
    path = folder / f"{gsps.SOPInstanceUID}.dcm"
    gsps.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)


def expected_box(ds: pydicom.Dataset, relative=RELATIVE_BOX):
    columns, rows = int(ds.Columns), int(ds.Rows)
    x0, y0, x1, y1, _ = relative
    return (x0 * columns, y0 * rows, x1 * columns, y1 * rows)


def study_in_syntaxes(folder: Path, syntaxes: list[str]) -> list[Path]:
    """One study, one image per transfer syntax (as modalities of a site might send)."""
    sources = synthetic.study(folder / "source", n_images=len(syntaxes), rows=320, columns=240)
    paths = []
    for source, syntax in zip(sources, syntaxes, strict=True):
        target = folder / f"{source.stem}.{syntax}.dcm"
        if syntax.startswith("jpeg2000"):
            synthetic.compress_jpeg2000(source, target, lossless=syntax == "jpeg2000-lossless")
        else:
            synthetic.transcode(source, target, syntax)
        paths.append(target)
    return paths


def test_storescu_study_gets_a_gsps_with_boxes_where_the_detector_put_them(tmp_path, orthanc, node_factory):
    node = node_factory({"architecture": "fixed_boxes", "weights": str(fixed_boxes_file(tmp_path, [RELATIVE_BOX])),
                         "score_threshold": 0.5})
    files = study_in_syntaxes(tmp_path, SYNTAXES)
    sent = [pydicom.dcmread(f) for f in files]

    for path, syntax in zip(files, SYNTAXES, strict=True):
        # As a modality does: propose the file's own transfer syntax and send it as is.
        result = storescu([path], node.port, "DICOM_NODE", extra_args=[synthetic.STORESCU_PROPOSE[syntax]])
        assert result.ok, result.output

    gsps = wait_for_gsps(orthanc, str(sent[0].StudyInstanceUID), node)
    check_valid(gsps, tmp_path)
    assert referenced_images(gsps) == {str(ds.SOPInstanceUID) for ds in sent}
    # Filed with the study: patient and study identity copied from the source.
    assert gsps.PatientID == sent[0].PatientID
    assert gsps.StudyInstanceUID == sent[0].StudyInstanceUID
    assert gsps.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sent}
    boxes = boxes_by_image(gsps)
    for ds in sent:
        (box,) = boxes[str(ds.SOPInstanceUID)]
        assert box == pytest.approx(expected_box(ds), abs=1.0)
    texts = texts_by_image(gsps)
    assert all(any("mass 0.91" in t for t in texts[str(ds.SOPInstanceUID)]) for ds in sent)

    log = node.output()
    for value in PHI_VALUES:
        assert value not in log, f"PHI value {value!r} reached the node's log"
    assert len(node.events("job_done")) == 1
    wait_for(lambda: node.events("delivery_done"), 30, description="delivery_done logged")


def test_pacs_routing_path_and_nothing_found_is_reported(tmp_path, orthanc, node_factory):
    """Orthanc C-STOREs a study to the node; with no detection the GSPS says so."""
    node = node_factory({"architecture": "fixed_boxes", "weights": str(fixed_boxes_file(tmp_path, [])),
                         "score_threshold": 0.5})
    files = synthetic.study(tmp_path / "study", n_images=2)
    ids = [orthanc.client.upload(path) for path in files]
    orthanc.client.store_to_modality("dicom_node", ids)

    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    gsps = wait_for_gsps(orthanc, study_uid, node)
    check_valid(gsps, tmp_path)
    assert referenced_images(gsps) == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert boxes_by_image(gsps) == {}
    for texts in texts_by_image(gsps).values():
        assert any("analysed, no mass marked" in t for t in texts)


def test_two_nodes_analysing_one_study_send_the_pacs_two_results(tmp_path, orthanc, node_factory):
    """A test node beside production (or a rebuilt one, or a new model) makes its own objects:
    were their UIDs derived from the study alone, the PACS would keep the first one it got
    and silently drop the other node's result."""
    boxes = {"production": (0.10, 0.10, 0.30, 0.30, 0.90), "test": (0.50, 0.50, 0.80, 0.80, 0.90)}
    nodes = {}
    for name, box in boxes.items():
        (tmp_path / name).mkdir()
        nodes[name] = node_factory({"architecture": "fixed_boxes", "score_threshold": 0.5,
                                    "weights": str(fixed_boxes_file(tmp_path / name, [box]))})
    files = synthetic.study(tmp_path / "study", n_images=2)
    for node in nodes.values():
        result = storescu(files, node.port, "DICOM_NODE")
        assert result.ok, result.output

    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    both = wait_for(lambda: len(found := gsps_for_study(orthanc, study_uid)) == 2 and found,
                    GSPS_TIMEOUT_SECONDS, description="a GSPS from each node in the PACS")
    assert len({str(gsps.SOPInstanceUID) for gsps in both}) == 2
    assert len({str(gsps.SeriesInstanceUID) for gsps in both}) == 2
    image = pydicom.dcmread(files[0])
    placed = sorted(tuple(round(v, 1) for v in boxes_by_image(gsps)[str(image.SOPInstanceUID)][0]) for gsps in both)
    assert placed == sorted(tuple(round(v, 1) for v in expected_box(image, box)) for box in boxes.values())


def test_default_config_serve_path_runs_the_demo_retinanet(tmp_path, orthanc, node_factory):
    """The real RetinaNet (demo weights) marks a synthetic phantom mass."""
    from dicom_node.lab.phantom import phantom_dataset
    from dicom_node.model.checkpoints import demo_weights_path

    assert demo_weights_path().is_file(), "demo weights are not in the package"
    node = node_factory({"architecture": "retinanet_r18_fpn", "weights": "demo", "score_threshold": 0.5})
    # A phantom image with at least one mass (deterministic for the seed).
    for seed in range(20):
        ds, truth = phantom_dataset(seed=seed, rows=1664, columns=1280)
        if len(truth):
            break
    path = tmp_path / "phantom.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert storescu([path], node.port, "DICOM_NODE").ok

    gsps = wait_for_gsps(orthanc, str(ds.StudyInstanceUID), node)
    check_valid(gsps, tmp_path)
    assert "DEMO WEIGHTS" in gsps.SeriesDescription and "NOT FOR DIAGNOSIS" in gsps.SeriesDescription
    found = boxes_by_image(gsps).get(str(ds.SOPInstanceUID), [])
    assert found, f"the demo model marked nothing on a phantom with {len(truth)} mass(es)"

    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    best = max(iou(f, tuple(t)) for f in found for t in truth)
    assert best >= 0.5, f"best IoU {best:.2f} between marks {found} and masses {truth}"


def test_offline_analyze_writes_a_valid_gsps(tmp_path):
    boxes = fixed_boxes_file(tmp_path, [RELATIVE_BOX])
    config = write_config(tmp_path / "node.toml", {"detector": {"architecture": "fixed_boxes",
                                                                 "weights": str(boxes)}})
    files = synthetic.study(tmp_path / "study", n_images=2)
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "analyze", *map(str, files), "--out", str(tmp_path / "out"),
         "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (written,) = (tmp_path / "out").glob("*.dcm")
    assert_dciodvfy_clean(written)
    gsps = pydicom.dcmread(written)
    assert referenced_images(gsps) == {pydicom.dcmread(f).SOPInstanceUID for f in files}



def test_offline_analyze_writes_every_output_asked_for_each_valid(tmp_path):
    boxes = fixed_boxes_file(tmp_path, [RELATIVE_BOX])
    config = write_config(tmp_path / "node.toml", {"detector": {"architecture": "fixed_boxes",
                                                                 "weights": str(boxes)}})
    files = synthetic.study(tmp_path / "study", n_images=2)
    images = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "analyze", *map(str, files), "--out", str(tmp_path / "out"),
         "--outputs", "gsps,sr,sc", "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "out").glob("*.dcm"))
    results = [pydicom.dcmread(path) for path in written]
    kinds = sorted(str(ds.SOPClassUID.name) for ds in results)
    assert kinds == sorted(["Grayscale Softcopy Presentation State Storage", "Comprehensive 3D SR Storage",
                            "Secondary Capture Image Storage", "Secondary Capture Image Storage"]), kinds
    for path in written:
        assert_dciodvfy_clean(path)
    # One analysis: every object belongs to the study, and the captures are one per image.
    assert {str(ds.StudyInstanceUID) for ds in results} == {str(pydicom.dcmread(files[0]).StudyInstanceUID)}
    captured = {str(item.ReferencedSOPInstanceUID) for ds in results if "SourceImageSequence" in ds
                for item in ds.SourceImageSequence}
    assert captured == {str(uid) for uid in images}
    assert len(result.stdout.splitlines()) == 4


def test_offline_analyze_names_the_outputs_it_knows_when_given_another(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "analyze", "x.dcm", "--out", str(tmp_path / "out"),
         "--outputs", "gsps,pdf"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--outputs: 'gsps,pdf': give one or more of gsps, sr, sc" in result.stderr
    assert "Traceback" not in result.stderr