"""The delivery loop against its database: an outage is logged once and ridden out.

Real SQLite on a real full filesystem (tmpfs), a real dcmtk storescp as the destination.
A delivered result is also noted in the study's ledger (results/delivered/), without
patient data.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pydicom
from structlog.testing import capture_logs

from dicom_node.config import parse_config
from dicom_node.deliver.runner import run_deliveries
from dicom_node.queue import Queue, State
from dicom_node.queue.ops import utcnow
from dicom_node.store import InstanceStore
from tests import synthetic
from tests.integration.process import wait_for
from tests.queue.queue_helpers import record


def test_the_delivery_loop_logs_a_full_disk_once_and_delivers_when_space_is_back(
    tmp_path, small_filesystem, storescp, gsps_file
):
    disk = small_filesystem(tmp_path / "disk", size="4m")
    config = parse_config(
        {
            "node": {"data_dir": str(tmp_path / "data"), "fsync": False},
            "security": {"allow_any_caller": True},
            "destinations": [storescp.destination.model_dump()],
        },
        base_dir=tmp_path,
    )
    store = InstanceStore(config.node.data_dir)
    result = shutil.copy(gsps_file, store.results_dir / "result.dcm")
    gsps = pydicom.dcmread(result)
    queue = Queue(f"sqlite:///{disk.path / 'dicom-node.sqlite'}")
    queue.migrate()
    stop = threading.Event()
    try:
        record(queue, str(gsps.StudyInstanceUID), now=utcnow())
        queue.enqueue_ready_studies(stable_seconds=0)
        job = queue.claim_next_job(worker="worker-1", lease_seconds=60)
        queue.complete_job(job.id, worker="worker-1", result_path=str(result),
                           result_sop_instance_uid=str(gsps.SOPInstanceUID), detections=1,
                           destinations=[storescp.destination.name])
        disk.fill()  # the delivery's claim cannot commit
        with capture_logs() as logs:
            loop = threading.Thread(target=run_deliveries, args=(queue, config, stop))
            loop.start()
            wait_for(lambda: events(logs, "database_unavailable"), 30, description="database_unavailable")
            time.sleep(2)  # the outage lasts: the loop tries again 0.5 s, 1 s later, and fails again
            disk.free()
            wait_for(lambda: queue.get_job(job.id).deliveries[0].state == State.DONE, 60,
                     description="the delivery done")
            stop.set()
            loop.join(30)
    finally:
        stop.set()
        queue.close()
    (unavailable,) = events(logs, "database_unavailable")
    assert (unavailable["component"], unavailable["kind"]) == ("deliver", "disk full")
    (available,) = events(logs, "database_available")
    assert available["failed_tries"] >= 2
    assert events(logs, "delivery_loop_error") == []
    assert len(list(storescp.output.iterdir())) == 1

    ledger = store.ledger_path(str(gsps.StudyInstanceUID))
    entry = json.loads(ledger.read_text())
    (delivered,) = entry["results"]
    assert delivered["result_sop_instance_uid"] == gsps.SOPInstanceUID
    assert delivered["result_file"] == "result.dcm"
    assert delivered["sop_instance_uids"] == [str(gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
                                                  .ReferencedSOPInstanceUID)]
    assert list(delivered["delivered"]) == [storescp.destination.name]
    for value in (synthetic.FAKE_PATIENT_NAME, synthetic.FAKE_PATIENT_ID, synthetic.FAKE_ACCESSION,
                  synthetic.FAKE_BIRTH_DATE):
        assert value not in ledger.read_text()
    assert str(gsps.PatientName) == synthetic.FAKE_PATIENT_NAME  # the result itself has it


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in list(logs) if entry["event"] == name]
