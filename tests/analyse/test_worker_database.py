"""The worker against its database: result UIDs per analysis, and outages while it records.

Real SQLite files, a real full filesystem (tmpfs), real synthetic studies, and the
fixed-boxes test detector behind the detector interface.

- The GSPS UIDs come from the job's stored analysis key and the model: a retried job
  rebuilds the same object; another installation, or another model, makes another one.
- A database outage when the worker records its result does not lose the job: the
  worker waits it out, or, told to stop, leaves the job leased to be claimed again.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest

from dicom_node.analyse.worker import process_job, report_study
from dicom_node.config import Config, parse_config
from dicom_node.model.detector import load_detector
from dicom_node.queue import Queue, State
from dicom_node.queue.outage import Outage
from dicom_node.store import InstanceStore
from tests import synthetic
from tests.integration.fault_node import fixed_boxes
from tests.integration.process import wait_for

LEASE = 300.0


def node_config(folder: Path, boxes=((0.25, 0.30, 0.50, 0.55, 0.91),), outputs=("gsps",)) -> Config:
    folder.mkdir(parents=True, exist_ok=True)
    return parse_config(
        {
            "node": {"data_dir": str(folder / "data")},
            "security": {"allow_any_caller": True},
            "detector": {"architecture": "fixed_boxes", "weights": str(fixed_boxes(folder, boxes))},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                              "outputs": list(outputs)}],
        },
        base_dir=folder,
    )


class Installation:
    """One node's data: its store, its queue (optionally on another filesystem), its detector."""

    def __init__(self, folder: Path, *, database: Path | None = None, boxes=((0.25, 0.30, 0.50, 0.55, 0.91),),
                 outputs=("gsps",)):
        self.config = node_config(folder, boxes, outputs)
        self.store = InstanceStore(self.config.node.data_dir, fsync=False)
        self.queue = Queue(f"sqlite:///{database or self.config.node.data_dir / 'dicom-node.sqlite'}")
        self.queue.migrate()
        self.detector = load_detector(self.config.detector)

    def receive(self, files: list[Path]) -> str:
        """Store and record a study's files as the SCP does; returns the Study Instance UID."""
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            stored = self.store.persist_instance(
                path, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID,
            )
            self.queue.record_instance(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID, path=str(stored), transfer_syntax=ds.file_meta.TransferSyntaxUID,
                calling_ae="MODALITY", size_bytes=stored.stat().st_size,
            )
        return str(ds.StudyInstanceUID)

    def claim(self, worker: str = "worker-1"):
        self.queue.enqueue_ready_studies(stable_seconds=0)
        job = self.queue.claim_next_job(worker=worker, lease_seconds=LEASE)
        assert job is not None
        return job

    def process(self, job, worker: str = "worker-1", **kwargs) -> None:
        process_job(job, queue=self.queue, store=self.store, detector=self.detector, config=self.config,
                    worker=worker, **kwargs)

    def results(self) -> list[str]:
        return sorted(p.name for p in self.store.results_dir.glob("*.dcm"))

    def close(self) -> None:
        self.queue.close()


@pytest.fixture
def installations(tmp_path):
    made: list[Installation] = []

    def make(name: str, **kwargs) -> Installation:
        made.append(Installation(tmp_path / name, **kwargs))
        return made[-1]

    yield make
    for installation in made:
        installation.close()


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> list[Path]:
    return synthetic.study(tmp_path_factory.mktemp("study"), n_images=2, rows=256, columns=192)


def test_a_retried_job_rebuilds_the_same_gsps_uid(installations, study_files):
    node = installations("node")
    node.receive(study_files)
    first = node.claim("worker-1")
    # worker-1 "crashes" after its claim; at the restart its lease is ended and the job is
    # claimed again (attempt 2) and finished by worker-2.
    node.queue.expire_leases()
    second = node.claim("worker-2")
    assert (second.id, second.attempts) == (first.id, 2)
    node.process(second, "worker-2")
    # The crashed attempt, had it run to the end, wrote the same object under the same name.
    node.process(first, "worker-1")

    job = node.queue.get_job(first.id)
    assert job.state == State.DONE
    assert node.results() == [f"{job.result_sop_instance_uid}.dcm"]
    gsps = pydicom.dcmread(node.store.results_dir / node.results()[0])
    assert gsps.SOPInstanceUID == job.result_sop_instance_uid


