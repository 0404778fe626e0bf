"""The harness itself: a real Orthanc and real dcmtk peers behave as the node's tests expect.

These are the paths the node will sit on: a modality sends images to the PACS
(storescu -> Orthanc), the PACS routes them to a DICOM peer (Orthanc C-STORE SCU ->
storescp), and the node sends its GSPS back to the PACS.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import synthetic  # tests/ is on sys.path (tests/conftest.py)
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage, generate_uid

from .dcmtk import echoscu, storescu
from .orthanc import OrthancError, OrthancServer, modality
from .process import ManagedProcess, free_ports, start_until_ready, wait_for

pytestmark = pytest.mark.integration


def test_orthanc_runs_isolated_on_free_ports_without_plugins(orthanc, tmp_path):
    system = orthanc.client.system()
    assert system["DicomAet"] == "ORTHANC"
    assert (system["DicomPort"], system["HttpPort"]) == (orthanc.dicom_port, orthanc.http_port)
    assert system["DatabaseBackendPlugin"] is None
    # GET /plugins lists loaded plugins; "explorer.js" is Orthanc's own pseudo-entry.
    assert set(orthanc.client.json("GET", "/plugins")) <= {"explorer.js"}
    assert (tmp_path / "orthanc-1" / "storage").is_dir()
    assert orthanc.client.instances() == []


def test_storescu_stores_synthetic_mammograms_in_orthanc(orthanc, tmp_path):
    files = synthetic.study(tmp_path / "study", n_images=2)

    result = storescu(files, orthanc.dicom_port, orthanc.ae_title, calling_aet="MODALITY")

    assert result.ok, result.output
    sent = {pydicom.dcmread(path).SOPInstanceUID: path for path in files}
    ids = orthanc.client.instances()
    stored = {orthanc.client.instance_tags(i)["SOPInstanceUID"]: i for i in ids}
    assert stored.keys() == sent.keys()
    assert len(orthanc.client.studies()) == 1
    uid, instance_id = next(iter(stored.items()))
    kept = orthanc.client.instance_dataset(instance_id)
    assert np.array_equal(kept.pixel_array, pydicom.dcmread(sent[uid]).pixel_array)


@pytest.mark.parametrize("registered", ["in_config", "at_runtime"])
def test_orthanc_routes_an_instance_to_a_dicom_peer(orthanc_factory, storescp, tmp_path, registered):
    # The PACS routing path the node sits on: Orthanc is the C-STORE SCU.
    peer = modality(storescp.ae_title, storescp.port)
    if registered == "in_config":
        orthanc = orthanc_factory(modalities={"peer": peer})
    else:
        orthanc = orthanc_factory()
        orthanc.client.put_modality("peer", ae_title=peer[0], host=peer[1], port=peer[2])
    assert "peer" in orthanc.client.modalities()
    assert orthanc.client.echo_modality("peer")
    image = synthetic.write(synthetic.mammogram(masses=((100, 80, 12),)), tmp_path / "mg.dcm")
    instance_id = orthanc.client.upload(image)

    answer = orthanc.client.store_to_modality("peer", instance_id)

    assert (answer["InstancesCount"], answer["FailedInstancesCount"]) == (1, 0)
    (received,) = storescp.wait_for_files(1)
    sent, delivered = pydicom.dcmread(image), pydicom.dcmread(received)
    assert delivered.SOPInstanceUID == sent.SOPInstanceUID
    assert np.array_equal(delivered.pixel_array, sent.pixel_array)


def test_store_to_a_peer_that_is_down_raises(orthanc, tmp_path):
    (closed_port,) = free_ports(1)  # nothing listens there
    orthanc.client.put_modality("down", ae_title="NOBODY", host="127.0.0.1", port=closed_port)
    instance_id = orthanc.client.upload(synthetic.write(synthetic.mammogram(), tmp_path / "mg.dcm"))

    assert not orthanc.client.echo_modality("down")
    with pytest.raises(OrthancError) as error:
        orthanc.client.store_to_modality("down", instance_id)
    assert error.value.status >= 400


def _tiny_gsps(image: pydicom.Dataset) -> hd.pr.GrayscaleSoftcopyPresentationState:
    layer = hd.pr.GraphicLayer(layer_name="MASS_DETECTIONS", order=1)
    box = hd.pr.GraphicObject(
        graphic_type="POLYLINE",
        graphic_data=np.array([[10, 10], [60, 10], [60, 50], [10, 50], [10, 10]], dtype=float),
        units="PIXEL",
    )
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=generate_uid(),
        series_number=9901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="dicom-node tests",
        manufacturer_model_name="harness",
        software_versions="0",
        device_serial_number="0",
        content_label="MASS_CAD",
        graphic_layers=[layer],
        graphic_annotations=[
            hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer, graphic_objects=[box])
        ],
    )


def test_orthanc_accepts_a_gsps_over_dicom_and_finds_it_by_sop_class(orthanc, tmp_path):
    image_path = synthetic.write(synthetic.mammogram(), tmp_path / "mg.dcm")
    image = pydicom.dcmread(image_path)
    gsps_path = tmp_path / "gsps.dcm"
    _tiny_gsps(image).save_as(gsps_path, enforce_file_format=True)

    # Default Orthanc settings (UnknownSopClassAccepted false): GSPS is a standard
    # storage SOP class (PS3.4 B.5), accepted like on a stock PACS.
    result = storescu([image_path, gsps_path], orthanc.dicom_port, orthanc.ae_title)

    assert result.ok, result.output
    (gsps_id,) = orthanc.client.find_by_sop_class(GrayscaleSoftcopyPresentationStateStorage)
    kept = orthanc.client.instance_dataset(gsps_id)
    referenced = kept.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert len(orthanc.client.instances()) == 2


def test_delete_all_empties_orthanc(orthanc, tmp_path):
    files = synthetic.study(tmp_path / "study", n_images=2)
    assert storescu(files, orthanc.dicom_port, orthanc.ae_title).ok

    orthanc.client.delete_all()

    assert orthanc.client.instances() == []


def test_server_stops_and_frees_its_ports(tmp_path):
    with OrthancServer(tmp_path / "orthanc") as server:
        process = server.process
        assert server.client.is_up()
    assert not process.running
    assert not server.client.is_up()
    assert not echoscu(server.dicom_port, server.ae_title, timeout=10).ok


def test_wait_for_returns_the_value_and_times_out_with_the_description():
    calls = []

    def third_call_succeeds() -> str | None:
        calls.append(None)
        return "done" if len(calls) == 3 else None

    assert wait_for(third_call_succeeds, timeout=5) == "done"
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_for(lambda: False, timeout=0.1, description="the impossible")

def _fake_server(tmp_path, commands):
    def spawn(attempt: int) -> ManagedProcess:
        return ManagedProcess("fake", commands[attempt], log_path=tmp_path / "fake.log")

    # "Ready" only for the long-running command, as a real server answers only once it listens.
    return spawn, lambda process: process.command[0] == "sleep"


def test_start_until_ready_retries_a_process_that_exits_early(tmp_path):
    spawn, ready = _fake_server(tmp_path, [["sh", "-c", "echo port taken; exit 3"], ["sleep", "60"]])

    process = start_until_ready(spawn, ready, timeout=10)

    try:
        assert process.running and process.command == ["sleep", "60"]
        assert "port taken" in process.log()
    finally:
        process.stop()
    assert not process.running


def test_start_until_ready_gives_up_with_every_log(tmp_path):
    spawn, ready = _fake_server(tmp_path, [["sh", "-c", f"echo attempt {n}; exit 3"] for n in range(2)])

    with pytest.raises(RuntimeError, match="(?s)attempt 0.*attempt 1"):
        start_until_ready(spawn, ready, timeout=10, attempts=2)
