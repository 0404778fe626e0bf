"""Startup reconciliation (store.reconcile): the instance files and the queue's rows agree again.

Real files written the way the SCP writes them (a Part 10 file with the caller in the
File Meta, persisted through InstanceStore) and a real SQLite queue under tmp_path.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from dicom_node.store import InstanceStore, reconcile
from tests import synthetic
from tests.queue.queue_helpers import T0


@pytest.fixture
def store(tmp_path) -> InstanceStore:
    return InstanceStore(tmp_path / "data", fsync=False)


def stored_file(store: InstanceStore, tmp_path: Path, *, study_uid: str | None = None,
                calling_ae: str = "MODALITY_7") -> tuple[Path, dict]:
    """An instance file at its final path, as the SCP leaves it after the rename."""
    ds = synthetic.mammogram(study_uid=study_uid)
    ds.file_meta.SendingApplicationEntityTitle = calling_ae
    source = synthetic.write(ds, tmp_path / "incoming" / f"{ds.SOPInstanceUID}.dcm")
    ids = {"study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID,
           "sop_instance_uid": ds.SOPInstanceUID}
    return store.persist_instance(source, **ids), {**ids, "sop_class_uid": ds.SOPClassUID}


def record(queue, path: Path, ids: dict) -> None:
    assert queue.record_instance(
        **ids, path=str(path), transfer_syntax="1.2.840.10008.1.2.1", calling_ae="MODALITY_7",
        size_bytes=path.stat().st_size, now=T0,
    )


def test_nothing_to_do_on_a_consistent_store(store, queue, tmp_path):
    path, ids = stored_file(store, tmp_path)
    record(queue, path, ids)
    result = reconcile(store, queue)
    assert (result.temp_files_removed, result.missing, result.recorded, result.unrecognised) == (0, [], [], [])
    assert queue.stats()["instances"] == {"total": 1, "missing": 0}


def test_row_without_file_is_marked_missing_and_cleared_when_the_file_returns(store, queue, tmp_path):
    kept, kept_ids = stored_file(store, tmp_path)
    lost, lost_ids = stored_file(store, tmp_path, study_uid=kept_ids["study_uid"])
    record(queue, kept, kept_ids)
    record(queue, lost, lost_ids)
    content = lost.read_bytes()
    lost.unlink()

    result = reconcile(store, queue)

    assert result.missing == [lost_ids["sop_instance_uid"]]
    stats = queue.stats()
    assert stats["instances"] == {"total": 2, "missing": 1}
    assert stats["missing_instances"][0]["path"] == str(lost)
    assert kept.exists()  # nothing else touched

    lost.write_bytes(content)  # restored from a backup
    result = reconcile(store, queue)
    assert (result.missing, result.found_again) == ([], 1)
    assert queue.stats()["instances"] == {"total": 2, "missing": 0}


def test_file_without_row_is_recorded_and_its_study_analysed(store, queue, tmp_path):
    """A crash after the rename, before the commit: the file is complete but has no row."""
    path, ids = stored_file(store, tmp_path, calling_ae="MAMMO_3")

    result = reconcile(store, queue)

    assert result.recorded == [ids["sop_instance_uid"]]
    (instance,) = queue.study_instances(ids["study_uid"])
    assert (instance.path, instance.sop_class_uid, instance.series_uid) == (
        str(path), ids["sop_class_uid"], ids["series_uid"])
    assert (instance.calling_ae, instance.size_bytes) == ("MAMMO_3", path.stat().st_size)
    assert instance.transfer_syntax == "1.2.840.10008.1.2.1"
    # The study is analysed like any other once it has been quiet.
    later = instance.received_at + timedelta(seconds=10)
    assert len(queue.enqueue_ready_studies(stable_seconds=5, now=later)) == 1
    # The sender, which got no Success, sends it again: a duplicate, no second analysis.
    assert not queue.record_instance(
        **ids, path=str(path), transfer_syntax="1.2.840.10008.1.2.1", calling_ae="MAMMO_3", size_bytes=1,
    )
    # A second startup finds nothing new.
    assert reconcile(store, queue).recorded == []


def test_files_the_scp_did_not_write_are_left_alone(store, queue, tmp_path):
    garbage = store.instances_dir / "1.2.3" / "1.2.3.4" / "5.6.7.dcm"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not DICOM at all")
    # A valid instance under the wrong study folder: its UIDs do not give its path.
    misplaced, _ = stored_file(store, tmp_path)
    wrong = store.instances_dir / "9.9" / "9.9.1" / misplaced.name
    wrong.parent.mkdir(parents=True)
    misplaced.rename(wrong)

    result = reconcile(store, queue)

    assert sorted(result.unrecognised) == sorted([str(garbage), str(wrong)])
    assert result.recorded == []
    assert garbage.exists() and wrong.exists()
    assert queue.stats()["instances"]["total"] == 0


def test_temp_files_are_removed(store, queue):
    (store.tmp_dir / "tmpabc.dcm").write_bytes(b"half an instance")
    (store.tmp_dir / "leftover").mkdir()
    assert reconcile(store, queue).temp_files_removed == 2
    assert list(store.tmp_dir.iterdir()) == []
