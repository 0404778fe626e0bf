"""The destination PACS fails, with a real node: results wait and arrive once it is back.

- down: nothing listens on the destination's port; Orthanc comes up there later;
- failing: dcmtk storescp aborting every C-STORE (`--abort-after`, retryable) or refusing
  every association (`--refuse`, rejected-permanent, not retried): the delivery ends
  `failed` with the reason, shown by `dicom-node jobs list`; once a working PACS listens
  there, `dicom-node jobs retry ID` delivers it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import DestinationConfig
from dicom_node.deliver.scu import send_file
from dicom_node.errors import PermanentError, RetryableError
from tests import synthetic
from tests.dciodvfy import assert_dciodvfy_clean

from .dcmtk import storescu
from .fault_node import NODE_AE, FaultNode
from .gsps_read import GSPS_SOP_CLASS, referenced_images
from .process import free_ports, wait_for

pytestmark = pytest.mark.integration

DELIVERY_TIMEOUT_SECONDS = 120


def send_study(node: FaultNode, folder: Path) -> tuple[str, set[str]]:
    """Send a two-image study; returns its Study Instance UID and SOP Instance UIDs."""
    files = synthetic.study(folder, n_images=2)
    result = storescu(files, node.port, NODE_AE)
    assert result.ok, result.output
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return str(datasets[0].StudyInstanceUID), {str(ds.SOPInstanceUID) for ds in datasets}


def destination(name: str, ae_title: str, port: int) -> dict:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port}


def deliveries_by_name(node: FaultNode, study_uid: str) -> dict:
    job = node.job_of(study_uid)
    return {d.destination: d for d in job.deliveries} if job else {}


def wait_for_deliveries(node: FaultNode, study_uid: str, state: str, names: set[str]) -> dict:
    def reached():
        if node.process.process.poll() is not None:
            raise RuntimeError(f"dicom-node exited:\n{node.process.output()}")
        found = deliveries_by_name(node, study_uid)
        return found if set(found) == names and all(d.state == state for d in found.values()) else None

    return wait_for(reached, DELIVERY_TIMEOUT_SECONDS, description=f"deliveries {sorted(names)} {state}")


def test_results_wait_while_the_pacs_is_down_and_arrive_when_it_is_up(tmp_path, fault_nodes, orthanc_factory):
    (pacs_port,) = free_ports(1)  # nothing listens there yet
    node = fault_nodes(
        destinations=[destination("pacs", "ORTHANC", pacs_port)],
        delivery={"max_attempts": 100, "retry_backoff_seconds": 0.2, "max_backoff_seconds": 1},
    )
    study_uid, sent = send_study(node, tmp_path / "study")

    retries = node.wait_for_event("delivery_retry", count=2)
    assert all("cannot connect to pacs" in r["error"] for r in retries), retries
    waiting = deliveries_by_name(node, study_uid)["pacs"]
    assert waiting.state in ("pending", "running") and waiting.attempts >= 2

    orthanc = orthanc_factory(dicom_port=pacs_port)  # the PACS is back, at the same address
    (delivered,) = wait_for_deliveries(node, study_uid, "done", {"pacs"}).values()
    assert delivered.attempts > waiting.attempts
    (instance_id,) = orthanc.client.find_by_sop_class(GSPS_SOP_CLASS)
    gsps = orthanc.client.instance_dataset(instance_id)
    assert gsps.StudyInstanceUID == study_uid
    assert referenced_images(gsps) == sent


def test_failing_pacs_ends_in_failed_with_the_reason_and_jobs_retry_delivers(tmp_path, fault_nodes, storescp_factory):
    aborting_port, refusing_port = free_ports(2)
    aborting = storescp_factory(ae_title="PACS_A", port=aborting_port, extra_args=["--abort-after"])
    refusing = storescp_factory(ae_title="PACS_B", port=refusing_port, extra_args=["--refuse"])
    node = fault_nodes(
        destinations=[destination("aborts", "PACS_A", aborting_port),
                      destination("refuses", "PACS_B", refusing_port)],
        delivery={"max_attempts": 3, "retry_backoff_seconds": 0.2, "max_backoff_seconds": 0.5},
    )
    study_uid, sent = send_study(node, tmp_path / "study")

    failed = wait_for_deliveries(node, study_uid, "failed", {"aborts", "refuses"})
    # Aborted mid-store: may pass, so retried up to delivery.max_attempts.
    assert failed["aborts"].attempts == 3
    assert "no C-STORE response from aborts" in failed["aborts"].error
    # Rejected-permanent (PS3.8 9.3.4): retrying cannot help until someone acts.
    assert failed["refuses"].attempts == 1
    assert "rejected the association (Rejected Permanent" in failed["refuses"].error
    job = node.job_of(study_uid)
    assert job.state == "done"  # the analysis itself succeeded

    listing = node.cli("jobs", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    (listed,) = [j for j in json.loads(listing.stdout) if j["id"] == job.id]
    assert {d["destination"]: (d["state"], d["error"]) for d in listed["deliveries"]} == {
        "aborts": ("failed", failed["aborts"].error), "refuses": ("failed", failed["refuses"].error)}
    assert "failed:2" in node.cli("jobs", "list").stdout

    # Both PACSs fixed (working receivers at the same addresses), then a retry by hand.
    aborting.stop()
    refusing.stop()
    fixed = [storescp_factory(ae_title="PACS_A", port=aborting_port),
             storescp_factory(ae_title="PACS_B", port=refusing_port)]
    retry = node.cli("jobs", "retry", str(job.id))
    assert retry.returncode == 0, retry.stderr
    assert "queued again" in retry.stdout

    wait_for_deliveries(node, study_uid, "done", {"aborts", "refuses"})
    for receiver in fixed:
        (path,) = receiver.wait_for_files(1)
        assert_dciodvfy_clean(path)
        gsps = pydicom.dcmread(path)
        assert (gsps.SOPClassUID, gsps.StudyInstanceUID) == (GSPS_SOP_CLASS, study_uid)
        assert referenced_images(gsps) == sent


def test_a_refusing_pacs_reads_as_rejected_permanent_every_time(tmp_path, storescp_factory):
    # dcmtk sends A-ASSOCIATE-RJ and closes at once; pynetdicom's requesting thread can see
    # the closed socket before the RJ and call the association aborted (39 of 200 tries
    # under CPU load before the node kept the RJ from the DUL).
    refusing = storescp_factory(ae_title="PACS_B", extra_args=["--refuse"])
    (image,) = synthetic.study(tmp_path / "study", n_images=1)
    target = DestinationConfig.model_validate(destination("refuses", "PACS_B", refusing.port))
    outcomes = Counter()
    for _ in range(100):
        try:
            send_file(image, target, calling_ae_title=NODE_AE, timeout=10)
            outcomes["stored"] += 1
        except PermanentError as error:
            outcomes["permanent" if "Rejected Permanent" in str(error) else str(error)] += 1
        except RetryableError as error:
            outcomes[str(error)] += 1
    assert outcomes == {"permanent": 100}
