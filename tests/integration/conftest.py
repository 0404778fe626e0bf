"""Fixtures starting real Orthanc and dcmtk storescp processes on free ports.

Every process a fixture starts is stopped at teardown, pass or fail. When a test
fails, the log of each process it used is attached to the failure report
("log of Orthanc ORTHANC" sections), so a CI failure shows what the peer saw.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from .dcmtk import StoreSCP
from .fault_node import FaultNode, write_node_config
from .orthanc import DEFAULT_AE_TITLE, OrthancServer, orthanc_binary

_PEERS = pytest.StashKey[list]()


def _require(tool: str, found: bool) -> None:
    if not found:
        pytest.skip(f"{tool} is not installed (scripts/test installs it with apt-get)")


def _track(request: pytest.FixtureRequest, peer: OrthancServer | StoreSCP) -> None:
    request.node.stash.setdefault(_PEERS, []).append(peer)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    if report.failed:
        for peer in item.stash.get(_PEERS, []):
            if peer.process is not None:
                report.sections.append((f"log of {peer.process.name}", peer.log()))
    return report


@pytest.fixture
def orthanc_factory(tmp_path, request) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthanc servers: ``orthanc_factory(modalities={"node": ["DICOM_NODE", host, port]})``.

    Keyword arguments: ae_title, modalities (DicomModalities entries), overrides
    (any other Orthanc option), dicom_port (a port chosen in advance; default: a free
    one). Each server gets its own folder under tmp_path.
    """
    _require("Orthanc", orthanc_binary() is not None)
    _require("dcmtk (echoscu)", shutil.which("echoscu") is not None)
    servers: list[OrthancServer] = []

    def start(
        *,
        ae_title: str = DEFAULT_AE_TITLE,
        modalities: dict[str, Any] | None = None,
        overrides: dict[str, Any] | None = None,
        dicom_port: int | None = None,
    ) -> OrthancServer:
        server = OrthancServer(
            tmp_path / f"orthanc-{len(servers) + 1}",
            ae_title=ae_title,
            modalities=modalities,
            overrides=overrides,
            dicom_port=dicom_port,
        )
        servers.append(server)
        _track(request, server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def orthanc(orthanc_factory) -> OrthancServer:
    """A running Orthanc (AE title ORTHANC) with no modalities configured."""
    return orthanc_factory()


@pytest.fixture
def storescp_factory(tmp_path, request) -> Iterator[Callable[..., StoreSCP]]:
    """Start dcmtk storescp receivers: ``storescp_factory(ae_title="MODALITY")``.

    ``port`` (default: a free one) and ``extra_args`` (e.g. ``["--abort-after"]`` for a
    failing peer) are passed to storescp.
    """
    _require("dcmtk (storescp)", shutil.which("storescp") is not None)
    receivers: list[StoreSCP] = []

    def start(
        *, ae_title: str = "STORESCP", port: int | None = None, extra_args: Sequence[str] = ()
    ) -> StoreSCP:
        receiver = StoreSCP(
            tmp_path / f"storescp-{len(receivers) + 1}",
            ae_title=ae_title,
            port=port,
            extra_args=extra_args,
        )
        receivers.append(receiver)
        _track(request, receiver)
        return receiver.start()

    yield start
    for receiver in receivers:
        receiver.stop()


@pytest.fixture
def storescp(storescp_factory) -> StoreSCP:
    """A running dcmtk storescp (AE title STORESCP) writing what it receives."""
    return storescp_factory()


@pytest.fixture
def fault_nodes(tmp_path):
    """Start FaultNodes: ``fault_nodes("name", **config sections)``; each must exit 0 on SIGTERM."""
    started: list[FaultNode] = []

    def start(name: str = "node", *, destinations: Sequence[dict] = (), **sections: dict) -> FaultNode:
        config = tmp_path / name / "node.toml"
        if not config.exists():  # the same name again: a restart on the same data_dir
            write_node_config(tmp_path / name, destinations=destinations, **sections)
        node = FaultNode(config)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        status = node.stop()
        print(node.process.output())  # shown by pytest when the test failed
        assert status == 0, "dicom-node did not exit 0 on SIGTERM"
