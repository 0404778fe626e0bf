"""The job database in trouble, with a real `dicom-node serve` and real dcmtk peers.

- another process holds SQLite's write lock: a C-STORE is answered 0xA700 (Refused: Out
  of Resources, the sender retries) well within the network timeout, and stored once
  the lock is gone;
- the disk under the database fills up (a real tmpfs): commits fail; the SCP answers
  0xA700, the scheduler and the worker log the outage once and carry on when there is
  space again, and every study is analysed and delivered;
- the database file is corrupt: `serve` and `status` stop with one line naming the file
  and the way out (exit status 2), no traceback;
- the database is deleted and the node started again: delivered studies are not analysed
  or sent again (the delivered-results ledger), until `jobs rerun --study` asks for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests import synthetic
from tests.sqlite_faults import WriteLock

from .dcmtk import storescu
from .fault_node import NODE_AE, FaultNode, write_node_config
from .gsps_read import GSPS_SOP_CLASS, referenced_images
from .process import wait_for

pytestmark = pytest.mark.integration

OUT_OF_RESOURCES = "Refused: OutOfResources"
NETWORK_TIMEOUT_SECONDS = 20
PHI_VALUES = (synthetic.FAKE_PATIENT_NAME, synthetic.FAKE_PATIENT_ID, synthetic.FAKE_ACCESSION,
              synthetic.FAKE_BIRTH_DATE)


def study_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def send(node: FaultNode, files: list[Path]):
    """storescu as a modality configured with our network timeout (it gives up after it)."""
    return storescu(files, node.port, NODE_AE,
                    extra_args=["--dimse-timeout", str(NETWORK_TIMEOUT_SECONDS)])


def database(node: FaultNode) -> Path:
    return node.config.parent / "data" / "dicom-node.sqlite"


def pacs(port: int) -> dict:
    return {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}


def assert_no_traceback(node: FaultNode) -> None:
    output = node.process.output()
    assert "Traceback" not in output, output


@pytest.mark.slow
def test_a_held_write_lock_is_answered_out_of_resources_within_the_network_timeout(tmp_path, fault_nodes):
    node = fault_nodes(node={"network_timeout_seconds": NETWORK_TIMEOUT_SECONDS})
    files = synthetic.study(tmp_path / "study", n_images=1)

    with WriteLock(database(node)):
        started = time.monotonic()
        refused = send(node, files)
        answered_after = time.monotonic() - started

    assert not refused.ok and OUT_OF_RESOURCES in refused.output, refused.output
    # The SCP waits a quarter of the network timeout for the lock (at most 5 s), then answers.
    assert answered_after < NETWORK_TIMEOUT_SECONDS / 2, answered_after
    (failed,) = node.process.events("instance_store_failed")
    assert failed["status"] == "0xA700"
    assert failed["error"] == f"job database {database(node)} unavailable: locked by another process"

    stored = send(node, files)  # the sender's retry, once the lock is gone
    assert stored.ok, stored.output
    assert node.wait_for_job(study_uid_of(files[0]), "done").detections == 1
    assert_no_traceback(node)
    print(f"0xA700 answered {answered_after:.2f} s after the C-STORE was sent")


@pytest.mark.slow
def test_a_full_disk_under_the_database_is_ridden_out_and_everything_is_delivered(
    tmp_path, fault_nodes, small_filesystem, storescp_factory
):
    # The database alone on a small filesystem (SQLite follows the link and keeps its -wal
    # and -shm files beside the target); images and results stay on the test's disk, so
    # that the free-space watermark, which looks at data_dir, lets the C-STORE through to
    # the commit that fails.
    disk = small_filesystem(tmp_path / "database-disk", size="16m")
    data = tmp_path / "node" / "data"
    data.mkdir(parents=True)
    (data / "dicom-node.sqlite").symlink_to(disk.path / "dicom-node.sqlite")
    receiver = storescp_factory(ae_title="PACS")
    node = fault_nodes("node", destinations=[pacs(receiver.port)], study={"stable_seconds": 3},
                       node={"network_timeout_seconds": NETWORK_TIMEOUT_SECONDS})
    (ready,) = node.process.events("worker_ready")
    waiting, arriving, refused_study = (synthetic.study(tmp_path / name, n_images=1)
                                        for name in ("waiting", "arriving", "refused"))

    # A job pending while the worker is frozen; a study stored but not yet enqueued.
    os.kill(ready["pid"], signal.SIGSTOP)
    try:
        assert send(node, waiting).ok
        node.wait_for_job(study_uid_of(waiting[0]), "pending")
        assert send(node, arriving).ok
        disk.fill()  # well before `arriving` is quiet for study.stable_seconds

        started = time.monotonic()
        refused = send(node, refused_study)
        answered_after = time.monotonic() - started
        assert not refused.ok and OUT_OF_RESOURCES in refused.output, refused.output
        assert answered_after < NETWORK_TIMEOUT_SECONDS / 2
        (failed,) = node.process.events("instance_store_failed")
        assert failed["error"].endswith("unavailable: disk full")
    finally:
        os.kill(ready["pid"], signal.SIGCONT)

    node.wait_for_event("database_unavailable", component="worker")  # its claim cannot commit
    node.wait_for_event("database_unavailable", component="scheduler")  # `arriving` cannot be enqueued
    # The outage lasts a while: each loop tries again (after 0.5 s, 1 s, ...) and fails
    # again, and must not log each try. Nothing to wait on but time itself here.
    time.sleep(2)
    disk.free()

    assert send(node, refused_study).ok  # the sender's retry
    for files in (waiting, arriving, refused_study):
        job = node.wait_for_job(study_uid_of(files[0]), "done")
        (delivery,) = job.deliveries
        assert delivery.destination == "pacs"
    received = receiver.wait_for_files(3, timeout=120)
    assert sorted(study_uid_of(f) for f in received) == sorted(study_uid_of(f[0]) for f in
                                                               (waiting, arriving, refused_study))
    # One event per loop and outage, however many polls failed; the same worker process.
    for component in ("worker", "scheduler"):
        (unavailable,) = [e for e in node.process.events("database_unavailable") if e["component"] == component]
        assert unavailable["kind"] == "disk full"
        (available,) = node.wait_for_event("database_available", component=component)
        assert available["failed_tries"] >= 2, available
    assert node.process.events("worker_died") == []
    assert len(node.process.events("worker_ready")) == 1
    assert_no_traceback(node)


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dicom_node", args[0], "--config", str(config), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_corrupt_database_stops_serve_and_status_with_one_line_and_exit_status_2(tmp_path):
    config = write_node_config(tmp_path / "node", security={"allowed_callers": [{"ae_title": "STORESCU"}]})
    path = config.parent / "data" / "dicom-node.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage, not an SQLite file\n" * 1000)

    for command in (["serve"], ["status"], ["jobs", "list"]):
        result = run_cli(config, *command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
        # serve's failure is a JSON event (every line of its stderr is), the CLI's a plain line.
        errors = [json.loads(line)["error"] if line.startswith("{") else line
                  for line in result.stderr.splitlines()
                  if not line.startswith("{") or json.loads(line)["event"] == "command_failed"]
        assert errors == [
            f"config error: node.data_dir: {path} is not a readable SQLite database (not a database); "
            "move it away (with its -wal and -shm files) and start again: stored instances are recorded "
            f"again from {path.parent / 'instances'} and delivered studies are not sent again"
        ], result.stderr


@pytest.mark.slow
def test_a_rebuilt_database_does_not_send_delivered_studies_again_until_rerun_asks(
    tmp_path, fault_nodes, storescp_factory
):
    receiver = storescp_factory(ae_title="PACS")
    node = fault_nodes("node", destinations=[pacs(receiver.port)])
    files = synthetic.study(tmp_path / "study", n_images=2)
    study = study_uid_of(files[0])
    assert send(node, files).ok
    node.wait_for_job(study, "done")
    wait_for(lambda: node.job_of(study).deliveries[0].state == "done", 120, description="the delivery")
    (first,) = receiver.wait_for_files(1, timeout=120)
    first_uid = pydicom.dcmread(first).SOPInstanceUID
    ledger = node.config.parent / "data" / "results" / "delivered" / f"{study}.json"
    entry = json.loads(ledger.read_text())
    assert [r["result_sop_instance_uid"] for r in entry["results"]] == [first_uid]
    assert not any(value in ledger.read_text() for value in PHI_VALUES)
    assert node.stop() == 0

    # The operator's fix for a corrupt database: move it away and start again.
    for path in database(node).parent.glob("dicom-node.sqlite*"):
        path.unlink()
    node = fault_nodes("node")
    # Another study goes through the whole node meanwhile: the scheduler has looked at the
    # restored study too (it was recorded earlier) and made no job for it.
    later = synthetic.study(tmp_path / "later", n_images=1)
    assert send(node, later).ok
    node.wait_for_job(study_uid_of(later[0]), "done")
    received = receiver.wait_for_files(2, timeout=120)
    assert [study_uid_of(f) for f in received] == [study, study_uid_of(later[0])]
    assert [job.generation for job in node.queue.list_jobs() if job.study_uid == study] == [1]
    job = node.job_of(study)
    assert (job.state, job.result_sop_instance_uid) == ("done", first_uid)
    assert [(d.destination, d.state) for d in job.deliveries] == [("pacs", "done")]
    (restored,) = node.process.events("delivered_results_restored")
    assert restored["study_uid"] == study

    rerun = node.cli("jobs", "rerun", "--study", study)
    assert rerun.returncode == 0, rerun.stderr
    assert f"study {study}: job " in rerun.stdout and "(generation 2, 2 instance(s))" in rerun.stdout
    again = node.wait_for_job(study, "done", generation=2)
    received = receiver.wait_for_files(3, timeout=120)
    new = pydicom.dcmread(received[2])
    assert (new.SOPClassUID, new.StudyInstanceUID) == (GSPS_SOP_CLASS, study)
    assert new.SOPInstanceUID == again.result_sop_instance_uid != first_uid
    assert referenced_images(new) == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert node.cli("jobs", "rerun", "--study", "1.2.3.4").returncode == 1
    assert_no_traceback(node)
