"""The worker's burned-in captures (destinations[].outputs "sc"): one per analysed image, in
one folder that is one delivery; UIDs from the job's key; a later generation's captures go
into the earlier capture series, numbered on, saying what they replace.

Real SQLite files, real synthetic studies, the fixed-boxes test detector.
"""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import DigitalMammographyXRayImageStorageForProcessing, JPEG2000Lossless

from dicom_node.queue import State
from tests import synthetic

from .test_worker_database import Installation

BOX = (0.25, 0.30, 0.50, 0.55, 0.91)


@pytest.fixture
def node(tmp_path):
    installation = Installation(tmp_path / "node", boxes=(BOX,), outputs=("gsps", "sc"))
    yield installation
    installation.close()


def read_captures(folder) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(path) for path in folder.iterdir()), key=lambda ds: int(ds.InstanceNumber))


def delivery(job, output: str):
    (found,) = [d for d in job.deliveries if d.output == output]
    return found


def test_one_capture_per_analysed_image_in_one_folder_that_is_one_delivery(node, tmp_path):
    files = synthetic.study(tmp_path / "study", n_images=2, rows=256, columns=192)
    processing = synthetic.mammogram(study_uid=pydicom.dcmread(files[0]).StudyInstanceUID,
                                     sop_class_uid=DigitalMammographyXRayImageStorageForProcessing, seed=7)
    processing.PresentationIntentType = "FOR PROCESSING"
    files.append(synthetic.write(processing, tmp_path / "study" / "processing.dcm"))
    node.receive(files)
    job = node.claim()
    node.process(job)

    done = node.queue.get_job(job.id)
    assert done.state == State.DONE
    assert sorted((d.destination, d.output) for d in done.deliveries) == [("pacs", "gsps"), ("pacs", "sc")]
    sc = delivery(done, "sc")
    folder = node.store.results_dir / f"{sc.sop_instance_uid}.sc"
    assert sc.path == str(folder)
    captures = read_captures(folder)
    # The two For Presentation images; the For Processing one was not analysed (the GSPS says so).
    analysed = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files[:2]}
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in captures] == [
        str(pydicom.dcmread(f).SOPInstanceUID) for f in files[:2]]
    assert set(ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in captures) == analysed
    assert [int(ds.InstanceNumber) for ds in captures] == [1, 2]
    assert captures[0].SOPInstanceUID == sc.sop_instance_uid
    assert len({ds.SeriesInstanceUID for ds in captures}) == 1
    assert {int(ds.SeriesNumber) for ds in captures} == {node.config.report.series_number + 2}
    assert {ds.file_meta.TransferSyntaxUID for ds in captures} == {JPEG2000Lossless}
    assert all(ds.BurnedInAnnotation == "YES" and "ImageComments" not in ds for ds in captures)

    # A retried job rebuilds the same captures under the same names, and nothing else.
    names = sorted(p.name for p in folder.iterdir())
    (folder / "left-over.dcm").write_bytes(b"not ours")
    node.process(job)
    assert sorted(p.name for p in folder.iterdir()) == names


def test_a_later_generation_continues_the_capture_series_and_says_what_it_replaces(node, tmp_path):
    files = synthetic.study(tmp_path / "study", n_images=3, rows=256, columns=192)
    node.receive(files[:2])
    first_job = node.claim()
    node.process(first_job)
    first = read_captures(node.store.results_dir / f"{delivery(node.queue.get_job(first_job.id), 'sc').sop_instance_uid}.sc")

    node.receive(files[2:])  # an image after the study's result
    second_job = node.claim()
    assert second_job.generation == 2
    node.process(second_job)
    second = read_captures(node.store.results_dir / f"{delivery(node.queue.get_job(second_job.id), 'sc').sop_instance_uid}.sc")

    assert len(second) == 3  # the whole study again
    assert {ds.SeriesInstanceUID for ds in second} == {first[0].SeriesInstanceUID}
    assert [int(ds.InstanceNumber) for ds in second] == [3, 4, 5]
    assert not {ds.SOPInstanceUID for ds in second} & {ds.SOPInstanceUID for ds in first}
    for ds in second:
        assert ds.ImageComments.startswith("Replaces the result of ")
        assert ds.ImageComments.endswith(": 1 image arrived after it")


