"""Several processes on one database, as in the node (SCP, scheduler, workers): no double work.

Each child is a real spawned process with its own Queue (own engine, own connections);
a barrier starts them together so that their transactions really overlap. The tests
taking `queue` run on SQLite and on PostgreSQL, where they are what the row locks
(FOR UPDATE SKIP LOCKED, see queue/backends.py) are for: without them, two workers
claim the same job and two schedulers make the same study's job twice.
"""

from __future__ import annotations

import multiprocessing
import threading
import traceback
from datetime import timedelta

from dicom_node.queue import Queue, State
from tests.queue.queue_helpers import T0, new_uid, record

PROCESSES = 3
TIMEOUT = 60


def _claim_until_empty(queue: Queue, worker: str) -> list[int]:
    claimed = []
    while (job := queue.claim_next_job(worker=worker, lease_seconds=600)) is not None:
        queue.complete_job(
            job.id, worker=worker, result_path=f"/r/{job.id}.dcm", result_sop_instance_uid=new_uid(),
            detections=0, destinations=["pacs"],
        )
        claimed.append(job.id)
    return claimed


def _enqueue_repeatedly(queue: Queue, worker: str) -> list[int]:
    return [job_id for _ in range(5) for job_id in queue.enqueue_ready_studies(stable_seconds=0)]


def _migrate(queue: Queue, worker: str) -> list[int]:
    queue.migrate()
    return []


def _reclaim_until_empty(queue: Queue, worker: str) -> list[int]:
    """Claim (at a time when every lease has run out) until nothing is left."""
    later = T0 + timedelta(hours=1)
    claimed = []
    while (job := queue.claim_next_job(worker=worker, lease_seconds=600, max_attempts=5, now=later)) is not None:
        claimed.append(job.id)
    return claimed


OPERATIONS = {
    "claim": _claim_until_empty,
    "enqueue": _enqueue_repeatedly,
    "migrate": _migrate,
    "reclaim": _reclaim_until_empty,
}


def _child(database_url: str, operation: str, worker: str, barrier, results) -> None:
    try:
        queue = Queue(database_url)
        barrier.wait(TIMEOUT)
        results.put((worker, OPERATIONS[operation](queue, worker), None))
        queue.close()
    except BaseException:
        results.put((worker, [], traceback.format_exc()))


def run_in_processes(database_url: str, operation: str) -> dict[str, list[int]]:
    """Run `operation` in PROCESSES spawned processes at once; returns each one's job ids."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [
        context.Process(target=_child, args=(database_url, operation, f"w{i}", barrier, results))
        for i in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=TIMEOUT) for _ in processes]
    finally:
        for process in processes:
            process.join(TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join()
    errors = [error for _worker, _ids, error in outcomes if error]
    assert not errors, errors[0]
    return {worker: ids for worker, ids, _error in outcomes}


def test_concurrent_workers_claim_every_job_exactly_once(queue, database_url):
    for _ in range(40):
        record(queue, new_uid(), now=T0)
    job_ids = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    assert len(job_ids) == 40

    claimed = run_in_processes(database_url, "claim")

    every_claim = [job_id for ids in claimed.values() for job_id in ids]
    assert sorted(every_claim) == sorted(job_ids)
    jobs = queue.list_jobs(limit=100)
    assert {(j.state, j.attempts, len(j.deliveries)) for j in jobs} == {(State.DONE, 1, 1)}
    assert all(j.worker in claimed and j.id in claimed[j.worker] for j in jobs)


def test_concurrent_enqueue_creates_one_job_per_study(queue, database_url):
    studies = [new_uid() for _ in range(20)]
    for study in studies:
        record(queue, study, now=T0)

    created = run_in_processes(database_url, "enqueue")

    every_job = [job_id for ids in created.values() for job_id in ids]
    assert len(every_job) == len(set(every_job)) == len(studies)
    jobs = queue.list_jobs(limit=100)
    assert sorted(j.study_uid for j in jobs) == sorted(studies)
    assert {j.generation for j in jobs} == {1}


def test_dead_workers_jobs_are_reclaimed_once_each_by_concurrent_workers(queue, database_url):
    for _ in range(30):
        record(queue, new_uid(), now=T0)
    job_ids = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    while queue.claim_next_job(worker="dead", lease_seconds=60, now=T0) is not None:
        pass  # a worker that then died: every lease runs out at T0 + 60 s

    reclaimed = run_in_processes(database_url, "reclaim")

    every_claim = [job_id for ids in reclaimed.values() for job_id in ids]
    assert sorted(every_claim) == sorted(job_ids)
    jobs = queue.list_jobs(limit=100)
    assert {(j.state, j.attempts) for j in jobs} == {(State.RUNNING, 2)}
    assert all(j.worker in reclaimed and j.id in reclaimed[j.worker] for j in jobs)


def test_concurrent_migrations_on_a_fresh_database(request, backend, tmp_path):
    # SQLite: a file (and folder) not there yet; PostgreSQL: an empty database.
    database_url = (request.getfixturevalue("postgres_url") if backend == "postgresql"
                    else f"sqlite:///{tmp_path / 'fresh' / 'queue.sqlite'}")
    run_in_processes(database_url, "migrate")
    queue = Queue(database_url)
    try:
        assert record(queue, new_uid(), now=T0) is True
    finally:
        queue.close()


def test_threads_recording_the_same_instances_store_each_once(queue):
    # The SCP handles associations in threads sharing one Queue; a modality may
    # re-send the same instances on two associations at once.
    study, sops = new_uid(), [new_uid() for _ in range(30)]
    outcomes: list[bool] = []

    def send_all() -> None:
        outcomes.extend(record(queue, study, sop_instance_uid=sop, now=T0) for sop in sops)

    threads = [threading.Thread(target=send_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert outcomes.count(True) == len(sops) and len(outcomes) == 4 * len(sops)
    assert sorted(i.sop_instance_uid for i in queue.study_instances(study)) == sorted(sops)
    (job_id,) = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    assert queue.get_job(job_id).generation == 1
