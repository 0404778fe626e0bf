"""InstanceStore: durable layout under data_dir, duplicates, hostile UIDs, temp clean-up."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.store import InstanceStore, validate_uid
from tests import synthetic


@pytest.fixture
def store(tmp_path) -> InstanceStore:
    return InstanceStore(tmp_path / "data")


def uids() -> dict[str, str]:
    return {
        "study_uid": generate_uid(),
        "series_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
    }


def staged(store: InstanceStore, content: bytes):
    """A file under tmp/ as the SCP leaves it before persist_instance."""
    path = store.tmp_dir / f"{generate_uid()}.part"
    path.write_bytes(content)
    return path


def test_creates_layout_on_one_filesystem(store):
    for folder in (store.instances_dir, store.results_dir, store.tmp_dir):
        assert folder.is_dir()
        assert folder.parent == store.data_dir
    devices = {os.stat(f).st_dev for f in (store.instances_dir, store.results_dir, store.tmp_dir)}
    assert len(devices) == 1  # os.replace between them is atomic


def test_persist_moves_staged_file_into_place(store):
    ids = uids()
    source = staged(store, b"instance bytes")
    path = store.persist_instance(source, **ids)
    folder = store.instances_dir / ids["study_uid"] / ids["series_uid"]
    assert path == folder / f"{ids['sop_instance_uid']}.dcm"
    assert path.read_bytes() == b"instance bytes"
    assert not source.exists()
    assert list(store.tmp_dir.iterdir()) == []


def test_persist_copies_a_file_from_elsewhere_and_leaves_it(store, tmp_path):
    ids = uids()
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"from elsewhere")
    path = store.persist_instance(outside, **ids)
    assert path.read_bytes() == b"from elsewhere"
    assert outside.read_bytes() == b"from elsewhere"
    assert list(store.tmp_dir.iterdir()) == []


def test_duplicate_keeps_the_existing_file(store):
    ids = uids()
    first = store.persist_instance(staged(store, b"first"), **ids)
    inode = first.stat().st_ino
    second_source = staged(store, b"second")
    second = store.persist_instance(second_source, **ids)
    assert second == first
    assert first.read_bytes() == b"first"
    assert first.stat().st_ino == inode
    assert not second_source.exists()
    assert list(store.tmp_dir.iterdir()) == []


def test_concurrent_duplicates_leave_one_complete_file(store):
    ids = uids()
    sources = [staged(store, bytes([i]) * 100_000) for i in range(8)]
    barrier = threading.Barrier(len(sources))
    results = []

    def persist(source):
        barrier.wait()
        results.append(store.persist_instance(source, **ids))

    threads = [threading.Thread(target=persist, args=(s,)) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    content = results[0].read_bytes()
    assert len(content) == 100_000 and len(set(content)) == 1  # one writer's whole file
    assert list(store.tmp_dir.iterdir()) == []
    assert len(list(store.instances_dir.rglob("*.dcm"))) == 1


def test_persist_keeps_a_source_it_is_told_to_keep(store):
    """The SCP's spool: pynetdicom removes it after the handler; until then it may be
    persisted again (a file removed by retention before the row's commit)."""
    ids = uids()
    source = staged(store, b"spooled")
    path = store.persist_instance(source, **ids, keep_source=True)
    assert path.read_bytes() == source.read_bytes() == b"spooled"
    assert path.stat().st_ino == source.stat().st_ino  # a link: no copy was written
    path.unlink()
    assert store.persist_instance(source, **ids, keep_source=True).read_bytes() == b"spooled"


def test_stores_sharing_data_dir_keep_the_first_file(tmp_path):
    """Two processes (receivers sharing data_dir) storing one SOP Instance: no replace."""
    first_store, second_store = (InstanceStore(tmp_path / "data", tmp_dir=tmp_path / "data" / "tmp" / name)
                                 for name in ("host-1", "host-2"))
    ids = uids()
    first = first_store.persist_instance(staged(first_store, b"first"), **ids)
    inode = first.stat().st_ino
    second = second_store.persist_instance(staged(second_store, b"second"), **ids)
    assert second == first and first.read_bytes() == b"first" and first.stat().st_ino == inode


def test_without_hard_links_the_file_is_copied_into_place(store, monkeypatch):
    """A filesystem that refuses hard links (EPERM) still gets every instance, once."""
    def no_links(source, target):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    ids = uids()
    source = staged(store, b"copied")
    path = store.persist_instance(source, **ids, keep_source=True)
    assert path.read_bytes() == b"copied" and source.exists()
    again = store.persist_instance(staged(store, b"later"), **ids)
    assert again == path and path.read_bytes() == b"copied"
    assert sorted(p.name for p in store.tmp_dir.iterdir()) == [source.name]


@pytest.mark.parametrize(
    "field, value",
    [
        ("study_uid", "../../etc"),
        ("series_uid", "1.2/../../3"),
        ("sop_instance_uid", ".."),
        ("sop_instance_uid", "1.2.3\x00"),
        ("study_uid", "/absolute"),
        ("study_uid", ""),
        ("series_uid", "1." + "2" * 63),  # 65 characters
        ("series_uid", "1..2"),
        ("sop_instance_uid", "1.2.3."),
    ],
)
def test_hostile_or_invalid_uid_is_refused(store, field, value):
    ids = uids() | {field: value}
    source = staged(store, b"x")
    with pytest.raises(ValueError, match="UID"):
        store.persist_instance(source, **ids)
    assert list(store.instances_dir.iterdir()) == []
    assert sorted(p.name for p in store.data_dir.iterdir()) == ["instances", "results", "tmp"]


def test_validate_uid_accepts_64_characters():
    uid = "1." + "2" * 62
    assert validate_uid(uid, name="UID") == uid


def test_fsync_off_still_persists(tmp_path):
    store = InstanceStore(tmp_path / "data", fsync=False)
    ids = uids()
    path = store.persist_instance(staged(store, b"no fsync"), **ids)
    assert path.read_bytes() == b"no fsync"


def test_fsync_is_called_for_file_and_directories(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path / "data")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ids = uids()
    source = staged(store, b"durable")
    path = store.persist_instance(source, **ids)
    assert synced[0] == str(source)  # the file, before the rename
    assert str(path.parent) in synced  # the directory holding the new name
    assert str(store.instances_dir) in synced  # the new study directory's entry
    assert str(path.parent.parent) in synced  # the new series directory's entry


def test_write_result_is_a_readable_part10_file(store):
    ds = synthetic.mammogram()
    path = store.write_result(ds, name=f"{ds.SOPInstanceUID}.dcm")
    assert path.parent == store.results_dir
    assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("name", ["../escape.dcm", "a/b.dcm", ".hidden", ""])
def test_write_result_refuses_path_like_names(store, name):
    with pytest.raises(ValueError, match="result name"):
        store.write_result(synthetic.mammogram(), name=name)


def test_remove_orphan_temp_files(store):
    staged(store, b"left by a crash")
    staged(store, b"another")
    (store.tmp_dir / "partial-dir").mkdir()
    kept = store.persist_instance(staged(store, b"kept"), **uids())
    assert store.remove_orphan_temp_files() == 3
    assert list(store.tmp_dir.iterdir()) == []
    assert kept.read_bytes() == b"kept"
    assert store.remove_orphan_temp_files() == 0


def test_temp_path_is_removed_unless_moved(store):
    with store.temp_path() as path:
        assert path.parent == store.tmp_dir and path.exists()
    assert not path.exists()


def _hold_spool_area(data_dir, owner: str, *, then: str):
    """A process that takes `owner`'s spool area, writes a temp file in it, and then either
    sleeps ("live") or dies without releasing it ("dead", as a SIGKILL leaves it)."""
    import subprocess
    import sys

    code = (
        "import os, sys, time; from dicom_node.store import SpoolArea; "
        f"area = SpoolArea({str(data_dir)!r}, {owner!r}).acquire(); "
        "(area.path / 'tmpspool.dcm').write_bytes(b'half an instance'); print('held', flush=True); "
        + ("time.sleep(120)" if then == "live" else "os._exit(0)")
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_starting_process_removes_dead_processes_temp_files_and_never_a_live_ones(tmp_path):
    from dicom_node.store import SpoolArea, sweep_spool_areas

    data = tmp_path / "data"
    live = _hold_spool_area(data, "hosta-11", then="live")
    try:
        _hold_spool_area(data, "hostb-22", then="dead").wait()
        (data / "tmp" / "tmpold.dcm").write_bytes(b"from before spool areas")
        own = SpoolArea(data, "hostc-33").acquire()
        store = InstanceStore(data, tmp_dir=own.path)

        assert store.remove_orphan_temp_files() == 2  # the dead area and the old file
        assert (data / "tmp" / "hosta-11" / "tmpspool.dcm").exists()  # its owner may still acknowledge it
        assert not (data / "tmp" / "hostb-22").exists()
        assert not (data / "tmp" / "hostb-22.lock").exists()
        assert not (data / "tmp" / "tmpold.dcm").exists()
        assert own.path.is_dir() and store.tmp_dir == own.path

        live.kill()
        live.wait()
        assert sweep_spool_areas(data, keep=own.path) == ["hosta-11"]  # dead now
        assert sorted(p.name for p in (data / "tmp").iterdir()) == ["hostc-33", "hostc-33.lock"]
        own.release()
        assert list((data / "tmp").iterdir()) == []
    finally:
        live.kill()
        live.wait()


def test_the_ledger_names_each_output_and_the_images_a_report_covers(store):
    from pydicom.uid import generate_uid as new_uid

    from dicom_node.config import ReportConfig
    from dicom_node.report.sr import build_sr

    study = new_uid()
    images = [synthetic.mammogram(study_uid=study, seed=i) for i in range(2)]
    report = build_sr(images, {str(ds.SOPInstanceUID): [] for ds in images}, report=ReportConfig(),
                      weights_label="test", sop_instance_uid=new_uid(), series_instance_uid=new_uid(),
                      series_number=9902, series_description="SR")
    path = store.write_result(report, name=f"{report.SOPInstanceUID}.dcm")
    ledger = store.record_delivered(path, "ohif", output="sr")
    (entry,) = store.delivered_results(study)
    assert (entry.output, entry.result_sop_instance_uid) == ("sr", report.SOPInstanceUID)
    assert set(entry.sop_instance_uids) == {str(ds.SOPInstanceUID) for ds in images}
    # A ledger written before outputs existed: its results are GSPS.
    old = ledger.read_text().replace('"output": "sr",', "")
    ledger.write_text(old)
    assert [e.output for e in store.delivered_results(study)] == ["gsps"]


def test_a_folder_of_captures_is_one_ledger_entry_named_by_its_first_capture(store):
    from pydicom.uid import generate_uid as new_uid

    from dicom_node.config import ReportConfig
    from dicom_node.report.capture import build_capture
    from dicom_node.store import result_files

    study = new_uid()
    images = [synthetic.mammogram(study_uid=study, seed=i, rows=64, columns=48) for i in range(2)]
    series = new_uid()
    captures = [build_capture(ds, [], report=ReportConfig(), sop_instance_uid=new_uid(), series_instance_uid=series,
                              instance_number=n) for n, ds in enumerate(images, start=7)]
    folder = store.write_result_set(captures, name=f"{captures[0].SOPInstanceUID}.sc")
    assert folder.parent == store.results_dir
    assert [p.name for p in result_files(folder)] == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in captures)

    store.record_delivered(folder, "plain", output="sc")
    (entry,) = store.delivered_results(study)
    assert (entry.output, entry.result_sop_instance_uid, entry.result_path) == (
        "sc", captures[0].SOPInstanceUID, str(folder))
    assert set(entry.sop_instance_uids) == {str(ds.SOPInstanceUID) for ds in images}
    # Delivered again (a lost acknowledgement): the same entry.
    store.record_delivered(folder, "plain", output="sc")
    assert len(store.delivered_results(study)) == 1


def test_a_rebuilt_database_gets_the_delivered_captures_back_from_the_ledger(store, tmp_path):
    from pydicom.uid import generate_uid as new_uid

    from dicom_node.config import ReportConfig
    from dicom_node.queue import Queue, State
    from dicom_node.report.capture import build_capture
    from dicom_node.store import reconcile

    study = new_uid()
    images = [synthetic.mammogram(study_uid=study, seed=i, rows=64, columns=48) for i in range(2)]
    for ds in images:  # received before the database was lost: files without rows
        store.persist_instance(synthetic.write(ds, tmp_path / "in" / f"{ds.SOPInstanceUID}.dcm"), study_uid=study,
                               series_uid=ds.SeriesInstanceUID, sop_instance_uid=ds.SOPInstanceUID)
    captures = [build_capture(ds, [], report=ReportConfig(), sop_instance_uid=new_uid(), series_instance_uid=new_uid(),
                              instance_number=n) for n, ds in enumerate(images, start=1)]
    folder = store.write_result_set(captures, name=f"{captures[0].SOPInstanceUID}.sc")
    store.record_delivered(folder, "plain", output="sc")

    queue = Queue(f"sqlite:///{tmp_path / 'rebuilt.sqlite'}")
    try:
        queue.migrate()
        result = reconcile(store, queue, destinations={"plain": ["sc"], "archive": ["gsps", "sc"]})
        (job_id,) = result.restored_jobs
        job = queue.get_job(job_id)
        assert (job.state, job.result_path) == (State.DONE, str(folder))
        assert {(d.destination, d.output, d.path, d.sop_instance_uid, d.state) for d in job.deliveries} == {
            ("plain", "sc", str(folder), captures[0].SOPInstanceUID, State.DONE),
            ("archive", "sc", str(folder), captures[0].SOPInstanceUID, State.PENDING)}
        assert queue.enqueue_ready_studies(stable_seconds=0) == []  # the captures covered both images
    finally:
        queue.close()


def _record_deliveries(data_dir: str, result_paths: list[str], destination: str, start) -> None:
    """A process of its own (a receiver's delivery runner): notes each result's delivery."""
    store = InstanceStore(Path(data_dir))
    start.wait(30)
    for path in result_paths:
        store.record_delivered(Path(path), destination)


def test_deliveries_noted_by_several_processes_and_threads_at_once_all_stay_in_the_ledger(store):
    # Two receivers (and each one's delivery threads) may finish deliveries of one study at the
    # same moment; each note is a read, a change and a rewrite of the study's one ledger file,
    # and one writer's rewrite must not drop what another just added.
    import multiprocessing

    from pydicom.uid import generate_uid as new_uid

    from dicom_node.config import ReportConfig
    from dicom_node.report.sr import build_sr

    study = new_uid()
    images = [synthetic.mammogram(study_uid=study, seed=0, rows=64, columns=48)]
    writers = 4  # two processes, two threads in this one
    paths = [[] for _ in range(writers)]
    for index in range(writers * 15):
        report = build_sr(images, {str(images[0].SOPInstanceUID): []}, report=ReportConfig(),
                          weights_label="test", sop_instance_uid=new_uid(), series_instance_uid=new_uid(),
                          series_number=9902, series_description="SR")
        paths[index % writers].append(str(store.write_result(report, name=f"{report.SOPInstanceUID}.dcm")))
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    processes = [context.Process(target=_record_deliveries, args=(str(store.data_dir), paths[n], f"pacs{n}", start))
                 for n in (0, 1)]
    threads = [threading.Thread(target=_record_deliveries, args=(str(store.data_dir), paths[n], f"pacs{n}", start))
               for n in (2, 3)]
    for worker in (*processes, *threads):
        worker.start()
    start.set()
    for worker in (*processes, *threads):
        worker.join(120)
    assert [process.exitcode for process in processes] == [0, 0]

    delivered = {entry.result_path: entry.delivered for entry in store.delivered_results(study)}
    expected = {path: f"pacs{n}" for n in range(writers) for path in paths[n]}
    assert {path: list(where) for path, where in delivered.items()} == {
        path: [destination] for path, destination in expected.items()}
