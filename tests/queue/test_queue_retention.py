"""Retention's queue operations: which studies may go (delivered_studies) and removing one (purge_study).

A real SQLite file and a real PostgreSQL database per test (tests/queue/conftest.py). "Delivered" means: at least one
job, every job done, every job delivered and every delivery done, no instance since
the last enqueue. Nothing else is ever listed or removed.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from dicom_node.errors import QueueUnavailable
from dicom_node.queue import Queue, State
from tests.queue.queue_helpers import T0, analyse, deliver, new_uid, record

H = timedelta(hours=1)


def delivered_study(queue, *, at, destinations=("pacs",), instances=2) -> str:
    """A study received before `at`, analysed and delivered to every destination at `at`."""
    study_uid = new_uid()
    for _ in range(instances):
        record(queue, study_uid, now=at - H)
    analyse(queue, study_uid, now=at, destinations=destinations)
    deliver(queue, now=at)
    return study_uid


def listed(queue, **kwargs) -> list[str]:
    return [study.study_uid for study in queue.delivered_studies(**kwargs)]


def row_counts(queue, study_uid: str) -> dict:
    instances = queue.study_instances(study_uid)
    jobs = [job for job in queue.list_jobs(limit=1000) if job.study_uid == study_uid]
    return {"instances": len(instances), "jobs": len(jobs), "deliveries": sum(len(j.deliveries) for j in jobs)}


def test_a_fully_delivered_study_is_listed_with_when_its_last_delivery_was_done(queue):
    study_uid = new_uid()
    record(queue, study_uid, now=T0)
    analyse(queue, study_uid, now=T0 + H, destinations=["pacs", "archive"])
    assert listed(queue) == []  # analysed, not yet delivered
    deliver(queue, now=T0 + 2 * H)
    (study,) = queue.delivered_studies()
    assert (study.study_uid, study.delivered_at) == (study_uid, T0 + 2 * H)


def _pending_job(queue, study_uid):
    record(queue, study_uid, now=T0)
    queue.enqueue_ready_studies(stable_seconds=0, now=T0 + H)


def _running_job(queue, study_uid):
    _pending_job(queue, study_uid)
    queue.claim_next_job(worker="w", lease_seconds=600, now=T0 + H)


def _failed_job(queue, study_uid):
    _running_job(queue, study_uid)
    (job,) = queue.list_jobs()
    queue.fail_job(job.id, worker="w", error="corrupt", retryable=False, backoff_seconds=1, max_attempts=1,
                   now=T0 + H)


def _pending_delivery(queue, study_uid):
    record(queue, study_uid, now=T0)
    analyse(queue, study_uid, now=T0 + H)


def _running_delivery(queue, study_uid):
    _pending_delivery(queue, study_uid)
    queue.claim_next_delivery(worker="d", lease_seconds=600, now=T0 + H)


def _one_destination_failed(queue, study_uid):
    record(queue, study_uid, now=T0)
    analyse(queue, study_uid, now=T0 + H, destinations=["pacs", "archive"])
    deliver(queue, now=T0 + H, fail=("archive",))


def _no_destination(queue, study_uid):
    # The result file is the only copy there is: nothing was delivered anywhere.
    record(queue, study_uid, now=T0)
    analyse(queue, study_uid, now=T0 + H, destinations=[])


def _instance_after_enqueue(queue, study_uid):
    record(queue, study_uid, now=T0)
    analyse(queue, study_uid, now=T0 + H)
    deliver(queue, now=T0 + H)
    record(queue, study_uid, now=T0 + 2 * H)  # not yet enqueued: its analysis is still to come


def _second_generation_pending(queue, study_uid):
    _instance_after_enqueue(queue, study_uid)
    queue.enqueue_ready_studies(stable_seconds=0, now=T0 + 3 * H)


def _second_generation_undelivered(queue, study_uid):
    _instance_after_enqueue(queue, study_uid)
    analyse(queue, study_uid, now=T0 + 3 * H)


@pytest.mark.parametrize(
    "make",
    [_pending_job, _running_job, _failed_job, _pending_delivery, _running_delivery, _one_destination_failed,
     _no_destination, _instance_after_enqueue, _second_generation_pending, _second_generation_undelivered],
)
def test_nothing_unfinished_is_ever_listed_or_removed(queue, make):
    study_uid = new_uid()
    make(queue, study_uid)
    before = row_counts(queue, study_uid)
    later = T0 + timedelta(days=365)
    assert listed(queue) == []
    assert listed(queue, delivered_before=later) == []
    assert queue.purge_study(study_uid, remove_files=lambda *paths: pytest.fail("removed files")) is None
    assert queue.purge_study(study_uid, delivered_before=later, remove_files=lambda *p: 1 / 0) is None
    assert row_counts(queue, study_uid) == before


def test_two_delivered_generations_count_from_the_later_delivery(queue):
    study_uid = new_uid()
    record(queue, study_uid, now=T0)
    analyse(queue, study_uid, now=T0 + H)
    deliver(queue, now=T0 + H)
    record(queue, study_uid, now=T0 + 2 * H)
    analyse(queue, study_uid, now=T0 + 3 * H)
    deliver(queue, now=T0 + 4 * H)
    (study,) = queue.delivered_studies()
    assert study.delivered_at == T0 + 4 * H
    assert listed(queue, delivered_before=T0 + 4 * H - timedelta(seconds=1)) == []
    assert listed(queue, delivered_before=T0 + 4 * H) == [study_uid]


def test_listed_longest_delivered_first_and_cut_at_delivered_before(queue):
    newer = delivered_study(queue, at=T0 + 5 * H)
    older = delivered_study(queue, at=T0 + 2 * H)
    newest = delivered_study(queue, at=T0 + 9 * H)
    assert listed(queue) == [older, newer, newest]
    assert listed(queue, delivered_before=T0 + 5 * H) == [older, newer]
    assert listed(queue, limit=1) == [older]


def test_purge_study_removes_every_row_of_the_study_and_hands_over_its_files(queue):
    removed = delivered_study(queue, at=T0 + H, destinations=["pacs", "archive"], instances=3)
    kept = delivered_study(queue, at=T0 + H)
    paths = sorted(i.path for i in queue.study_instances(removed))
    (job,) = [j for j in queue.list_jobs() if j.study_uid == removed]
    seen = []

    outcome = queue.purge_study(removed, remove_files=lambda i, r: seen.append((sorted(i), r)) or "removed")

    assert outcome == "removed"
    assert seen == [(paths, [job.result_path])]  # the deliveries name the same result file
    assert row_counts(queue, removed) == {"instances": 0, "jobs": 0, "deliveries": 0}
    assert queue.get_job(job.id) is None
    assert row_counts(queue, kept) == {"instances": 2, "jobs": 1, "deliveries": 1}
    assert listed(queue) == [kept]
    # The study row went too: the same study sent again starts afresh (counted, analysed).
    record(queue, removed, now=T0 + 2 * H)
    assert queue.enqueue_ready_studies(stable_seconds=0, now=T0 + 3 * H)


def test_a_study_that_gets_an_instance_after_being_listed_is_not_removed(queue):
    # The SCP records a new instance between retention's listing and its removal: the
    # check inside the removal's transaction sees it and removes nothing.
    study_uid = delivered_study(queue, at=T0 + H)
    assert listed(queue) == [study_uid]
    record(queue, study_uid, now=T0 + 2 * H)

    assert queue.purge_study(study_uid, remove_files=lambda *paths: pytest.fail("removed files")) is None
    assert row_counts(queue, study_uid) == {"instances": 3, "jobs": 1, "deliveries": 1}


@pytest.mark.sqlite_only  # SQLite's one write lock; the study row lock below holds on both
def test_files_are_removed_while_the_write_lock_is_held(queue, database_url):
    # The SCP commits an instance row in its own BEGIN IMMEDIATE; while the removal deletes
    # files, no other connection can start a write, so none can commit a row for this study.
    study_uid = delivered_study(queue, at=T0 + H)
    path = database_url.removeprefix("sqlite:///")
    attempts = []

    def remove_files(instance_paths, result_paths):
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            attempts.append("got the write lock")
        except sqlite3.OperationalError as error:
            attempts.append(str(error))
        finally:
            other.close()
        return len(instance_paths)

    assert queue.purge_study(study_uid, remove_files=remove_files) == 2
    assert attempts == ["database is locked"]
    # After the commit the lock is free again.
    record(queue, new_uid(), now=T0 + 2 * H)


def test_no_instance_of_the_study_is_recorded_while_its_files_are_removed(queue, database_url):
    # Another process (the SCP) recording a new instance of the study waits for the
    # removal's commit: past its busy timeout, it answers "later" instead.
    study_uid = delivered_study(queue, at=T0 + H)
    scp = Queue(database_url, busy_timeout_seconds=0.2)
    outcomes = []

    def remove_files(instance_paths, result_paths):
        try:
            record(scp, study_uid, now=T0 + 2 * H)
            outcomes.append("recorded")
        except QueueUnavailable as error:
            outcomes.append(error.kind)
        return len(instance_paths)

    try:
        assert queue.purge_study(study_uid, remove_files=remove_files) == 2
        assert outcomes == ["locked by another process"]
        assert record(scp, study_uid, now=T0 + 2 * H)  # after the commit: a new study row
    finally:
        scp.close()
    assert row_counts(queue, study_uid) == {"instances": 1, "jobs": 0, "deliveries": 0}


def test_a_failed_file_removal_keeps_every_row(queue):
    study_uid = delivered_study(queue, at=T0 + H)

    def remove_files(instance_paths, result_paths):
        raise PermissionError(13, "Permission denied", instance_paths[0])

    with pytest.raises(PermissionError):
        queue.purge_study(study_uid, remove_files=remove_files)
    assert row_counts(queue, study_uid) == {"instances": 2, "jobs": 1, "deliveries": 1}
    assert listed(queue) == [study_uid]
    assert all(j.state == State.DONE for j in queue.list_jobs())
