"""Retention against a real data_dir: real instance and result files, a real SQLite queue.

Only studies whose every job is done and every delivery done are removed, rows and
files together; by age, by disk space (oldest delivered first), or by the operator.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from structlog.testing import capture_logs

from dicom_node.ops.retention import (
    Reason,
    format_purge,
    purge,
    retention_pass,
    run_retention,
)
from dicom_node.queue import Queue
from dicom_node.store import InstanceStore, reconcile
from tests import synthetic
from tests.ops.conftest import node_config
from tests.queue.queue_helpers import record

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)
PHI = (synthetic.FAKE_PATIENT_NAME, synthetic.FAKE_PATIENT_ID, synthetic.FAKE_BIRTH_DATE, synthetic.FAKE_ACCESSION)


def rows(queue: Queue, study_uid: str) -> tuple[int, int]:
    return (len(queue.study_instances(study_uid)),
            len([job for job in queue.list_jobs(limit=1000) if job.study_uid == study_uid]))


def assert_gone(queue, study) -> None:
    assert rows(queue, study.study_uid) == (0, 0)
    assert [path for path in study.files if path.exists()] == []
    assert not study.folder.exists()  # its series and study folders went with the last file


def assert_kept(queue, study) -> None:
    assert rows(queue, study.study_uid) == (len(study.instance_paths), 1)
    assert all(path.exists() for path in study.files)


def test_age_removes_rows_files_and_folders_of_studies_delivered_long_enough_ago(
        data_dir, store, queue, make_study):
    config = node_config(data_dir, keep_delivered_for="7d")
    old = make_study(NOW - 8 * DAY, series=2, per_series=2)
    recent = make_study(NOW - 6 * DAY)
    failed = make_study(NOW - 300 * DAY, fail=("pacs",))  # the PACS refused: never delivered
    pending = make_study(NOW - 300 * DAY, send=False)  # still waiting for the PACS
    expected_bytes = old.bytes

    with capture_logs() as logs:
        run = retention_pass(queue, store, config, now=NOW)

    (purged,) = run.purged
    assert (purged.study_uid, purged.reason, purged.delivered_at) == (old.study_uid, Reason.AGE, NOW - 8 * DAY)
    assert (purged.instances, purged.results, purged.bytes) == (4, 1, expected_bytes)
    assert_gone(queue, old)
    for study in (recent, failed, pending):
        assert_kept(queue, study)
    (event,) = [e for e in logs if e["event"] == "study_purged"]
    assert event == {"event": "study_purged", "log_level": "info", "study_uid": old.study_uid, "reason": "age",
                     "instances": 4, "results": 1, "bytes": expected_bytes,
                     "delivered_at": (NOW - 8 * DAY).isoformat()}
    assert not any(value in str(logs) for value in PHI)
    # Files and rows still agree: the next start finds nothing missing and nothing unrecorded.
    reconciled = reconcile(store, queue)
    assert (reconciled.missing, reconciled.recorded, reconciled.unrecognised) == ([], [], [])


def test_a_delivered_folder_of_captures_is_removed_with_its_study(data_dir, store, queue, make_study):
    study = make_study(NOW - 8 * DAY, series=1, captures=2)
    folder = study.capture_paths[0].parent
    expected_bytes = study.bytes

    (purged,) = retention_pass(queue, store, node_config(data_dir, keep_delivered_for="7d"), now=NOW).purged

    assert (purged.instances, purged.results, purged.bytes) == (1, 3, expected_bytes)  # the GSPS, 2 captures
    assert_gone(queue, study)
    assert not folder.exists()
    assert store.results_dir.is_dir()


def test_a_file_without_a_row_keeps_its_folder(data_dir, store, queue, make_study, tmp_path):
    # The SCP renames a new instance into the study's series folder, then waits for the write
    # lock the removal holds: its file is not one the rows name, so it stays, with its folders.
    config = node_config(data_dir, keep_delivered_for="1d")
    study = make_study(NOW - 2 * DAY, series=1)
    series_uid = study.instance_paths[0].parent.name
    ds = synthetic.mammogram(study_uid=study.study_uid, series_uid=series_uid, rows=32, columns=32)
    arriving = store.persist_instance(synthetic.write(ds, tmp_path / "new.dcm"), study_uid=study.study_uid,
                                      series_uid=series_uid, sop_instance_uid=ds.SOPInstanceUID)

    (purged,) = retention_pass(queue, store, config, now=NOW).purged

    assert purged.instances == 1
    assert [path.exists() for path in study.files] == [False, False]
    assert arriving.exists()


def test_files_outside_the_data_dir_are_never_deleted(data_dir, store, queue, make_study, tmp_path):
    outside = synthetic.write(synthetic.mammogram(rows=16, columns=16), tmp_path / "elsewhere" / "x.dcm")
    study = make_study(NOW - 2 * DAY, series=1)
    record(queue, study.study_uid, now=NOW - 2 * DAY - timedelta(hours=1), sop_instance_uid=None)
    queue.close()
    # A row naming a file outside instances/ (edited by hand): the row may go, the file stays.
    with sqlite3.connect(data_dir / "dicom-node.sqlite") as db:
        db.execute("UPDATE instances SET path = ? WHERE path LIKE '/data/%'", (str(outside),))
        db.execute("UPDATE studies SET enqueued_instance_count = instance_count")

    (purged,) = retention_pass(queue, store, node_config(data_dir, keep_delivered_for="1d"), now=NOW).purged

    assert (purged.study_uid, purged.instances) == (study.study_uid, 2)
    assert outside.exists()
    assert not study.folder.exists()


def used_bytes(data_dir: Path) -> int:
    """Bytes of the instance and result files (the SQLite files left out: their size varies)."""
    return sum(path.stat().st_size for folder in ("instances", "results")
               for path in (data_dir / folder).rglob("*") if path.is_file())


class SmallDisk(InstanceStore):
    """data_dir on a disk of `capacity` bytes: free space is what its real files leave."""

    def __init__(self, data_dir: Path, capacity: int):
        super().__init__(data_dir)
        self.capacity = capacity

    def free_bytes(self) -> int:
        return self.capacity - used_bytes(self.data_dir)


def test_disk_pressure_removes_the_longest_delivered_first_until_free_space_is_back(
        data_dir, store, queue, make_study):
    # Every study is younger than keep_delivered_for: only the disk level removes anything.
    config = node_config(data_dir, keep_delivered_for="30d", min_free_megabytes=1)
    level = 1024 * 1024
    undelivered = make_study(NOW - 20 * DAY, send=False, rows=256)
    second = make_study(NOW - 3 * DAY, rows=256)
    first = make_study(NOW - 4 * DAY, rows=256)
    third = make_study(NOW - 2 * DAY, rows=256)
    # Free space a little under the level: removing `first` alone is not enough, `second` is.
    small = SmallDisk(data_dir, capacity=used_bytes(data_dir) + level - first.bytes - 1000)
    assert small.free_bytes() < level

    run = retention_pass(queue, small, config, now=NOW)

    assert [(p.study_uid, p.reason) for p in run.purged] == [
        (first.study_uid, Reason.DISK_SPACE), (second.study_uid, Reason.DISK_SPACE)]
    assert small.free_bytes() >= level and not run.below_level
    assert_gone(queue, first)
    assert_gone(queue, second)
    assert_kept(queue, third)
    assert_kept(queue, undelivered)


def test_disk_pressure_never_removes_anything_undelivered(data_dir, store, queue, make_study):
    # A level far above the real free space: every delivered study goes, nothing else.
    config = node_config(data_dir, keep_delivered_for="30d", min_free_megabytes=10**12)
    delivered = [make_study(NOW - DAY), make_study(NOW - 2 * DAY)]
    failed = make_study(NOW - 100 * DAY, fail=("pacs",))
    pending = make_study(NOW - 100 * DAY, send=False)

    run = retention_pass(queue, store, config, now=NOW)

    assert sorted(p.study_uid for p in run.purged) == sorted(s.study_uid for s in delivered)
    assert {p.reason for p in run.purged} == {Reason.DISK_SPACE}
    assert run.below_level
    for study in delivered:
        assert_gone(queue, study)
    assert_kept(queue, failed)
    assert_kept(queue, pending)


def _crash_while_removing(database_url: str, data_dir: str, study_uid: str) -> None:
    """Child process: start removing the study, delete one file, die before the commit."""
    queue, store = Queue(database_url), InstanceStore(Path(data_dir))

    def remove_then_die(instance_paths, result_paths):
        store.remove_files(instance_paths[:1])
        os._exit(3)  # a crash (power loss, SIGKILL) between the file deletion and the commit

    queue.purge_study(study_uid, remove_files=remove_then_die)


def test_a_crash_in_the_middle_of_a_removal_loses_nothing_undelivered_and_is_completed_later(
        data_dir, store, queue, make_study):
    config = node_config(data_dir, keep_delivered_for="1d")
    doomed = make_study(NOW - 2 * DAY, series=2)
    undelivered = make_study(NOW - 30 * DAY, send=False)
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_while_removing, args=(f"sqlite:///{data_dir / 'dicom-node.sqlite'}", str(data_dir),
                                             doomed.study_uid))
    child.start()
    child.join(120)
    assert child.exitcode == 3

    # Rolled back: every row is still there, one file is gone.
    assert rows(queue, doomed.study_uid) == (2, 1)
    assert [path.exists() for path in doomed.instance_paths] == [False, True]
    # The next start marks the row whose file is gone as missing, and records nothing.
    reconciled = reconcile(store, queue)
    assert reconciled.missing == [doomed.instance_paths[0].stem]
    assert reconciled.recorded == []
    # The study is still fully delivered, so the next pass completes its removal.
    (purged,) = retention_pass(queue, store, config, now=NOW).purged
    assert (purged.study_uid, purged.instances, purged.results) == (doomed.study_uid, 2, 1)
    assert_gone(queue, doomed)
    assert_kept(queue, undelivered)
    reconciled = reconcile(store, queue)
    assert (reconciled.missing, reconciled.recorded, reconciled.unrecognised) == ([], [], [])


def test_purge_removes_every_delivered_study_at_0s_and_prints_what_it_removed(data_dir, make_study, queue):
    now = datetime.now(timezone.utc)  # `purge` counts from the real clock
    first, second = make_study(now - DAY), make_study(now - 2 * DAY)
    pending = make_study(now - 2 * DAY, send=False)
    sizes = {study.study_uid: study.bytes for study in (first, second)}
    config = node_config(data_dir, enabled=False)  # an operator's purge works with retention off

    with capture_logs() as logs:
        run = purge(config, older_than=timedelta(0))
    text = format_purge(run)

    assert {p.study_uid for p in run.purged} == {first.study_uid, second.study_uid}
    assert {p.reason for p in run.purged} == {Reason.OPERATOR}
    lines = text.splitlines()
    assert lines == [
        f"{second.study_uid}  2 instance(s), 1 result(s), {sizes[second.study_uid]} bytes",
        f"{first.study_uid}  2 instance(s), 1 result(s), {sizes[first.study_uid]} bytes",
        (f"removed 2 study(ies): 4 instance(s), 2 result(s), {sum(sizes.values())} bytes "
         f"({sum(sizes.values()) / 1024 / 1024:.1f} MB)"),
    ]
    assert_kept(queue, pending)
    (summary,) = [e for e in logs if e["event"] == "retention_done"]
    assert (summary["studies"], summary["reason"]) == (2, "operator")
    assert format_purge(purge(config, older_than=timedelta(0))) == "nothing to remove"


def test_purge_older_than_keeps_what_was_delivered_since(data_dir, make_study, queue):
    old, recent = make_study(datetime.now(timezone.utc) - 3 * DAY), make_study(datetime.now(timezone.utc))
    run = purge(node_config(data_dir), older_than=timedelta(days=2))
    assert [p.study_uid for p in run.purged] == [old.study_uid]
    assert_kept(queue, recent)


class FlakyQueue:
    """The real queue, except that listing fails `failures` times (a database fault)."""

    def __init__(self, queue: Queue, failures: int):
        self._queue, self.failures = queue, failures

    def delivered_studies(self, **kwargs):
        if self.failures:
            self.failures -= 1
            raise OSError(5, "Input/output error")
        return self._queue.delivered_studies(**kwargs)

    def __getattr__(self, name):
        return getattr(self._queue, name)


def test_the_runner_logs_an_error_and_goes_on(data_dir, queue, make_study):
    study = make_study(datetime.now(timezone.utc) - 2 * DAY)
    config = node_config(data_dir, keep_delivered_for="1d", check_interval="1s")
    stop = threading.Event()
    with capture_logs() as logs:
        thread = threading.Thread(target=run_retention, args=(FlakyQueue(queue, failures=1), config, stop))
        thread.start()
        deadline = datetime.now() + timedelta(seconds=60)
        while not any(e["event"] == "study_purged" for e in logs) and datetime.now() < deadline:
            stop.wait(0.05)
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    events = [e["event"] for e in logs]
    assert events[:3] == ["retention_started", "retention_error", "study_purged"], events
    (error,) = [e for e in logs if e["event"] == "retention_error"]
    assert error["error"].startswith("OSError at ")  # type and raise site: never a library's message
    assert_gone(queue, study)


def test_the_runner_does_nothing_when_retention_is_off(data_dir, queue, make_study):
    study = make_study(NOW - 100 * DAY)
    config = node_config(data_dir, enabled=False, min_free_megabytes=10**12, check_interval="1s")
    stop = threading.Event()
    with capture_logs() as logs:
        thread = threading.Thread(target=run_retention, args=(queue, config, stop))
        thread.start()
        thread.join(30)  # returns at once, without being stopped
        finished = not thread.is_alive()
        stop.set()
        thread.join(30)
    assert finished
    assert [e["event"] for e in logs] == ["retention_off"]
    assert_kept(queue, study)

