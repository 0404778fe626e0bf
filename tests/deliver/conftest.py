"""Real peers for the SCU tests: dcmtk storescp on a free port and in-process pynetdicom SCPs."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import GrayscaleSoftcopyPresentationStateStorage, Verification
from synthetic import mammogram

from dicom_node.config import DestinationConfig, ReportConfig
from dicom_node.model.detector import Detection
from dicom_node.report.gsps import build_gsps


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, *, deadline_s: float = 15.0) -> None:
    """Return once `port` accepts connections; fail if the process exits or time runs out."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited with {process.returncode}: {process.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)  # polling a condition, bounded by the deadline
    raise RuntimeError(f"storescp did not listen on port {port} within {deadline_s} s")


def destination(port: int, ae_title: str, name: str = "pacs") -> DestinationConfig:
    return DestinationConfig(name=name, ae_title=ae_title, host="127.0.0.1", port=port)


@pytest.fixture
def closed_destination() -> DestinationConfig:
    """A destination on a port where nothing listens."""
    return destination(free_port(), "NOBODY", name="offline-pacs")

@pytest.fixture
def gsps_file(tmp_path):
    """A GSPS file as the node writes it (one synthetic image, one box)."""
    image = mammogram()
    detection = Detection(box=(10, 20, 30, 40), score=0.9)
    gsps = build_gsps(
        [image],
        {image.SOPInstanceUID: [detection]},
        report=ReportConfig(),
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
    )
    path = tmp_path / "result.dcm"
    gsps.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Storescp:
    destination: DestinationConfig
    output: object
    process: subprocess.Popen


@contextlib.contextmanager
def running_storescp(output, *options: str) -> Iterator[Storescp]:
    """dcmtk storescp on a free port writing into `output`, with `options` (e.g. ``+xa``)."""
    if shutil.which("storescp") is None:
        pytest.fail("storescp not found: install dcmtk")
    output.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "--aetitle", "STORESCP", "--output-directory", str(output), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, process)
        yield Storescp(destination(port, "STORESCP"), output, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def storescp(tmp_path):
    """dcmtk storescp accepting every storage SOP class, writing into a temporary folder."""
    with running_storescp(tmp_path / "received", "+xa") as peer:
        yield peer


@dataclass
class Scp:
    ae: AE
    destination: DestinationConfig
    received: list = field(default_factory=list)


@pytest.fixture
def scp():
    """Start in-process pynetdicom SCPs: scp(status=..., handler=..., ...) -> Scp. All stopped after."""
    servers = []
    release = threading.Event()  # lets handlers that block for a timeout test finish at teardown

    def start(
        *,
        status: int = 0x0000,
        handler=None,
        ae_title: str = "TESTSCP",
        contexts=(GrayscaleSoftcopyPresentationStateStorage,),
        require_called_aet: bool = False,
        maximum_associations: int = 10,
    ) -> Scp:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ae.maximum_associations = maximum_associations
        for context in contexts:
            ae.add_supported_context(context, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        result = Scp(ae=ae, destination=None)

        def on_store(event):
            result.received.append(event.dataset.SOPInstanceUID)
            if handler is not None:
                return handler(event, release)
            return status

        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        servers.append(server)
        result.destination = destination(server.server_address[1], ae_title)
        return result

    yield start
    release.set()
    for server in servers:
        server.shutdown()
