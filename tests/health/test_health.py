"""Health report, the /health HTTP server, the run lock and `dicom-node status`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import timedelta
from types import SimpleNamespace

import pytest

from dicom_node.cli import main
from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.ops.health import (
    MAX_ERROR_CHARS,
    HealthLimits,
    HealthServer,
    Liveness,
    health_report,
    start_health_server,
)
from dicom_node.ops.runlock import RunLock, running_node_pid
from dicom_node.queue import Queue
from dicom_node.receive.activity import ReceiveActivity
from tests.queue.queue_helpers import T0, new_uid, record

THRESHOLD = 1800.0


@pytest.fixture
def queue(tmp_path):
    queue = Queue(f"sqlite:///{tmp_path / 'queue.sqlite'}")
    queue.migrate()
    yield queue
    queue.close()


def pending_job(queue: Queue) -> int:
    """One study received at T0, enqueued at T0 + 10 s: a pending job created then."""
    record(queue, new_uid(), now=T0)
    [job_id] = queue.enqueue_ready_studies(stable_seconds=5, now=T0 + timedelta(seconds=10))
    return job_id


LIMITS = HealthLimits(max_pending_age_seconds=THRESHOLD, max_pending_delivery_age_seconds=THRESHOLD,
                      refusal_window_seconds=300, min_free_bytes=1024 * 1024 * 1024)  # fmt: skip


def report(stats, *, stats_error=None, deliveries=None, free_bytes=None, live_error=None, **live):
    alive = Liveness(**({"scp_listening": True, "workers_alive": 1, "workers_expected": 1} | live))
    return health_report(stats=stats, live=None if live_error else alive, limits=LIMITS, deliveries=deliveries,
                         free_bytes=free_bytes, stats_error=stats_error, live_error=live_error)  # fmt: skip


def test_healthy_node_reports_ok_with_queue_depth_and_age(queue):
    pending_job(queue)
    pending_job(queue)
    queue.claim_next_job(worker="w1", lease_seconds=60, now=T0 + timedelta(seconds=20))
    status, body = report(queue.stats(now=T0 + timedelta(seconds=70)))
    assert status == 200
    assert body["status"] == "ok" and body["problems"] == []
    assert body["queue_depth"] == 2
    assert body["jobs"]["pending"] == 1 and body["jobs"]["running"] == 1
    assert body["oldest_pending_job_age_seconds"] == pytest.approx(60)
    assert body["workers"] == {"alive": 1, "expected": 1}
    json.dumps(body)  # plain JSON, no datetimes left


@pytest.mark.parametrize(
    "overrides, age_seconds, problem",
    [
        ({"workers_alive": 0}, 60, "no worker process is alive"),
        ({"scp_listening": False}, 60, "the DICOM SCP is not listening"),
        ({}, THRESHOLD + 60, "the oldest pending job has waited 1860 s (health.max_pending_age_seconds is 1800)"),
    ],
)
def test_degraded_conditions_answer_503(queue, overrides, age_seconds, problem):
    pending_job(queue)
    stats = queue.stats(now=T0 + timedelta(seconds=10 + age_seconds))
    status, body = report(stats, **overrides)
    assert status == 503
    assert body["status"] == "degraded"
    assert body["problems"] == [problem]


def done_job(queue: Queue, destination: str = "pacs", *, now=T0 + timedelta(seconds=20)) -> int:
    job_id = pending_job(queue)
    queue.claim_next_job(worker="w1", lease_seconds=60, now=now)
    queue.complete_job(job_id, worker="w1", result_path="/r.dcm", result_sop_instance_uid=new_uid(),
                       detections=0, destinations=[destination], now=now)  # fmt: skip
    return job_id


def failed_delivery(queue: Queue, *, error: str, retryable: bool, now=T0 + timedelta(seconds=20)) -> None:
    delivery = queue.claim_next_delivery(worker="d", lease_seconds=60, now=now)
    queue.fail_delivery(delivery.id, error=error, retryable=retryable, backoff_seconds=30,
                        max_backoff_seconds=30, max_attempts=5, now=now)  # fmt: skip


MB = 1024 * 1024


def test_each_degraded_condition_is_one_problem_line(queue):
    """Refusals, low disk, failed and retried deliveries, an old delivery, missing files."""
    refused_job = done_job(queue, "pacs")
    failed_delivery(queue, error="PACS rejected the association (Rejected Permanent)", retryable=False)
    done_job(queue, "archive")
    failed_delivery(queue, error="cannot connect to archive (127.0.0.1:4242): Connection refused",
                    retryable=True, now=T0 + timedelta(seconds=25))  # fmt: skip
    [instance] = [uid for uid, _ in queue.instance_paths()][:1]
    queue.set_missing_instances([instance], now=T0)
    now = T0 + timedelta(seconds=THRESHOLD + 100)

    status, body = report(
        queue.stats(now=now), deliveries=queue.delivery_stats(now=now), free_bytes=100 * MB,
        refused_recently=3, last_refusal_reason="disk space low: 100 MB free, node.min_free_megabytes is 1024",
    )  # fmt: skip

    assert status == 503 and body["status"] == "degraded"
    assert body["problems"] == [
        "3 C-STOREs refused in the last 300 s (last: disk space low: 100 MB free, node.min_free_megabytes is 1024)",
        ("free space on node.data_dir is 100 MB, below node.min_free_megabytes (1024): "
         "C-STOREs are refused with Out of Resources"),
        (f"1 delivery failed (latest: job {refused_job} to pacs: PACS rejected the association "
         "(Rejected Permanent)); once the destination is fixed: dicom-node jobs retry ID"),
        (f"1 delivery is failing and being retried (latest: job {refused_job + 1} to archive: cannot connect "
         "to archive (127.0.0.1:4242): Connection refused)"),
        (f"the oldest pending delivery has waited {THRESHOLD + 80:.0f} s "
         "(health.max_pending_delivery_age_seconds is 1800)"),
        (f"1 stored instance has no file since the last start (first: {instance} at "
         f"{queue.stats()['missing_instances'][0]['path']}); restore the files, then restart the node"),
    ]
    assert body["c_stores_refused"]["count"] == 3 and body["free_megabytes"] == 100
    assert body["delivery"]["failed"] == 1 and body["delivery"]["retrying"] == 1
    json.dumps(body)  # plain JSON


def test_healthy_disk_and_deliveries_are_ok(queue):
    done_job(queue)
    delivery = queue.claim_next_delivery(worker="d", lease_seconds=60, now=T0 + timedelta(seconds=20))
    queue.complete_delivery(delivery.id, now=T0 + timedelta(seconds=20))
    now = T0 + timedelta(seconds=60)
    status, body = report(queue.stats(now=now), deliveries=queue.delivery_stats(now=now), free_bytes=2048 * MB)
    assert (status, body["problems"]) == (200, [])


def test_unknown_liveness_is_one_problem(queue):
    status, body = report(queue.stats(), live_error="no dicom-node is running on /data")
    assert (status, body["problems"]) == (503, ["no dicom-node is running on /data"])
    assert body["workers"] is None and body["scp_listening"] is None


def test_pending_job_just_under_the_threshold_is_ok(queue):
    pending_job(queue)
    status, _ = report(queue.stats(now=T0 + timedelta(seconds=10 + THRESHOLD - 1)))
    assert status == 200


def test_unreadable_queue_is_degraded():
    status, body = report(None, stats_error="OperationalError")
    assert status == 503
    assert body["problems"] == ["the job table cannot be read (OperationalError)"]
    assert body["queue_depth"] is None


def test_last_errors_are_json_and_truncated(queue):
    job_id = pending_job(queue)
    queue.claim_next_job(worker="w1", lease_seconds=60, now=T0 + timedelta(seconds=20))
    queue.fail_job(job_id, worker="w1", error="UnsupportedImage: " + "x" * 1000, retryable=False,
                   backoff_seconds=1, max_attempts=1, now=T0 + timedelta(seconds=30))  # fmt: skip
    _, body = report(queue.stats(now=T0 + timedelta(seconds=40)))
    [error] = body["last_errors"]
    assert error["job_id"] == job_id
    assert error["error"].startswith("UnsupportedImage: ") and len(error["error"]) == MAX_ERROR_CHARS
    assert isinstance(error["at"], str)
    assert json.loads(json.dumps(body))["jobs"]["failed"] == 1


def get(url: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_health_server_answers_with_the_probe():
    answers = iter([(200, {"status": "ok"}), (503, {"status": "degraded", "problems": ["x"]})])
    server = HealthServer(("127.0.0.1", 0), lambda: next(answers)).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/health") == (200, {"status": "ok"})
        assert get(base + "/health") == (503, {"status": "degraded", "problems": ["x"]})
        assert get(base + "/health") == (503, {"status": "degraded", "problems": ["health check failed (StopIteration)"]})
        status, body = get(base + "/metrics")
        assert status == 404 and "GET /health" in body["error"]
    finally:
        server.stop()


def _config(tmp_path, **health):
    return parse_config({"health": health, "workers": {"count": 2},
                         "node": {"data_dir": str(tmp_path), "min_free_megabytes": 0}}, base_dir=tmp_path)  # fmt: skip


def test_start_health_server_is_off_by_default(tmp_path, queue):
    assert start_health_server(_config(tmp_path), queue=queue, scp=None, pool=None) is None


class _Worker:
    def __init__(self, alive: bool):
        self.alive = alive

    def is_alive(self) -> bool:
        return self.alive


def test_start_health_server_reports_scp_and_workers(tmp_path, queue):
    listener = socket.create_server(("127.0.0.1", 0))
    scp = SimpleNamespace(socket=listener, activity=ReceiveActivity())
    pool = SimpleNamespace(processes={"worker-1": _Worker(True), "worker-2": _Worker(False)})
    server = start_health_server(_config(tmp_path, enabled=True, port=0), queue=queue, scp=scp, pool=pool)
    url = f"http://127.0.0.1:{server.port}/health"
    try:
        status, body = get(url)
        assert status == 200, body
        assert body["workers"] == {"alive": 1, "expected": 2} and body["scp_listening"] is True
        pool.processes["worker-1"].alive = False
        listener.close()
        scp.activity.record_refused(0xA700, "disk space low: 3 MB free, node.min_free_megabytes is 1024")
        status, body = get(url)
        assert status == 503
        assert body["problems"] == [
            "the DICOM SCP is not listening", "no worker process is alive",
            "1 C-STORE refused in the last 300 s (last: disk space low: 3 MB free, node.min_free_megabytes is 1024)",
        ]
    finally:
        server.stop()
        listener.close()


def test_health_port_in_use_is_a_config_error(tmp_path, queue):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"health: cannot listen on 127.0.0.1:{port}"):
            start_health_server(_config(tmp_path, enabled=True, port=port), queue=queue, scp=None, pool=None)


def test_run_lock_tells_whether_a_node_runs(tmp_path):
    assert running_node_pid(tmp_path) is None
    lock = RunLock(tmp_path).acquire()
    try:
        assert running_node_pid(tmp_path) == os.getpid()
        with pytest.raises(ConfigError, match=f"node.data_dir: another dicom-node \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path).acquire()
    finally:
        lock.release()
    assert running_node_pid(tmp_path) is None
    RunLock(tmp_path).acquire().release()  # free again


def test_run_lock_of_a_killed_process_is_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from dicom_node.ops.runlock import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert running_node_pid(tmp_path) == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert running_node_pid(tmp_path) is None


def _status_config(tmp_path) -> str:
    path = tmp_path / "node.toml"
    path.write_text(f"[node]\ndata_dir = {str(tmp_path / 'data')!r}\n[logging]\nlevel = 'warning'\n")
    (tmp_path / "data").mkdir()
    return str(path)


def test_status_says_whether_the_node_runs(tmp_path, capsys):
    config = _status_config(tmp_path)
    assert main(["status", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "node:        not running" in out
    assert "jobs:        pending 0, running 0, done 0, failed 0 (queue depth 0)" in out
    assert "last errors: none" in out
    lock = RunLock(tmp_path / "data").acquire()
    try:
        assert main(["status", "--config", config, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
    finally:
        lock.release()
    assert report["node"]["running"] is True and report["node"]["pid"] == os.getpid()
    assert report["queue_depth"] == 0 and report["oldest_pending_job_age_seconds"] is None
    assert set(report["jobs"]) == {"pending", "running", "done", "failed"}


def test_shared_run_locks_admit_each_other_and_exclude_a_sqlite_node(tmp_path):
    first = RunLock(tmp_path, shared=True).acquire()
    second = RunLock(tmp_path, shared=True).acquire()
    try:
        assert running_node_pid(tmp_path) == 0  # running; shared holders name no pid
        with pytest.raises(ConfigError, match="only when all of them use one PostgreSQL queue.url"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
        second.release()
    alone = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(ConfigError, match="node.data_dir: another dicom-node"):
            RunLock(tmp_path, shared=True).acquire()
    finally:
        alone.release()
