"""GET /metrics of a real `dicom-node serve` counts exactly what was sent to it.

dcmtk storescu sends a study of known size and one image the node refuses, echoscu asks
for an association under a wrong AE title, and the GSPS is delivered to a real Orthanc;
the scrape must show those numbers and nothing else. The model forward time and the job
durations are observed in the worker process: seeing them in the main process's scrape
proves that the counters of every process are added up. The Grafana dashboard queries
only metrics the scrape shows.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification

from tests import synthetic

from .dcmtk import echoscu, storescu
from .node_process import NodeProcess, write_config
from .process import free_ports, wait_for
from .test_node_roundtrip import PHI_VALUES, fixed_boxes_file, wait_for_gsps

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "dicom-node.json"
STUDY_IMAGES = 3
HISTOGRAMS = (
    "dicom_node_instance_store_seconds",
    "dicom_node_job_stable_to_claimed_seconds",
    "dicom_node_job_claimed_to_done_seconds",
    "dicom_node_model_forward_seconds",
    "dicom_node_job_done_to_delivered_seconds",
)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def data_set_bytes(path: Path) -> int:
    """What a sender puts on the wire for this file: the data set, without preamble and File Meta."""
    _, offset = split_dataset(path)
    return path.stat().st_size - offset


def not_a_mammogram(folder: Path) -> Path:
    """A CT image under the Digital Mammography SOP class: the node refuses it (0x0122)."""
    ds = synthetic.mammogram()
    ds.Modality = "CT"
    return synthetic.write(ds, folder / "ct.dcm")


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\bdicom_node_[a-z_]+", expr)}


def associations_open(port: int) -> float:
    return samples(scrape(port))["dicom_node_associations_open"][()]


def test_metrics_count_what_was_sent_in_every_process(tmp_path, orthanc):
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data")},
            "study": {"stable_seconds": 1},
            "workers": {"count": 1, "device": "cpu"},
            "detector": {"architecture": "fixed_boxes", "score_threshold": 0.5,
                         "weights": str(fixed_boxes_file(tmp_path, [(0.2, 0.2, 0.4, 0.4, 0.9)]))},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        },
        destinations=[{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
    )  # fmt: skip
    node = NodeProcess(config).start()
    try:
        [listening] = node.events("metrics_listening")
        port = int(listening["port"])
        study = synthetic.study(tmp_path / "study", n_images=STUDY_IMAGES)
        refused = not_a_mammogram(tmp_path)

        sent = storescu(study, node.port, "DICOM_NODE", extra_args=["--propose-little"])
        assert sent.ok, sent.output
        answer = storescu([refused], node.port, "DICOM_NODE", extra_args=["--propose-little"])
        assert not answer.ok and "Refused: SOPClassNotSupported" in answer.output, answer.output
        rejected = echoscu(node.port, "NOT_THE_NODE")
        assert not rejected.ok and "Called AE Title Not Recognized" in rejected.output, rejected.output

        wait_for_gsps(orthanc, str(pydicom.dcmread(study[0]).StudyInstanceUID), node)
        wait_for(lambda: node.events("delivery_done"), 60, description="delivery_done logged")

        # An association open is seen while it is open.
        ae = AE(ae_title="WATCHER")
        ae.add_requested_context(Verification)
        association = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
        assert association.is_established
        try:
            assert associations_open(port) == 1
        finally:
            association.release()
            ae.shutdown()
        wait_for(lambda: associations_open(port) == 0, 30, description="the association counted as ended")

        text = scrape(port)
    finally:
        status = node.stop()
    assert status == 0, node.output()

    for value in PHI_VALUES:
        assert value not in text, f"PHI value {value!r} in /metrics"
    found = samples(text)

    def value(name: str, **labels) -> float:
        return found[name][tuple(sorted(labels.items()))]

    # The SCP (main process): exactly what was sent.
    assert value("dicom_node_instances_received_total") == STUDY_IMAGES
    assert value("dicom_node_instance_store_seconds_count") == STUDY_IMAGES  # Success only
    assert value("dicom_node_instance_store_seconds_sum") > 0
    assert value("dicom_node_received_bytes_total") == sum(data_set_bytes(p) for p in [*study, refused])
    refusals = {dict(labels)["status"]: count for labels, count in found["dicom_node_c_store_refusals_total"].items()}
    assert refusals == {"SOP_CLASS_NOT_SUPPORTED": 1, "OUT_OF_RESOURCES": 0, "CANNOT_UNDERSTAND": 0,
                        "DATA_SET_DOES_NOT_MATCH_SOP_CLASS": 0, "PROCESSING_FAILURE": 0}  # fmt: skip
    assert value("dicom_node_associations_refused_total", reason="CALLED_AE_TITLE_NOT_RECOGNIZED") == 1
    assert sum(found["dicom_node_associations_refused_total"].values()) == 1

    # The queue, read at scrape time: one job, done; one delivery, done.
    assert value("dicom_node_queue_jobs", state="done") == 1
    assert value("dicom_node_queue_deliveries", state="done") == 1
    assert sum(found["dicom_node_queue_jobs"].values()) == 1
    assert sum(found["dicom_node_queue_deliveries"].values()) == 1
    assert value("dicom_node_oldest_pending_job_age_seconds") == 0

    # The worker process: one forward per image, one job through each stage.
    assert value("dicom_node_model_forward_seconds_count") == STUDY_IMAGES
    assert value("dicom_node_job_stable_to_claimed_seconds_count") == 1
    assert value("dicom_node_job_claimed_to_done_seconds_count") == 1
    assert value("dicom_node_job_done_to_delivered_seconds_count", destination="orthanc") == 1
    assert sum(found["dicom_node_job_failures_total"].values()) == 0
    assert sum(found["dicom_node_delivery_failures_total"].values()) == 0
    for histogram in HISTOGRAMS:
        for labels, count in found[f"{histogram}_count"].items():
            buckets = sorted(
                ((float(dict(bucket)["le"]), n) for bucket, n in found[f"{histogram}_bucket"].items()
                 if {k: v for k, v in bucket if k != "le"} == dict(labels)),
            )  # fmt: skip
            counts = [n for _, n in buckets]
            assert counts == sorted(counts) and counts[-1] == count, (histogram, buckets)
            assert found[f"{histogram}_sum"][labels] >= 0

    # Every metric the Grafana dashboard queries is there.
    assert dashboard_metric_names() - set(found) == set()


def test_a_worker_host_serves_its_own_metrics(tmp_path, postgres_url):
    """`dicom-node worker` on its own host: its /metrics counts its model forwards and job
    durations (a receiver's scrape cannot see another host's processes)."""
    data = tmp_path / "data"
    shared = {"queue": {"url": postgres_url}, "study": {"stable_seconds": 1},
              "detector": {"architecture": "fixed_boxes", "weights": str(fixed_boxes_file(tmp_path, []))}}
    node = {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 0, "data_dir": str(data)}
    receiver = NodeProcess(write_config(tmp_path / "receiver.toml", {
        **shared, "node": node, "workers": {"count": 0}})).start()
    worker_port = free_ports(1)[0]
    worker = NodeProcess(write_config(tmp_path / "worker.toml", {
        **shared, "node": node, "workers": {"count": 1, "device": "cpu"},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": worker_port}}), "worker").start()
    try:
        study = synthetic.study(tmp_path / "study", n_images=2)
        assert storescu(study, receiver.port, "DICOM_NODE").ok
        wait_for(lambda: worker.events("job_done"), 60, description="the worker's job_done")
        found = wait_for(lambda: (s := samples(scrape(worker_port)))
                         .get("dicom_node_job_claimed_to_done_seconds_count", {}).get(()) and s,
                         30, description="the job in the worker's metrics")
        assert found["dicom_node_model_forward_seconds_count"][()] >= 1
        assert found["dicom_node_job_claimed_to_done_seconds_count"][()] == 1
        assert found["dicom_node_job_stable_to_claimed_seconds_count"][()] == 1
        assert found["dicom_node_instances_received_total"][()] == 0  # received by the other process
    finally:
        worker.stop()
        receiver.stop()