def test_two_installations_analysing_the_same_study_make_different_uids(installations, study_files):
    production, test_node = installations("production"), installations("test-node")
    uids = []
    for node in (production, test_node):
        node.receive(study_files)
        job = node.claim()
        assert job.generation == 1 and job.id == 1  # same study, same generation, same row id
        node.process(job)
        uids.append(node.queue.get_job(job.id).result_sop_instance_uid)
    assert uids[0] != uids[1]


def test_another_model_makes_another_uid_for_the_same_analysis(installations, study_files):
    node = installations("node")
    other_model = installations("other-model", boxes=((0.1, 0.1, 0.2, 0.2, 0.8),))
    node.receive(study_files)
    job = node.claim()
    paths = [str(i.path) for i in node.queue.study_instances(job.study_uid)]

    gsps, _ = report_study(paths, node.detector, node.config, analysis_key=job.analysis_key)
    again, _ = report_study(paths, node.detector, node.config, analysis_key=job.analysis_key)
    other, _ = report_study(paths, other_model.detector, other_model.config, analysis_key=job.analysis_key)

    assert gsps.SOPInstanceUID == again.SOPInstanceUID
    assert gsps.SeriesInstanceUID == again.SeriesInstanceUID
    assert other.SOPInstanceUID != gsps.SOPInstanceUID
    assert other.SeriesInstanceUID != gsps.SeriesInstanceUID


def test_a_full_disk_when_the_job_completes_is_waited_out_and_the_job_completes(
    tmp_path, installations, study_files, small_filesystem
):
    disk = small_filesystem(tmp_path / "disk", size="4m")
    node = installations("node", database=disk.path / "dicom-node.sqlite")
    node.receive(study_files)
    job = node.claim()
    disk.fill()
    outage = Outage("worker", first_wait=0.05, max_wait=0.2)
    worker = threading.Thread(target=node.process, args=(job,), kwargs={"outage": outage, "stop": threading.Event()})
    worker.start()
    try:
        wait_for(lambda: outage.ongoing and node.results(), 60, description="complete_job failing on the full disk")
        held = node.queue.get_job(job.id)
        assert (held.state, held.worker) == (State.RUNNING, "worker-1")  # not lost, still ours
    finally:
        disk.free()
        worker.join(60)
    assert not worker.is_alive()
    done = node.queue.get_job(job.id)
    assert done.state == State.DONE and done.attempts == 1
    assert node.results() == [f"{done.result_sop_instance_uid}.dcm"]
    assert [d.destination for d in done.deliveries] == ["pacs"]


def test_a_worker_stopped_during_an_outage_leaves_its_job_leased_and_the_retry_gives_the_same_uid(
    tmp_path, installations, study_files, small_filesystem
):
    disk = small_filesystem(tmp_path / "disk", size="4m")
    node = installations("node", database=disk.path / "dicom-node.sqlite")
    node.receive(study_files)
    job = node.claim()
    disk.fill()
    stop = threading.Event()
    outage = Outage("worker", first_wait=0.05, max_wait=0.2)
    worker = threading.Thread(target=node.process, args=(job,), kwargs={"outage": outage, "stop": stop})
    worker.start()
    wait_for(lambda: outage.ongoing, 60, description="complete_job failing on the full disk")
    stop.set()  # SIGTERM to the node while the disk is full
    worker.join(60)
    assert not worker.is_alive()
    (written,) = node.results()
    disk.free()

    assert node.queue.get_job(job.id).state == State.RUNNING  # leased, not lost
    node.queue.expire_leases()  # the next start
    retry = node.claim("worker-1")
    assert (retry.id, retry.attempts) == (job.id, 2)
    node.process(retry)

    done = node.queue.get_job(job.id)
    assert done.state == State.DONE
    assert node.results() == [written] == [f"{done.result_sop_instance_uid}.dcm"]
