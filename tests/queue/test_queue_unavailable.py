"""Database trouble as the queue reports it: one exception, naming the file and the kind.

Provoked for real: another process holding the write lock, a full filesystem (tmpfs),
files that are not SQLite databases. A corrupt file stops whoever opens the queue with
a config error that says how to recover.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from types import SimpleNamespace

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine

from dicom_node.errors import ConfigError, QueueUnavailable, RetryableError
from dicom_node.queue import Queue, State
from dicom_node.queue.ops import MIGRATIONS, busy_timeout_for_peer
from tests.queue.queue_helpers import T0, new_uid, record
from tests.sqlite_faults import WriteLock


def test_a_write_waits_its_busy_timeout_then_raises_queue_unavailable(tmp_path):
    path = tmp_path / "queue.sqlite"
    queue = Queue(f"sqlite:///{path}", busy_timeout_seconds=0.5)
    queue.migrate()
    study = new_uid()
    try:
        with WriteLock(path):
            started = time.monotonic()
            with pytest.raises(QueueUnavailable) as raised:
                record(queue, study, now=T0)
            waited = time.monotonic() - started
        assert 0.4 <= waited < 5, waited
        error = raised.value
        assert error.kind == "locked by another process"
        assert str(error) == f"job database {path} unavailable: locked by another process"
        assert error.__cause__ is None and error.__suppress_context__  # no SQL, no values chained
        assert isinstance(error, RetryableError)  # whoever catches it answers "later"

        record(queue, study, now=T0)  # the lock is gone: the same write goes through
        assert [i.study_uid for i in queue.study_instances(study)] == [study]
    finally:
        queue.close()


def test_a_full_disk_at_commit_raises_queue_unavailable_and_writes_resume_when_space_is_back(
    tmp_path, small_filesystem
):
    disk = small_filesystem(tmp_path / "disk", size="4m")
    queue = Queue(f"sqlite:///{disk.path / 'queue.sqlite'}")
    queue.migrate()
    try:
        record(queue, new_uid(), now=T0)
        disk.fill()
        study = new_uid()
        with pytest.raises(QueueUnavailable) as raised:
            record(queue, study, now=T0)
        assert raised.value.kind == "disk full"
        assert queue.study_instances(study) == []  # nothing half-committed; reads still work

        disk.free()
        record(queue, study, now=T0)
        assert len(queue.study_instances(study)) == 1
        assert queue.stats()["instances"]["total"] == 2
    finally:
        queue.close()


def _damaged(tmp_path, how: str):
    good = tmp_path / "good.sqlite"
    queue = Queue(f"sqlite:///{good}")
    queue.migrate()
    for _ in range(300):
        record(queue, new_uid(), now=T0)
    queue.close()
    path = tmp_path / "dicom-node.sqlite"
    if how == "garbage":
        path.write_bytes(b"this is not a database\n" * 400)
    elif how == "truncated":
        shutil.copy(good, path)
        os.truncate(path, good.stat().st_size // 2)
    elif how == "damaged page":
        shutil.copy(good, path)
        with open(path, "r+b") as file:
            file.seek(good.stat().st_size // 2)
            file.write(b"\xff" * 4096)
    elif how == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("how", ["garbage", "truncated", "damaged page", "directory"])
def test_an_unusable_database_file_is_a_config_error_saying_how_to_recover(tmp_path, how):
    path = _damaged(tmp_path, how)
    queue = Queue(f"sqlite:///{path}")
    try:
        with pytest.raises(ConfigError) as raised:
            queue.migrate()
    finally:
        queue.close()
    message = str(raised.value)
    assert message.startswith(f"node.data_dir: {path} is not a readable SQLite database (")
    assert "move it away (with its -wal and -shm files) and start again" in message
    assert f"recorded again from {tmp_path / 'instances'}" in message
    assert "\n" not in message and "SELECT" not in message


def test_a_sound_database_passes_the_check_and_the_lock_is_not_a_config_error(tmp_path, queue):
    queue.check_database()  # the fixture's migrated file: no error
    path = tmp_path / "queue.sqlite"
    slow = Queue(f"sqlite:///{path}", busy_timeout_seconds=0.2)
    try:
        with WriteLock(path), pytest.raises(QueueUnavailable, match="locked"):
            slow.migrate()  # waiting may help: not a config error
    finally:
        slow.close()


def test_the_scp_lock_wait_is_a_fraction_of_the_network_timeout_and_capped():
    assert busy_timeout_for_peer(60) == 5
    assert busy_timeout_for_peer(8) == 2
    assert busy_timeout_for_peer(1) == 0.25


def test_every_job_gets_its_own_analysis_key(queue):
    for _ in range(3):
        record(queue, new_uid(), now=T0)
    created = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    keys = [queue.get_job(job_id).analysis_key for job_id in created]
    assert len(set(keys)) == 3 and all(len(key) == 32 for key in keys)


def database_at_revision(path, revision: str):
    """A SQLite job table migrated up to `revision` only, as an older node left it."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()
    return path


