"""Queue operations on a real SQLite file: receiving, readiness, leases, retries, deliveries."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest

from dicom_node.queue import LeaseLost, Queue, State
from tests.queue.queue_helpers import T0, new_uid, record

LEASE = 60.0


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def ready_job(queue: Queue, *, now=T0) -> int:
    """Record one instance of a new study and enqueue it; returns the job id."""
    study = new_uid()
    record(queue, study, now=now)
    (job_id,) = queue.enqueue_ready_studies(stable_seconds=0, now=now)
    return job_id


# --- receiving ---------------------------------------------------------------------


def test_record_instance_is_idempotent_and_duplicates_leave_the_study_alone(queue, database_url):
    study, sop = new_uid(), new_uid()
    assert record(queue, study, sop_instance_uid=sop, now=T0) is True
    # The same instance re-sent much later: one stored instance, and the study is
    # not made "recent" again (it stays ready at T0 + 10 s).
    assert record(queue, study, sop_instance_uid=sop, now=T0 + s(5)) is False

    # Committed before returning: a second engine (another process) sees it.
    other = Queue(database_url)
    try:
        (instance,) = other.study_instances(study)
    finally:
        other.close()
    assert instance.sop_instance_uid == sop
    assert instance.received_at == T0
    assert instance.received_at.tzinfo is not None
    assert len(queue.enqueue_ready_studies(stable_seconds=10, now=T0 + s(10))) == 1


def test_naive_datetimes_are_refused(queue):
    with pytest.raises(Exception, match="naive datetime"):
        record(queue, new_uid(), now=T0.replace(tzinfo=None))


def test_study_instances_lists_only_that_study(queue):
    study, other = new_uid(), new_uid()
    sops = [new_uid() for _ in range(3)]
    for i, sop in enumerate(sops):
        record(queue, study, sop_instance_uid=sop, now=T0 + s(i))
    record(queue, other, now=T0)
    assert [i.sop_instance_uid for i in queue.study_instances(study)] == sops


# --- readiness ---------------------------------------------------------------------


def test_study_is_enqueued_once_it_has_been_quiet_for_stable_seconds(queue):
    study = new_uid()
    record(queue, study, now=T0)
    record(queue, study, now=T0 + s(4))
    assert queue.enqueue_ready_studies(stable_seconds=10, now=T0 + s(13)) == []

    (job_id,) = queue.enqueue_ready_studies(stable_seconds=10, now=T0 + s(14))
    job = queue.get_job(job_id)
    assert (job.study_uid, job.generation, job.state) == (study, 1, State.PENDING)
    # Nothing new: calling again creates nothing.
    assert queue.enqueue_ready_studies(stable_seconds=10, now=T0 + s(60)) == []


def test_instance_after_analysis_starts_generation_two(queue):
    study = new_uid()
    record(queue, study, now=T0)
    (first,) = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    queue.claim_next_job(worker="w1", lease_seconds=LEASE, now=T0)
    queue.complete_job(
        first, worker="w1", result_path="/r/1.dcm", result_sop_instance_uid=new_uid(),
        detections=0, destinations=[], now=T0 + s(1),
    )
    record(queue, study, now=T0 + s(100))
    (second,) = queue.enqueue_ready_studies(stable_seconds=10, now=T0 + s(110))
    job = queue.get_job(second)
    assert (job.study_uid, job.generation, job.state) == (study, 2, State.PENDING)
    assert len(queue.study_instances(study)) == 2


def test_each_destination_gets_a_delivery_of_each_output_it_takes(queue):
    study = new_uid()
    record(queue, study, now=T0)
    (job_id,) = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    queue.claim_next_job(worker="w1", lease_seconds=LEASE, now=T0)
    gsps, sr = new_uid(), new_uid()
    queue.complete_job(
        job_id, worker="w1", result_path="/r/gsps.dcm", result_sop_instance_uid=gsps, detections=1,
        destinations={"pacs": ["gsps"], "ohif": ["sr"], "both": ["gsps", "sr"]},
        outputs={"sr": ("/r/sr.dcm", sr)}, now=T0 + s(1),
    )
    deliveries = {(d.destination, d.output): (d.path, d.sop_instance_uid, d.state)
                  for d in queue.get_job(job_id).deliveries}
    assert deliveries == {
        ("pacs", "gsps"): ("/r/gsps.dcm", gsps, State.PENDING),
        ("ohif", "sr"): ("/r/sr.dcm", sr, State.PENDING),
        ("both", "gsps"): ("/r/gsps.dcm", gsps, State.PENDING),
        ("both", "sr"): ("/r/sr.dcm", sr, State.PENDING),
    }
    claimed = {queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0 + s(2)).id for _ in range(4)}
    assert len(claimed) == 4 and queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0 + s(2)) is None


def test_an_output_the_job_did_not_make_is_a_caller_bug(queue):
    study = new_uid()
    record(queue, study, now=T0)
    (job_id,) = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    queue.claim_next_job(worker="w1", lease_seconds=LEASE, now=T0)
    with pytest.raises(ValueError, match="ohif takes 'sr'"):
        queue.complete_job(job_id, worker="w1", result_path="/r/1.dcm", result_sop_instance_uid=new_uid(),
                           detections=0, destinations={"ohif": ["sr"]}, now=T0 + s(1))
    assert queue.get_job(job_id).state == State.RUNNING  # nothing recorded


def test_a_later_generation_finds_the_result_it_replaces(queue):
    study = new_uid()
    record(queue, study, now=T0)
    (first,) = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    assert queue.previous_results(study, before_generation=1) == []
    queue.claim_next_job(worker="w1", lease_seconds=LEASE, now=T0)
    queue.complete_job(first, worker="w1", result_path="/r/1.dcm", result_sop_instance_uid=new_uid(),
                       detections=0, destinations={"ohif": ["gsps", "sr"]}, outputs={"sr": ("/r/1-sr.dcm", new_uid())},
                       now=T0 + s(1))
    record(queue, study, now=T0 + s(100))
    (second,) = queue.enqueue_ready_studies(stable_seconds=10, now=T0 + s(110))
    (previous,) = queue.previous_results(study, before_generation=queue.get_job(second).generation)
    assert previous.id == first and previous.result_path == "/r/1.dcm"
    assert {d.output: d.path for d in previous.deliveries} == {"gsps": "/r/1.dcm", "sr": "/r/1-sr.dcm"}
    assert queue.previous_results(new_uid(), before_generation=2) == []


def test_instance_while_job_still_pending_joins_that_job(queue):
    study = new_uid()
    record(queue, study, now=T0)
    (job_id,) = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    record(queue, study, now=T0 + s(1))
    assert queue.enqueue_ready_studies(stable_seconds=0, now=T0 + s(2)) == []
    assert [j.id for j in queue.list_jobs()] == [job_id]


# --- jobs: leases, retries ---------------------------------------------------------


def test_claim_takes_oldest_due_job_and_sets_the_lease(queue):
    first, second = ready_job(queue), ready_job(queue)
    job = queue.claim_next_job(worker="w1", lease_seconds=LEASE, now=T0)
    assert (job.id, job.state, job.worker, job.attempts) == (first, State.RUNNING, "w1", 1)
    assert job.lease_until == T0 + s(LEASE)
    assert job.log_context() == {"job_id": first, "study_uid": job.study_uid, "generation": 1}
    assert queue.claim_next_job(worker="w2", lease_seconds=LEASE, now=T0).id == second
    assert queue.claim_next_job(worker="w3", lease_seconds=LEASE, now=T0) is None


def test_expired_lease_is_reclaimed_and_the_stale_worker_cannot_finish(queue):
    job_id = ready_job(queue)
    queue.claim_next_job(worker="dead", lease_seconds=LEASE, now=T0)
    assert queue.claim_next_job(worker="w2", lease_seconds=LEASE, now=T0 + s(LEASE - 1)) is None

    job = queue.claim_next_job(worker="w2", lease_seconds=LEASE, now=T0 + s(LEASE + 1))
    assert (job.id, job.worker, job.attempts) == (job_id, "w2", 2)

    assert queue.heartbeat_job(job_id, worker="dead", lease_seconds=LEASE) is False
    with pytest.raises(LeaseLost, match=f"job {job_id} is not running under worker 'dead'"):
        queue.complete_job(
            job_id, worker="dead", result_path="/r.dcm", result_sop_instance_uid=new_uid(),
            detections=1, destinations=["pacs"],
        )
    with pytest.raises(LeaseLost):
        queue.fail_job(
            job_id, worker="dead", error="x", retryable=True, backoff_seconds=1, max_attempts=3
        )
    job = queue.get_job(job_id)
    assert (job.state, job.worker, job.deliveries) == (State.RUNNING, "w2", ())


def test_heartbeat_keeps_the_job_from_being_reclaimed(queue):
    job_id = ready_job(queue)
    queue.claim_next_job(worker="w1", lease_seconds=LEASE, now=T0)
    assert queue.heartbeat_job(job_id, worker="w1", lease_seconds=LEASE, now=T0 + s(50)) is True
    assert queue.claim_next_job(worker="w2", lease_seconds=LEASE, now=T0 + s(LEASE + 1)) is None
    assert queue.get_job(job_id).lease_until == T0 + s(50 + LEASE)


def test_retryable_failure_backs_off_exponentially_then_fails(queue):
    job_id = ready_job(queue)
    now = T0
    for attempt, delay in ((1, 30), (2, 60)):
        job = queue.claim_next_job(worker="w", lease_seconds=LEASE, now=now)
        assert (job.id, job.attempts) == (job_id, attempt)
        state = queue.fail_job(
            job_id, worker="w", error=f"busy {attempt}", retryable=True, backoff_seconds=30,
            max_attempts=3, now=now,
        )
        assert state == "pending"
        assert queue.claim_next_job(worker="w", lease_seconds=LEASE, now=now + s(delay - 1)) is None
        now += s(delay)
    assert queue.claim_next_job(worker="w", lease_seconds=LEASE, now=now).attempts == 3
    state = queue.fail_job(
        job_id, worker="w", error="busy 3", retryable=True, backoff_seconds=30, max_attempts=3, now=now
    )
    job = queue.get_job(job_id)
    assert state == job.state == State.FAILED
    assert job.error == "busy 3"
    assert queue.claim_next_job(worker="w", lease_seconds=LEASE, now=now + s(10**6)) is None


def test_permanent_failure_fails_at_once(queue):
    job_id = ready_job(queue)
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    state = queue.fail_job(
        job_id, worker="w", error="not a mammogram", retryable=False, backoff_seconds=30,
        max_attempts=3,
    )
    assert state == "failed"
    assert queue.get_job(job_id).attempts == 1


def test_job_whose_worker_keeps_dying_fails_after_max_attempts(queue):
    job_id = ready_job(queue)
    now = T0
    for _ in range(2):
        job = queue.claim_next_job(worker="w", lease_seconds=LEASE, max_attempts=2, now=now)
        assert job.id == job_id
        now += s(LEASE + 1)  # the worker died: its lease runs out
    assert queue.claim_next_job(worker="w", lease_seconds=LEASE, max_attempts=2, now=now) is None
    job = queue.get_job(job_id)
    assert job.state == State.FAILED
    assert "lease expired" in job.error


# --- completion and deliveries -----------------------------------------------------


def test_completion_stores_the_result_and_creates_one_delivery_per_destination(queue):
    job_id = ready_job(queue)
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    result_uid = new_uid()
    queue.complete_job(
        job_id, worker="w", result_path="/results/gsps.dcm", result_sop_instance_uid=result_uid,
        detections=2, destinations=["pacs", "archive", "pacs"], now=T0 + s(5),
    )
    job = queue.get_job(job_id)
    assert (job.state, job.result_path, job.result_sop_instance_uid, job.detections) == (
        State.DONE, "/results/gsps.dcm", result_uid, 2,
    )
    assert [(d.destination, d.state, d.path, d.sop_instance_uid) for d in job.deliveries] == [
        ("pacs", State.PENDING, "/results/gsps.dcm", result_uid),
        ("archive", State.PENDING, "/results/gsps.dcm", result_uid),
    ]
    claimed = queue.claim_next_delivery(worker="d1", lease_seconds=LEASE, now=T0 + s(5))
    assert (claimed.destination, claimed.attempts, claimed.worker) == ("pacs", 1, "d1")
    queue.complete_delivery(claimed.id, worker="d1")
    with pytest.raises(LeaseLost):
        queue.complete_delivery(claimed.id, worker="d1")
    assert [d.state for d in queue.get_job(job_id).deliveries] == [State.DONE, State.PENDING]


def test_delivery_backoff_is_capped_then_fails_with_the_reason(queue):
    job_id = ready_job(queue)
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    queue.complete_job(
        job_id, worker="w", result_path="/r.dcm", result_sop_instance_uid=new_uid(),
        detections=0, destinations=["pacs"], now=T0,
    )
    now, waits = T0, []
    while True:
        delivery = queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=now)
        state = queue.fail_delivery(
            delivery.id, worker="d", error="association rejected", retryable=True,
            backoff_seconds=10, max_backoff_seconds=25, max_attempts=4, now=now,
        )
        if state == "failed":
            break
        run_after = queue.get_job(job_id).deliveries[0].run_after
        waits.append((run_after - now).total_seconds())
        now = run_after
    assert waits == [10, 20, 25]
    (delivery,) = queue.get_job(job_id).deliveries
    assert (delivery.state, delivery.attempts) == (State.FAILED, 4)
    assert delivery.error == "association rejected"


def test_retry_job_revives_a_failed_job(queue):
    job_id = ready_job(queue)
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    queue.fail_job(
        job_id, worker="w", error="boom", retryable=False, backoff_seconds=1, max_attempts=3
    )
    assert queue.retry_job(job_id, now=T0 + s(1)) is True
    job = queue.get_job(job_id)
    assert (job.state, job.attempts) == (State.PENDING, 0)
    assert queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0 + s(1)).id == job_id
    assert queue.retry_job(job_id) is False  # running: nothing to retry
    assert queue.retry_job(987654) is False


def test_retry_job_redelivers_failed_deliveries_of_a_done_job(queue):
    job_id = ready_job(queue)
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    queue.complete_job(
        job_id, worker="w", result_path="/r.dcm", result_sop_instance_uid=new_uid(),
        detections=0, destinations=["pacs", "archive"], now=T0,
    )
    pacs = queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0)
    queue.fail_delivery(
        pacs.id, error="refused", retryable=False, backoff_seconds=1, max_backoff_seconds=1,
        max_attempts=5, now=T0,
    )
    archive = queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0)
    queue.complete_delivery(archive.id, now=T0)

    assert queue.retry_job(job_id, now=T0 + s(1)) is True
    job = queue.get_job(job_id)
    assert job.state == State.DONE
    assert [(d.destination, d.state, d.attempts) for d in job.deliveries] == [
        ("pacs", State.PENDING, 0),
        ("archive", State.DONE, 1),
    ]
    assert queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0 + s(1)).id == pacs.id


# --- listing and stats -------------------------------------------------------------


def test_list_jobs_filters_by_state_newest_first(queue):
    first, second, third = (ready_job(queue) for _ in range(3))
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    assert [j.id for j in queue.list_jobs()] == [third, second, first]
    assert [j.id for j in queue.list_jobs(state="pending")] == [third, second]
    assert [j.id for j in queue.list_jobs(state="running")] == [first]
    assert [j.id for j in queue.list_jobs(limit=1)] == [third]
    with pytest.raises(ValueError, match="nonsense"):
        queue.list_jobs(state="nonsense")
    assert queue.get_job(987654) is None


def test_stats_counts_states_oldest_pending_age_and_last_errors(queue):
    failed, delivered, _pending = ready_job(queue), ready_job(queue), ready_job(queue, now=T0 + s(10))
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    queue.fail_job(
        failed, worker="w", error="bad pixels", retryable=False, backoff_seconds=1, max_attempts=1,
        now=T0 + s(20),
    )
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    queue.complete_job(
        delivered, worker="w", result_path="/r.dcm", result_sop_instance_uid=new_uid(),
        detections=1, destinations=["pacs", "archive"], now=T0,
    )
    delivery = queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0)
    queue.fail_delivery(
        delivery.id, error="connection refused", retryable=True, backoff_seconds=5,
        max_backoff_seconds=5, max_attempts=3, now=T0 + s(30),
    )

    stats = queue.stats(now=T0 + s(100))
    assert stats["jobs"] == {"pending": 1, "running": 0, "done": 1, "failed": 1}
    assert stats["deliveries"] == {"pending": 2, "running": 0, "done": 0, "failed": 0}
    assert stats["oldest_pending_job_age_seconds"] == 90
    assert [(e["job_id"], e["destination"], e["error"], e["at"]) for e in stats["last_errors"]] == [
        (delivered, "pacs", "connection refused", T0 + s(30)),
        (failed, None, "bad pixels", T0 + s(20)),
    ]
    assert stats["last_errors"][1]["study_uid"] == queue.get_job(failed).study_uid
    assert len(queue.stats(last_errors=1)["last_errors"]) == 1


# --- what operators see: failed deliveries, delivery health, retry now ----------------


def done_job_with_deliveries(queue: Queue, destinations: list[str], *, now=T0) -> int:
    job_id = ready_job(queue, now=now)
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=now)
    queue.complete_job(
        job_id, worker="w", result_path="/r.dcm", result_sop_instance_uid=new_uid(),
        detections=0, destinations=destinations, now=now,
    )
    return job_id


def fail_next_delivery(queue: Queue, *, error: str, retryable: bool, now, backoff: float = 60) -> int:
    delivery = queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=now)
    queue.fail_delivery(
        delivery.id, error=error, retryable=retryable, backoff_seconds=backoff,
        max_backoff_seconds=backoff, max_attempts=5, now=now,
    )
    return delivery.id


def test_list_jobs_failed_includes_done_jobs_whose_delivery_failed(queue):
    failed_job = ready_job(queue)
    queue.claim_next_job(worker="w", lease_seconds=LEASE, now=T0)
    queue.fail_job(failed_job, worker="w", error="boom", retryable=False, backoff_seconds=1, max_attempts=1)
    undelivered = done_job_with_deliveries(queue, ["pacs"])
    fail_next_delivery(queue, error="rejected", retryable=False, now=T0)
    done_job_with_deliveries(queue, ["pacs"])  # delivered: not in the failed list
    queue.complete_delivery(queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0).id, now=T0)

    assert [j.id for j in queue.list_jobs(state="failed")] == [undelivered, failed_job]
    assert queue.get_job(undelivered).state == State.DONE


def test_delivery_stats_say_what_failed_what_is_retried_and_what_comes_next(queue):
    assert queue.delivery_stats(now=T0) == {
        "failed": 0, "retrying": 0, "latest_failed": None, "latest_retrying": None,
        "oldest_pending_age_seconds": None, "next_attempt": None,
    }
    refused = done_job_with_deliveries(queue, ["pacs"], now=T0)
    fail_next_delivery(queue, error="rejected permanent", retryable=False, now=T0 + s(1))
    down = done_job_with_deliveries(queue, ["archive"], now=T0 + s(2))
    fail_next_delivery(queue, error="cannot connect", retryable=True, now=T0 + s(3), backoff=60)
    waiting = done_job_with_deliveries(queue, ["viewer"], now=T0 + s(4))  # not tried yet

    stats = queue.delivery_stats(now=T0 + s(10))
    assert (stats["failed"], stats["retrying"]) == (1, 1)
    assert stats["latest_failed"] == {"job_id": refused, "destination": "pacs", "error": "rejected permanent",
                                      "at": T0 + s(1)}
    assert stats["latest_retrying"] == {"job_id": down, "destination": "archive", "error": "cannot connect",
                                        "at": T0 + s(3)}
    assert stats["oldest_pending_age_seconds"] == 8  # created at T0 + 2 s
    # Due first: the untried delivery (now), not the one backing off until T0 + 63 s.
    assert stats["next_attempt"] == {"job_id": waiting, "destination": "viewer", "at": T0 + s(4)}


def test_run_job_now_skips_the_backoff_of_pending_deliveries(queue):
    job_id = done_job_with_deliveries(queue, ["pacs"])
    fail_next_delivery(queue, error="cannot connect", retryable=True, now=T0, backoff=600)
    assert queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0 + s(1)) is None  # backing off

    assert queue.run_job_now(job_id, now=T0 + s(1)) == 1
    assert queue.claim_next_delivery(worker="d", lease_seconds=LEASE, now=T0 + s(1)).job_id == job_id
    assert queue.run_job_now(job_id, now=T0 + s(2)) == 0  # running now: nothing pending
    assert queue.run_job_now(987654) == 0


def test_sqlite_records_instances_on_its_driver_exactly_as_through_sqlalchemy(tmp_path):
    """record_instance runs on the sqlite3 connection itself (the SCP's hot path): the rows it
    writes are the ones SQLAlchemy's execution of the same statements writes, byte for byte."""
    import sqlite3

    def rows(path) -> dict[str, list[tuple]]:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            return {table: connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                    for table in ("studies", "instances")}

    study, other = new_uid(), new_uid()
    uids = [new_uid() for _ in range(3)]
    written = {}
    for driver in (True, False):
        path = tmp_path / f"driver-{driver}.sqlite"
        queue = Queue(f"sqlite:///{path}")
        queue.migrate()
        if not driver:
            queue._sqlite_recording = None  # SQLAlchemy's execution, as on PostgreSQL
        try:
            assert record(queue, study, now=T0, sop_instance_uid=uids[0])
            # A whole second (no microseconds), where the driver's own datetime text differs.
            assert record(queue, study, now=T0 + timedelta(seconds=1), sop_instance_uid=uids[1])
            assert not record(queue, study, now=T0 + timedelta(seconds=2), sop_instance_uid=uids[0])
            assert record(queue, other, now=T0 + timedelta(microseconds=7), sop_instance_uid=uids[2])
            assert [i.sop_instance_uid for i in queue.study_instances(study)] == uids[:2]
        finally:
            queue.close()
        written[driver] = rows(path)
    assert written[True] == written[False]
    assert [row[4] for row in written[True]["studies"] if row[0] == study] == [2]  # instance_count: not the duplicate
