"""Faults inside the node, with a real `dicom-node serve`: a worker process killed in the
middle of a job, corrupt pixel data, and files lost or left behind between two runs.

Each fault must cost only the job it touches: the worker pool and the next study go on.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid

from dicom_node.store import InstanceStore
from tests import synthetic

from .dcmtk import storescu
from .fault_node import NODE_AE, FaultNode
from .process import temp_files_left

pytestmark = pytest.mark.integration

J2K = [synthetic.STORESCU_PROPOSE["jpeg2000-lossless"]]


def send(node: FaultNode, files: list[Path], *, extra_args=()) -> None:
    result = storescu(files, node.port, NODE_AE, extra_args=list(extra_args))
    assert result.ok, result.output


def study_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def slow_study(folder: Path, *, n_images: int = 4) -> list[Path]:
    """JPEG 2000 images large enough that analysing them takes seconds (the decode).

    One image is encoded and copied under new SOP Instance UIDs: encoding is as slow
    as decoding, and only the node's side needs to take time.
    """
    folder.mkdir(parents=True)
    source = synthetic.write(synthetic.mammogram(rows=2048, columns=1664), folder / "source.dcm")
    encoded = pydicom.dcmread(synthetic.compress_jpeg2000(source, folder / "encoded.dcm"))
    paths = []
    for index in range(n_images):
        encoded.SOPInstanceUID = encoded.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        encoded.InstanceNumber = index + 1
        paths.append(synthetic.write(encoded, folder / f"{index}.dcm"))
    return paths


def test_killed_worker_fails_only_its_job_which_is_retried_by_the_replacement(tmp_path, fault_nodes):
    # A long lease: the retry below must come from the pool noticing the death, not from
    # the lease expiring.
    node = fault_nodes(workers={"lease_seconds": 600, "retry_backoff_seconds": 1})
    (ready,) = node.process.events("worker_ready")
    files = slow_study(tmp_path / "slow")
    study = study_uid_of(files[0])
    waiting = synthetic.study(tmp_path / "waiting", n_images=1)

    send(node, files, extra_args=J2K)
    (started,) = node.wait_for_event("job_started", study_uid=study)
    # Hold the database's write lock: the worker cannot finish the job while we look.
    database = sqlite3.connect(node.config.parent / "data" / "dicom-node.sqlite", timeout=30,
                               isolation_level=None)
    try:
        database.execute("BEGIN IMMEDIATE")
        held = database.execute("SELECT state, worker, attempts FROM jobs WHERE id = ?",
                                (started["job_id"],)).fetchone()
        state, worker, attempts = held
        assert (state, attempts) == ("running", 1), "the analysis ended before the kill: use a larger study"
        assert worker.endswith("/worker-1")  # "<host>-<node pid>/worker-1": unique across hosts
        os.kill(ready["pid"], signal.SIGKILL)  # as the kernel's OOM killer would
    finally:
        database.execute("ROLLBACK")
        database.close()
    send(node, waiting)  # arrives while the pool is one worker short

    (died,) = node.wait_for_event("worker_died", worker="worker-1")
    assert died["cause"] == "killed by SIGKILL"
    (failed,) = node.wait_for_event("job_worker_died", job_id=started["job_id"])
    assert failed["state"] == "pending"
    replacement = node.wait_for_event("worker_ready", count=2)[1]
    assert replacement["pid"] != ready["pid"]

    job = node.wait_for_job(study, "done")
    assert (job.id, job.attempts) == (started["job_id"], 2)
    assert job.detections == len(files)
    other = node.wait_for_job(study_uid_of(waiting[0]), "done")
    assert other.attempts == 1  # never held by the dead worker, so never failed
    assert len(node.process.events("worker_died")) == 1

    # An idle worker killed while it waits for work: replaced as well, and the node still
    # stops cleanly (a multiprocessing.Event would hang the shutdown on the dead waiter).
    os.kill(replacement["pid"], signal.SIGKILL)
    assert node.wait_for_event("worker_died", count=2)[1]["restart_in_seconds"] in (0.0, 2.0)
    third = node.wait_for_event("worker_ready", count=3)[2]
    assert third["pid"] not in {ready["pid"], replacement["pid"]}
    assert node.process.stop(timeout=60) == 0


def corrupt_study(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """Studies that store fine but cannot be analysed: (file, storescu options) by name.

    The SCP checks the structure of pixel data, never its content (a frame must end with
    its codestream's end marker); these end with one, and hold random bytes before it.
    """
    studies = {}
    for seed, (name, syntax, syntax_name) in enumerate(
        (("garbage_j2k", JPEG2000Lossless, "jpeg2000-lossless"), ("garbage_jpeg_ls", JPEGLSLossless, "jpeg-ls-lossless"))
    ):
        garbage = synthetic.mammogram(rows=256, columns=192, seed=seed)
        garbage.file_meta.TransferSyntaxUID = syntax
        garbage.PixelData = encapsulate([os.urandom(4000) + b"\xff\xd9"])  # not a codestream
        options = [synthetic.STORESCU_PROPOSE[syntax_name]]
        studies[name] = (synthetic.write(garbage, folder / f"{name}.dcm"), options)
    return studies


def test_corrupt_pixel_data_fails_that_job_with_the_reason_and_the_worker_goes_on(tmp_path, fault_nodes):
    node = fault_nodes()
    bad = corrupt_study(tmp_path / "bad")
    good = synthetic.study(tmp_path / "good", n_images=2)

    for path, options in bad.values():
        send(node, [path], extra_args=options)
    send(node, good)

    for name, (path, _) in bad.items():
        job = node.wait_for_job(study_uid_of(path), "failed")
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert job.attempts == 1, f"{name}: a corrupt image is not retried"
        assert f"cannot decode pixel data of {sop}" in job.error, job.error
    done = node.wait_for_job(study_uid_of(good[0]), "done")
    assert done.detections == 2

    listing = node.cli("jobs", "list", "--state", "failed")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count("error: cannot decode pixel data of") == 2, listing.stdout
    # One worker the whole time: the corrupt studies never took it down.
    assert len(node.process.events("worker_ready")) == 1
    assert node.process.events("worker_died") == []


def test_restart_reconciles_lost_files_and_files_without_rows(tmp_path, fault_nodes):
    node = fault_nodes("node")
    study = synthetic.study(tmp_path / "study", n_images=2)
    send(node, study)
    node.wait_for_job(study_uid_of(study[0]), "done")
    assert node.stop() == 0

    # While the node is down: an instance file is lost, a write was cut short in tmp/,
    # and a crash came between a rename and its commit (a complete file with no row).
    store = InstanceStore(node.config.parent / "data")
    (lost,) = [i for i in node.queue.study_instances(study_uid_of(study[0]))
               if i.sop_instance_uid == pydicom.dcmread(study[1]).SOPInstanceUID]
    Path(lost.path).unlink()
    (store.tmp_dir / "tmpcut.dcm").write_bytes(b"\0" * 1000)
    orphan_ds = synthetic.mammogram(seed=5)
    orphan_ds.file_meta.SendingApplicationEntityTitle = "STORESCU"
    orphan = synthetic.write(orphan_ds, tmp_path / "orphan.dcm")
    store.persist_instance(orphan, study_uid=orphan_ds.StudyInstanceUID, series_uid=orphan_ds.SeriesInstanceUID,
                           sop_instance_uid=orphan_ds.SOPInstanceUID)

    node = fault_nodes("node")  # the same config and data_dir
    (starting,) = node.process.events("node_starting")
    assert (starting["orphan_temp_files_removed"], starting["instances_missing"],
            starting["instances_recorded"]) == (1, 1, 1)
    (missing,) = node.process.events("instances_missing")
    assert missing["sop_instance_uids"] == [lost.sop_instance_uid]
    assert not temp_files_left(store.tmp_dir.parent)
    assert not (store.tmp_dir / "tmpcut.dcm").exists()

    status = node.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["instances"] == {"total": 3, "missing": 1}
    assert [m["sop_instance_uid"] for m in report["missing_instances"]] == [lost.sop_instance_uid]
    # The recorded file's study is analysed like any received one.
    assert node.wait_for_job(str(orphan_ds.StudyInstanceUID), "done").detections == 1

    # New images for the study with the lost file: its next analysis fails, naming the file.
    more = synthetic.mammogram(study_uid=study_uid_of(study[0]), seed=9)
    send(node, [synthetic.write(more, tmp_path / "more.dcm")])
    job = node.wait_for_job(study_uid_of(study[0]), "failed", generation=2)
    assert f"1 of 3 stored instance file(s) of the study are missing (first: {lost.sop_instance_uid}" in job.error
    listing = node.cli("jobs", "list")
    assert "are missing" in listing.stdout, listing.stdout