def test_migration_0003_gives_existing_jobs_distinct_analysis_keys(tmp_path):
    path = database_at_revision(tmp_path / "old.sqlite", "0002")
    with sqlite3.connect(path) as raw:
        for n in (1, 2):
            raw.execute(f"INSERT INTO studies VALUES ('1.2.{n}', '2025-01-01 00:00:00', '2025-01-01 00:00:00', "
                        "NULL, 1, 1)")
            raw.execute("INSERT INTO jobs (study_uid, generation, state, attempts, run_after, created_at, "
                        f"updated_at) VALUES ('1.2.{n}', 1, 'pending', 0, '2025-01-01 00:00:00', "
                        "'2025-01-01 00:00:00', '2025-01-01 00:00:00')")
    queue = Queue(f"sqlite:///{path}")
    try:
        queue.migrate()
        keys = {job.analysis_key for job in queue.list_jobs()}
    finally:
        queue.close()
    assert len(keys) == 2 and all(key and len(key) == 32 for key in keys)


def test_migration_0004_keeps_deliveries_as_gsps_deliveries_and_allows_other_outputs(tmp_path):
    path = database_at_revision(tmp_path / "old.sqlite", "0003")
    stamp = "'2025-01-01 00:00:00'"
    with sqlite3.connect(path) as raw:
        raw.execute(f"INSERT INTO studies VALUES ('1.2.1', {stamp}, {stamp}, NULL, 1, 1)")
        raw.execute("INSERT INTO jobs (study_uid, generation, state, attempts, run_after, created_at, updated_at, "
                    f"result_path, result_sop_instance_uid) VALUES ('1.2.1', 1, 'done', 1, {stamp}, {stamp}, "
                    f"{stamp}, '/r/g.dcm', '1.2.9')")
        raw.execute("INSERT INTO deliveries (job_id, destination, path, sop_instance_uid, state, attempts, "
                    f"run_after, created_at, updated_at) VALUES (1, 'pacs', '/r/g.dcm', '1.2.9', 'pending', 0, "
                    f"{stamp}, {stamp}, {stamp})")
    queue = Queue(f"sqlite:///{path}")
    try:
        queue.migrate()
        (delivery,) = queue.get_job(1).deliveries
        assert (delivery.destination, delivery.output, delivery.path, delivery.state) == (
            "pacs", "gsps", "/r/g.dcm", "pending")
    finally:
        queue.close()
    with sqlite3.connect(path) as raw:  # the widened constraint: one row per job, destination, output
        raw.execute("INSERT INTO deliveries (job_id, destination, output, path, sop_instance_uid, state, "
                    f"attempts, run_after, created_at, updated_at) VALUES (1, 'pacs', 'sr', '/r/s.dcm', '1.2.8', "
                    f"'pending', 0, {stamp}, {stamp}, {stamp})")
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute("INSERT INTO deliveries (job_id, destination, output, path, sop_instance_uid, state, "
                        f"attempts, run_after, created_at, updated_at) VALUES (1, 'pacs', 'sr', '/r/s.dcm', "
                        f"'1.2.8', 'pending', 0, {stamp}, {stamp}, {stamp})")


