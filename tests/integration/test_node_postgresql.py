"""A real `dicom-node serve` with its job table on a real PostgreSQL server, end to end.

dcmtk storescu sends a study; the node records it in PostgreSQL (not in a SQLite file
under data_dir), analyses it and delivers exactly one GSPS to a real Orthanc. The helpers
are the SQLite round trip's (test_node_roundtrip.py).
"""

from __future__ import annotations

import pydicom
import pytest

from dicom_node.queue import Queue, State
from tests import synthetic

from .dcmtk import storescu
from .gsps_read import referenced_images
from .process import wait_for
from .test_node_roundtrip import RELATIVE_BOX, fixed_boxes_file, start_node, wait_for_gsps

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_node_on_postgresql_receives_a_study_and_delivers_one_gsps(tmp_path, orthanc, postgres_url):
    detector = {"architecture": "fixed_boxes", "weights": str(fixed_boxes_file(tmp_path, [RELATIVE_BOX])),
                "score_threshold": 0.5}
    url = postgres_url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth: not checked, never logged
    node = start_node(tmp_path, orthanc, detector, sections={"queue": {"url": url}})
    queue = Queue(postgres_url)
    try:
        files = synthetic.study(tmp_path / "study", n_images=2, rows=320, columns=240)
        sent = [pydicom.dcmread(f) for f in files]
        result = storescu(files, node.port, "DICOM_NODE")
        assert result.ok, result.output

        study_uid = str(sent[0].StudyInstanceUID)
        gsps = wait_for_gsps(orthanc, study_uid, node)
        assert referenced_images(gsps) == {str(ds.SOPInstanceUID) for ds in sent}

        def delivered():
            jobs = queue.list_jobs()
            return jobs if jobs and all(d.state == State.DONE for j in jobs for d in j.deliveries) else None

        (job,) = wait_for(delivered, 60, description="the delivery recorded as done in PostgreSQL")
        assert (job.study_uid, job.state, [d.destination for d in job.deliveries]) == (
            study_uid, State.DONE, ["orthanc"])
        assert queue.stats()["instances"]["total"] == 2
        assert not (tmp_path / "data" / "dicom-node.sqlite").exists()
        (starting,) = node.events("node_starting")
        assert starting["database"] == url.replace("s3cret-pw", "***")
    finally:
        queue.close()
        status = node.stop()
        print(node.output())
    assert status == 0
    assert "s3cret-pw" not in node.output()


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own, to stop and start again under a running node."""
    from dicom_node.bench.postgres import PostgresServer, postgres_bin_dir

    server = PostgresServer(postgres_bin_dir()).start()
    yield server
    server.stop()


def test_a_node_whose_postgresql_stops_answers_out_of_resources_and_stores_once_it_is_back(
    tmp_path, fault_nodes, own_postgres
):
    url = own_postgres.url(own_postgres.create_database())
    node = fault_nodes(queue={"url": url}, node={"network_timeout_seconds": 20})
    files = synthetic.study(tmp_path / "study", n_images=1)

    own_postgres.stop(remove=False)
    refused = storescu(files, node.port, "DICOM_NODE", extra_args=["--dimse-timeout", "20"])
    assert not refused.ok and "Refused: OutOfResources" in refused.output, refused.output
    (failed,) = node.process.events("instance_store_failed")
    assert failed["status"] == "0xA700"
    assert failed["error"] == f"job database {url} unavailable: server unavailable"

    own_postgres.start()  # the same data and port: the node's pool reconnects by itself
    stored = storescu(files, node.port, "DICOM_NODE")  # the sender's retry
    assert stored.ok, stored.output
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert node.wait_for_job(study_uid, "done").detections == 1
    assert "Traceback" not in node.process.output()
