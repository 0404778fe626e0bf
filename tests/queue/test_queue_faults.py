"""Queue operations for faults: a dead worker's jobs, instances whose file is gone, migration 0002."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine

from dicom_node.queue import Queue, State
from dicom_node.queue.ops import MIGRATIONS
from tests.queue.queue_helpers import T0, new_uid, record

LEASE = 300.0
BACKOFF = 30.0


def claimed_job(queue: Queue, worker: str, *, now=T0) -> int:
    """A new study's job, claimed by `worker`; returns its id."""
    record(queue, new_uid(), now=now)
    queue.enqueue_ready_studies(stable_seconds=0, now=now)
    job = queue.claim_next_job(worker=worker, lease_seconds=LEASE, now=now)
    assert job is not None and job.worker == worker
    return job.id


def test_dead_workers_job_is_retried_after_backoff_and_other_workers_jobs_are_untouched(queue):
    dead = claimed_job(queue, "worker-1")
    alive = claimed_job(queue, "worker-2")
    died_at = T0 + timedelta(seconds=5)

    failed = queue.fail_running_jobs_of(
        "worker-1", error="worker worker-1 died (killed by SIGKILL)", backoff_seconds=BACKOFF,
        max_attempts=3, now=died_at,
    )

    assert failed == [(dead, "pending")]
    job = queue.get_job(dead)
    assert (job.state, job.attempts, job.worker) == (State.PENDING, 1, "worker-1")
    assert "killed by SIGKILL" in job.error
    assert job.run_after == died_at + timedelta(seconds=BACKOFF)
    other = queue.get_job(alive)
    assert (other.state, other.worker, other.error) == (State.RUNNING, "worker-2", None)
    # Its replacement (same name) must not see the job before the backoff, then takes it.
    assert queue.claim_next_job(worker="worker-1", lease_seconds=LEASE, now=died_at) is None
    again = queue.claim_next_job(worker="worker-1", lease_seconds=LEASE, now=job.run_after)
    assert (again.id, again.attempts) == (dead, 2)
    # Nothing is held by a worker that holds nothing: a second call changes nothing.
    assert queue.fail_running_jobs_of("worker-3", error="x", backoff_seconds=0, max_attempts=3) == []


def test_job_that_kills_its_worker_every_time_fails_after_max_attempts(queue):
    job_id = claimed_job(queue, "worker-1")
    now = T0
    for attempt in range(1, 4):
        state = queue.fail_running_jobs_of(
            "worker-1", error=f"worker died, attempt {attempt}", backoff_seconds=0, max_attempts=3, now=now
        )
        if attempt < 3:
            assert state == [(job_id, "pending")]
            job = queue.claim_next_job(worker="worker-1", lease_seconds=LEASE, now=now)
            assert (job.id, job.attempts) == (job_id, attempt + 1)
    assert state == [(job_id, "failed")]
    job = queue.get_job(job_id)
    assert (job.state, job.attempts, job.error) == (State.FAILED, 3, "worker died, attempt 3")
    assert queue.stats()["jobs"]["failed"] == 1


def test_missing_instances_are_marked_reported_and_cleared(queue):
    study = new_uid()
    sops = [new_uid() for _ in range(3)]
    for sop in sops:
        record(queue, study, sop_instance_uid=sop, now=T0)
    assert {uid for uid, _ in queue.instance_paths()} == set(sops)

    assert queue.set_missing_instances([sops[0], sops[1]], now=T0) == (2, 0)
    # Still missing at the next start: keeps its first timestamp; sops[1] came back.
    assert queue.set_missing_instances([sops[0]], now=T0 + timedelta(hours=1)) == (0, 1)

    stats = queue.stats()
    assert stats["instances"] == {"total": 3, "missing": 1}
    (missing,) = stats["missing_instances"]
    assert (missing["sop_instance_uid"], missing["study_uid"]) == (sops[0], study)
    by_uid = {i.sop_instance_uid: i for i in queue.study_instances(study)}
    assert by_uid[sops[0]].missing_since == T0
    assert by_uid[sops[1]].missing_since is None

    assert queue.set_missing_instances([]) == (0, 1)
    assert queue.stats()["instances"] == {"total": 3, "missing": 0}


def test_migration_0002_keeps_instances_recorded_under_0001(tmp_path):
    path = tmp_path / "old.sqlite"
    url = f"sqlite:///{path}"
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
    finally:
        engine.dispose()
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO studies VALUES ('1.2.3', '2025-01-01 00:00:00', '2025-01-01 00:00:00', NULL, 1, 0)")
        raw.execute(
            "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, "
            "calling_ae, path, size_bytes, received_at) VALUES "
            "('1.2.3.4', '1.2.3', '1.2.3.1', '1.2.840.10008.5.1.4.1.1.1.2', '1.2.840.10008.1.2.1', 'MOD', "
            "'/data/x.dcm', 10, '2025-01-01 00:00:00')"
        )

    queue = Queue(url)
    try:
        queue.migrate()
        (instance,) = queue.study_instances("1.2.3")
        assert (instance.sop_instance_uid, instance.missing_since) == ("1.2.3.4", None)
        assert queue.stats()["instances"] == {"total": 1, "missing": 0}
    finally:
        queue.close()


def test_expire_leases_at_startup_lets_a_crashed_nodes_job_be_claimed_at_once(queue):
    job_id = claimed_job(queue, "worker-1")
    restart = T0 + timedelta(seconds=10)  # long before the 300 s lease would end
    assert queue.claim_next_job(worker="worker-1", lease_seconds=LEASE, now=restart) is None

    assert queue.expire_leases(now=restart) == 1

    again = queue.claim_next_job(worker="worker-1", lease_seconds=LEASE, now=restart + timedelta(seconds=1))
    assert (again.id, again.attempts) == (job_id, 2)  # the crashed attempt still counts
    assert queue.expire_leases(now=restart) == 1  # the new claim is running again


def test_expire_leases_of_dead_owners_leaves_live_processes_leases_alone(queue):
    dead = claimed_job(queue, "hosta-1/worker-1")
    dead_too = claimed_job(queue, "hosta-1/worker-2")
    live = claimed_job(queue, "hosta-10/worker-1")  # a prefix of the dead owner's name is not its
    other_host = claimed_job(queue, "hostb-1/worker-1")
    restart = T0 + timedelta(seconds=10)  # long before the 300 s leases would end

    assert queue.expire_leases(owners=["hosta-1"], now=restart) == 2
    assert queue.expire_leases(owners=["host_-1"], now=restart) == 0  # '_' is no wildcard

    later = restart + timedelta(seconds=1)
    claimed = {queue.claim_next_job(worker="hostc-1/worker-1", lease_seconds=LEASE, now=later).id for _ in range(2)}
    assert claimed == {dead, dead_too}
    assert queue.claim_next_job(worker="hostc-1/worker-1", lease_seconds=LEASE, now=later) is None
    assert {queue.get_job(j).worker for j in (live, other_host)} == {"hosta-10/worker-1", "hostb-1/worker-1"}