def test_a_restored_report_is_resent_only_to_destinations_that_take_reports(queue):
    study = new_uid()
    sops = [new_uid() for _ in range(2)]
    for sop in sops:
        record(queue, study, now=T0, sop_instance_uid=sop)
    gsps, report = new_uid(), new_uid()
    restored = queue.restore_delivered(
        study, [_delivered(sops, uid=gsps, destinations=["pacs"]),
                SimpleNamespace(**vars(_delivered(sops, uid=report, destinations=["ohif"])), output="sr")],
        resend_to={"pacs": ["gsps"], "ohif": ["sr"], "archive": ["gsps", "sr"]}, now=T0,
    )
    gsps_job, report_job = (queue.get_job(job_id) for job_id in restored)
    assert {(d.destination, d.output, d.state) for d in gsps_job.deliveries} == {
        ("pacs", "gsps", State.DONE), ("archive", "gsps", State.PENDING)}
    assert {(d.destination, d.output, d.state) for d in report_job.deliveries} == {
        ("ohif", "sr", State.DONE), ("archive", "sr", State.PENDING)}


# --- rebuilt database: delivered results restored, and an operator's rerun ----------


def _delivered(sops, *, uid, destinations, at=T0):
    return SimpleNamespace(result_sop_instance_uid=uid, result_path=f"/results/{uid}.dcm",
                           sop_instance_uids=tuple(sops), delivered={d: at for d in destinations})


def test_restored_results_are_done_jobs_and_only_uncovered_instances_make_a_new_job(queue):
    study = new_uid()
    sops = [new_uid() for _ in range(3)]
    for sop in sops:
        record(queue, study, now=T0, sop_instance_uid=sop)
    first, second = new_uid(), new_uid()

    restored = queue.restore_delivered(
        study, [_delivered(sops[:1], uid=first, destinations=["pacs"]),
                _delivered(sops[:2], uid=second, destinations=["pacs", "archive"])],
        resend_to=["pacs", "archive"], now=T0,
    )

    jobs = [queue.get_job(job_id) for job_id in restored]
    assert [(j.generation, j.state, j.result_sop_instance_uid) for j in jobs] == [
        (1, State.DONE, first), (2, State.DONE, second)]
    assert {(d.destination, d.state) for d in jobs[0].deliveries} == {("pacs", State.DONE),
                                                                       ("archive", State.PENDING)}
    assert {(d.destination, d.state) for d in jobs[1].deliveries} == {("pacs", State.DONE),
                                                                       ("archive", State.DONE)}
    # sops[2] is covered by no delivered result: the study is analysed again, once.
    (again,) = queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    assert queue.get_job(again).generation == 3
    assert queue.enqueue_ready_studies(stable_seconds=0, now=T0) == []
    # A study that has jobs keeps its database record.
    assert queue.restore_delivered(study, [_delivered(sops, uid=new_uid(), destinations=["pacs"])]) == []


def test_fully_covered_study_gets_no_job_and_rerun_queues_one_with_a_new_key(queue):
    study = new_uid()
    sops = [new_uid() for _ in range(2)]
    for sop in sops:
        record(queue, study, now=T0, sop_instance_uid=sop)
    (restored,) = queue.restore_delivered(study, [_delivered(sops, uid=new_uid(), destinations=["pacs"])], now=T0)
    assert queue.enqueue_ready_studies(stable_seconds=0, now=T0) == []

    job, instances = queue.rerun_study(study, now=T0)

    assert (job.state, job.generation, instances) == (State.PENDING, 2, 2)
    assert job.analysis_key != queue.get_job(restored).analysis_key
    assert queue.rerun_study(study, now=T0)[0].id == job.id  # still pending: the same job
    assert queue.enqueue_ready_studies(stable_seconds=0, now=T0) == []  # no second job
    assert queue.rerun_study(new_uid()) is None
