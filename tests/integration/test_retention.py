"""Retention with a real `dicom-node serve`, real dcmtk storescu (sender) and storescp (PACS).

- `dicom-node purge --older-than 0s`, run as the README shows it while the node runs,
  removes the delivered study (rows and files) and names it; the study whose PACS is
  down (delivery pending, retrying) stays whole.
- The node's own retention thread, by age and under disk pressure (a free-space level
  far above the real free space), removes a delivered study and never the one whose
  delivery failed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests import synthetic

from .dcmtk import storescu
from .fault_node import CLI_TIMEOUT_SECONDS, NODE_AE, FaultNode
from .process import free_ports, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT_SECONDS = 120


def readme_purge_command(config: Path) -> list[str]:
    """The README's `dicom-node purge --older-than 0s --config PATH` line, for this config."""
    (line,) = re.findall(r"^dicom-node purge --older-than 0s --config PATH", README.read_text(), re.MULTILINE)
    words = shlex.split(line)
    return [sys.executable, "-m", "dicom_node", *words[1:-1], str(config)]


def send_study(node: FaultNode, folder: Path) -> str:
    files = synthetic.study(folder, n_images=2)
    result = storescu(files, node.port, NODE_AE)
    assert result.ok, result.output
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def pacs(port: int) -> dict:
    return {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}


def wait_for_delivery(node: FaultNode, study_uid: str, *states: str):
    def reached():
        if node.process.process.poll() is not None:
            raise RuntimeError(f"dicom-node exited:\n{node.process.output()}")
        job = node.job_of(study_uid)
        if job and job.deliveries and all(d.state in states for d in job.deliveries):
            return job
        return None

    return wait_for(reached, TIMEOUT_SECONDS, description=f"study {study_uid} delivery {states}")


def study_files(node: FaultNode, study_uid: str) -> list[Path]:
    """The instance files and result files the study's rows name, and its delivered-results
    ledger once a delivery is done."""
    job = node.job_of(study_uid)
    paths = [Path(i.path) for i in node.queue.study_instances(study_uid)]
    ledger = node.config.parent / "data" / "results" / "delivered" / f"{study_uid}.json"
    return paths + ([Path(job.result_path)] if job and job.result_path else []) + ([ledger] if ledger.exists() else [])


def assert_removed(node: FaultNode, study_uid: str, files: list[Path]) -> None:
    assert node.queue.study_instances(study_uid) == []
    assert node.job_of(study_uid) is None
    assert [path for path in files if path.exists()] == []
    assert not (node.config.parent / "data" / "instances" / study_uid).exists()


def assert_whole(node: FaultNode, study_uid: str, files: list[Path]) -> None:
    assert len(files) in (3, 4)  # two images, one GSPS, and its ledger once delivered
    assert all(path.exists() for path in files)
    assert len(node.queue.study_instances(study_uid)) == 2
    assert node.job_of(study_uid) is not None


def test_readme_purge_removes_the_delivered_study_from_a_running_node_and_keeps_the_undelivered_one(
        tmp_path, fault_nodes, storescp_factory):
    (pacs_port,) = free_ports(1)
    receiver = storescp_factory(ae_title="PACS", port=pacs_port)
    node = fault_nodes(destinations=[pacs(pacs_port)],
                       delivery={"max_attempts": 1000, "retry_backoff_seconds": 0.2, "max_backoff_seconds": 1})
    delivered = send_study(node, tmp_path / "delivered")
    wait_for_delivery(node, delivered, "done")
    receiver.wait_for_files(1)
    delivered_files = study_files(node, delivered)
    assert_whole(node, delivered, delivered_files)
    assert delivered_files[-1].name == f"{delivered}.json"  # the ledger goes with the study

    receiver.stop()  # the PACS goes down: the next study's result waits
    waiting = send_study(node, tmp_path / "waiting")
    node.wait_for_event("delivery_retry", count=1)
    waiting_files = study_files(node, waiting)

    result = subprocess.run(readme_purge_command(node.config), capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"{delivered}  2 instance(s), 1 result(s), ")
    assert lines[1].startswith("removed 1 study(ies): 2 instance(s), 1 result(s), ")
    assert waiting not in result.stdout
    assert_removed(node, delivered, delivered_files)
    assert_whole(node, waiting, waiting_files)
    assert node.job_of(waiting).deliveries[0].state in ("pending", "running")
    assert not any(value in result.stdout + result.stderr for value in synthetic_phi())
    # Nothing left to remove now; the node goes on receiving.
    again = subprocess.run(readme_purge_command(node.config), capture_output=True, text=True,
                           timeout=CLI_TIMEOUT_SECONDS)
    assert (again.returncode, again.stdout) == (0, "nothing to remove\n")
    send_study(node, tmp_path / "after")


def synthetic_phi() -> tuple[str, ...]:
    return (synthetic.FAKE_PATIENT_NAME, synthetic.FAKE_PATIENT_ID, synthetic.FAKE_BIRTH_DATE,
            synthetic.FAKE_ACCESSION)


@pytest.mark.parametrize(
    "reason, retention",
    [
        ("age", {"keep_delivered_for": "1s", "check_interval": "1s"}),
        # Far above the real free space: the disk is always "short", only eligibility limits.
        ("disk_space", {"keep_delivered_for": "30d", "check_interval": "1s", "min_free_megabytes": 10**12}),
    ],
)
def test_the_nodes_retention_removes_a_delivered_study_never_a_failed_delivery(
        tmp_path, fault_nodes, storescp_factory, reason, retention):
    (pacs_port,) = free_ports(1)  # nothing listens there yet
    node = fault_nodes(destinations=[pacs(pacs_port)], retention=retention,
                       delivery={"max_attempts": 2, "retry_backoff_seconds": 0.2, "max_backoff_seconds": 0.5})
    failed = send_study(node, tmp_path / "failed")
    wait_for_delivery(node, failed, "failed")
    failed_files = study_files(node, failed)

    storescp_factory(ae_title="PACS", port=pacs_port)  # the PACS is up for the next study
    delivered = send_study(node, tmp_path / "delivered")
    # The study may be gone before a test could look at its job: follow the node's log.
    (purged,) = node.wait_for_event("study_purged", timeout=TIMEOUT_SECONDS, study_uid=delivered)
    node.wait_for_event("retention_done", studies=1)  # that whole pass is over

    assert (purged["reason"], purged["instances"], purged["results"]) == (reason, 2, 1)
    assert purged["bytes"] > 0
    (done,) = [e for e in node.process.events("job_done") if e["study_uid"] == delivered]
    assert node.process.events("delivery_done")  # it reached the PACS first
    result = node.config.parent / "data" / "results" / f"{done['gsps_sop_instance_uid']}.dcm"
    assert_removed(node, delivered, [result])
    assert_whole(node, failed, failed_files)
    assert [e["study_uid"] for e in node.process.events("study_purged")] == [delivered]
    assert not any(value in node.process.output() for value in synthetic_phi())
