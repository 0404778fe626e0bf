"""Health tells the truth: a real node, real senders and receivers, GET /health and `dicom-node status`.

Each case provokes the condition for real and expects "degraded" (HTTP 503) with one
problem line naming it:
- C-STOREs refused for disk space (node.min_free_megabytes above the real free space);
- deliveries failing: a destination refusing associations (dcmtk storescp --refuse,
  failed at once) and one where nothing listens (retried);
- a stored instance whose file was deleted while the node was down.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request

import pydicom
import pytest

from tests import synthetic

from .dcmtk import storescu
from .fault_node import NODE_AE, FaultNode
from .process import free_ports, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_SECONDS = 120
HEALTH = {"enabled": True, "host": "127.0.0.1", "port": 0}
MEGABYTE = 1024 * 1024


def get_health(node: FaultNode) -> tuple[int, dict]:
    [listening] = node.process.events("health_listening")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{listening['port']}/health", timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def status(node: FaultNode) -> tuple[str, dict]:
    as_json = node.cli("status", "--json")
    text = node.cli("status")  # after: it sees at least what the JSON saw
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    return text.stdout, json.loads(as_json.stdout)


def problems_with(problems: list[str], start: str) -> list[str]:
    return [p for p in problems if p.startswith(start)]


def test_disk_space_refusals_make_the_node_degraded(tmp_path, fault_nodes):
    watermark = shutil.disk_usage(tmp_path).free // MEGABYTE + 100_000  # above what is free, for real
    node = fault_nodes(node={"min_free_megabytes": watermark}, health=HEALTH)
    assert get_health(node)[0] == 503  # the disk alone: every C-STORE would be refused

    (image,) = synthetic.study(tmp_path / "study", n_images=1)
    sent = storescu([image], node.port, NODE_AE)
    assert not sent.ok and "Refused: OutOfResources" in sent.output, sent.output

    code, body = get_health(node)
    assert code == 503 and body["status"] == "degraded"
    [disk] = problems_with(body["problems"], "free space on node.data_dir is ")
    assert f"below node.min_free_megabytes ({watermark})" in disk
    [refused] = problems_with(body["problems"], "1 C-STORE refused in the last 300 s (last: disk space low: ")
    assert f"node.min_free_megabytes is {watermark})" in refused

    # The node rewrites its state file every 2 s: `status` sees the refusal within that.
    text, report = wait_for(lambda: (found := status(node))[1]["health"]["c_stores_refused"]["count"] and found,
                            30, description="the refusal seen by dicom-node status")  # fmt: skip
    assert "health:      degraded" in text
    # The free MB move with other processes' writes; the rest of the line does not.
    assert re.search(rf"  problem:   free space on node.data_dir is \d+ MB, below node.min_free_megabytes "
                     rf"\({watermark}\): C-STOREs are refused", text), text
    assert f"  problem:   {refused}" in text
    assert report["health"]["status"] == "degraded"
    assert report["health"]["c_stores_refused"]["count"] == 1


def test_failing_deliveries_make_the_node_degraded_and_retry_now_sends_at_once(
    tmp_path, fault_nodes, storescp_factory
):
    (down_port,) = free_ports(1)  # nothing listens there: retried
    refusing = storescp_factory(ae_title="PACS_B", extra_args=["--refuse"])  # rejected-permanent: failed
    node = fault_nodes(
        destinations=[{"name": "down", "ae_title": "PACS_A", "host": "127.0.0.1", "port": down_port},
                      {"name": "refuses", "ae_title": "PACS_B", "host": "127.0.0.1", "port": refusing.port}],
        # A long backoff: the retried delivery waits, pending with its error, until --now.
        delivery={"max_attempts": 100, "retry_backoff_seconds": 60, "max_backoff_seconds": 60},
        health=HEALTH,
    )  # fmt: skip
    assert get_health(node)[0] == 200
    (image,) = synthetic.study(tmp_path / "study", n_images=1)
    assert storescu([image], node.port, NODE_AE).ok
    study_uid = str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)

    def settled():
        job = node.job_of(study_uid)
        found = {d.destination: d for d in job.deliveries} if job else {}
        if found.get("refuses") and found["refuses"].state == "failed" and found.get("down") \
                and found["down"].state == "pending" and found["down"].attempts == 1:
            return job
        return None

    job = wait_for(settled, TIMEOUT_SECONDS, description="one delivery failed, one waiting to retry")

    code, body = get_health(node)
    assert code == 503 and body["status"] == "degraded"
    [failed] = problems_with(body["problems"], f"1 delivery failed (latest: job {job.id} to refuses: ")
    assert "Rejected Permanent" in failed and failed.endswith("dicom-node jobs retry ID")
    [retrying] = problems_with(
        body["problems"], f"1 delivery is failing and being retried (latest: job {job.id} to down: cannot connect")
    text, _ = status(node)
    assert f"  problem:   {failed}" in text and f"  problem:   {retrying}" in text
    assert "next delivery attempt: at " in text and f"job {job.id} to down" in text

    # The done job whose delivery failed is in the failed list; `show` says when `down` is retried.
    listed = json.loads(node.cli("jobs", "list", "--state", "failed", "--json").stdout)
    assert [j["id"] for j in listed] == [job.id]
    shown = json.loads(node.cli("jobs", "show", str(job.id)).stdout)
    next_at = {d["destination"]: d["next_attempt_at"] for d in shown["deliveries"]}
    assert next_at["refuses"] is None
    assert next_at["down"] == node.job_of(study_uid).deliveries[0].run_after.isoformat()

    # --now: the waiting delivery is tried again at once, not after its minute of backoff.
    retry = node.cli("jobs", "retry", str(job.id), "--now")
    assert retry.returncode == 0, retry.stderr
    wait_for(lambda: {d.destination: d.attempts for d in node.job_of(study_uid).deliveries}["down"] >= 2,
             30, description="the delivery to `down` tried again at once")  # fmt: skip


def test_missing_instance_files_make_the_node_degraded(tmp_path, fault_nodes):
    node = fault_nodes()  # [health] off: `status` learns the rest from the node's state file
    (image,) = synthetic.study(tmp_path / "study", n_images=1)
    assert storescu([image], node.port, NODE_AE).ok
    stored = pydicom.dcmread(image, stop_before_pixels=True)
    node.wait_for_job(str(stored.StudyInstanceUID), "done")
    text, report = status(node)
    assert report["health"]["status"] == "ok", report["health"]
    assert "health:      ok" in text and "SCP listening, workers alive 1/1" in text

    assert node.stop() == 0
    [path] = [p for p in (tmp_path / "node" / "data" / "instances").rglob("*.dcm")]
    path.unlink()  # lost while the node was down
    node = fault_nodes()  # the same data_dir again: reconciled at start

    text, report = status(node)
    [missing] = problems_with(report["health"]["problems"], "1 stored instance has no file since the last start")
    assert f"(first: {stored.SOPInstanceUID} at {path})" in missing
    assert "health:      degraded" in text and f"  problem:   {missing}" in text
    assert "SCP listening, workers alive 1/1" in text  # the node itself is fine