def test_after_a_rebuilt_database_a_later_generation_continues_every_output_s_series(node, tmp_path):
    # A rebuilt database holds each delivered result restored from the ledger as a done job
    # of its own (Queue.restore_delivered): the GSPS in one, the captures in another.
    from types import SimpleNamespace

    from .test_worker_database import Installation

    files = synthetic.study(tmp_path / "study", n_images=2, rows=256, columns=192)
    study_uid = node.receive(files[:1])
    first_job = node.claim()
    node.process(first_job)
    done = node.queue.get_job(first_job.id)
    first_gsps = pydicom.dcmread(delivery(done, "gsps").path)
    first_captures = read_captures(node.store.results_dir / f"{delivery(done, 'sc').sop_instance_uid}.sc")

    rebuilt = Installation(tmp_path / "node", database=tmp_path / "rebuilt.sqlite", boxes=(BOX,), outputs=("gsps", "sc"))
    try:
        rebuilt.receive(files[:1])
        entries = [
            SimpleNamespace(output=output, result_path=d.path, result_sop_instance_uid=d.sop_instance_uid,
                            sop_instance_uids=[str(first_gsps.ReferencedSeriesSequence[0]
                                                   .ReferencedImageSequence[0].ReferencedSOPInstanceUID)],
                            delivered={"pacs": done.updated_at})
            for output, d in (("gsps", delivery(done, "gsps")), ("sc", delivery(done, "sc")))
        ]
        assert len(rebuilt.queue.restore_delivered(study_uid, entries)) == 2
        rebuilt.receive(files[1:])  # an image after the restored results
        job = rebuilt.claim()
        rebuilt.process(job)
        later = rebuilt.queue.get_job(job.id)
        gsps = pydicom.dcmread(delivery(later, "gsps").path)
        captures = read_captures(rebuilt.store.results_dir / f"{delivery(later, 'sc').sop_instance_uid}.sc")
    finally:
        rebuilt.close()
    # Both continue their series: neither output lost track of what it replaces.
    assert (gsps.SeriesInstanceUID, int(gsps.InstanceNumber)) == (first_gsps.SeriesInstanceUID, 2)
    assert {ds.SeriesInstanceUID for ds in captures} == {first_captures[0].SeriesInstanceUID}
    assert [int(ds.InstanceNumber) for ds in captures] == [2, 3]


def test_a_study_with_no_analysed_image_gets_no_capture_delivery(tmp_path):
    node = Installation(tmp_path / "node", boxes=(BOX,), outputs=("sc",))
    try:
        processing = synthetic.mammogram(sop_class_uid=DigitalMammographyXRayImageStorageForProcessing)
        processing.PresentationIntentType = "FOR PROCESSING"
        node.receive([synthetic.write(processing, tmp_path / "processing.dcm")])
        job = node.claim()
        node.process(job)
        done = node.queue.get_job(job.id)
        assert (done.state, tuple(done.deliveries)) == (State.DONE, ())
        assert not list(node.store.results_dir.glob("*.sc"))
    finally:
        node.close()


def test_a_job_restored_from_the_ledger_with_captures_is_not_taken_for_a_gsps(node, tmp_path):
    # After a rebuilt database each delivered result is a done job of its own (store.reconcile):
    # a restored capture set's job has the folder as its result and an "sc" delivery.
    from types import SimpleNamespace

    from dicom_node.analyse.worker import previous_results

    files = synthetic.study(tmp_path / "study", n_images=1, rows=256, columns=192)
    node.receive(files)
    job = node.claim()
    node.process(job)
    folder = delivery(node.queue.get_job(job.id), "sc").path
    restored = SimpleNamespace(id=job.id, result_path=folder, deliveries=[SimpleNamespace(output="sc", path=folder)])
    queue = SimpleNamespace(previous_results=lambda study_uid, before_generation: [restored])

    found = previous_results(queue, SimpleNamespace(study_uid=job.study_uid, generation=2))
    assert set(found.by_output) == {"sc"}
    assert found.latest("gsps") is None
