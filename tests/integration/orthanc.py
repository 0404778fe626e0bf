"""A real Orthanc PACS for integration tests, and a small client for its REST API.

The Debian package's service is not used: each test starts its own Orthanc
(/usr/sbin/Orthanc) with a generated config under the test's tmp_path, on free
ports, with no plugins, and stops it afterwards. The REST client uses only urllib
and json, so the harness adds no dependency.

The REST routes used here are described in the Orthanc Book ("REST API of
Orthanc") and were checked against Debian 12's Orthanc 1.10.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from .dcmtk import echoscu
from .process import ManagedProcess, free_ports, start_until_ready

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DEFAULT_AE_TITLE = "ORTHANC"


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable, or None when it is not installed."""
    return shutil.which("Orthanc") or (ORTHANC_BINARY if Path(ORTHANC_BINARY).exists() else None)


def orthanc_config(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int,
    ae_title: str = DEFAULT_AE_TITLE,
    modalities: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Orthanc configuration for one test server (see /etc/orthanc/orthanc.json).

    `modalities` maps a name to ``[AET, host, port]`` (or Orthanc's object form);
    those are the peers Orthanc may C-STORE to. `overrides` replaces any key.
    """
    storage = workdir / "storage"
    config: dict[str, Any] = {
        "Name": f"test-{ae_title}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        # Debian's own config loads every plugin in /usr/share/orthanc/plugins;
        # a config file of ours replaces it, and this makes "none" explicit.
        "Plugins": [],
        "LuaScripts": [],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # REST API answers on loopback only
        "AuthenticationEnabled": False,
        "HttpThreadsCount": 4,  # the default 50 is wasteful on a 2-core CI machine
        "HttpCompressionEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        # A stock PACS: any registered or unregistered caller may C-STORE and C-ECHO.
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        # Orthanc's default (false): only the standard storage SOP classes it knows
        # are accepted, as on a real PACS. GSPS (PS3.4 B.5, 1.2.840.10008.5.1.4.1.1.11.1)
        # is among them, so the node's results need no promiscuous mode.
        "UnknownSopClassAccepted": False,
        "DicomModalities": dict(modalities or {}),
        "DicomScuTimeout": 30,
        "SaveJobs": False,
        "SyncStorageArea": False,  # throwaway storage: skip Orthanc's own fsync
    }
    config.update(overrides or {})
    return config


class OrthancError(RuntimeError):
    """An Orthanc REST call answered with an HTTP error; carries status and body."""

    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body}")
        self.status = status
        self.body = body


class OrthancClient:
    """Just enough of the Orthanc REST API for tests (urllib + json)."""

    def __init__(self, base_url: str, *, timeout: float = 60):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    # -- plumbing --------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
    ) -> bytes:
        """One HTTP request; returns the raw body, raises OrthancError on HTTP errors."""
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise OrthancError(method, path, error.code, error.read().decode(errors="replace"))

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        answer = self.request(method, path, body)
        return json.loads(answer) if answer.strip() else None

    # -- server ----------------------------------------------------------------
    def system(self) -> dict:
        return self.json("GET", "/system")

    def is_up(self) -> bool:
        """True when the REST API answers GET /system."""
        try:
            self.system()
        except (OSError, OrthancError):  # URLError and connection errors are OSErrors
            return False
        return True

    # -- resources -------------------------------------------------------------
    def instances(self) -> list[str]:
        return self.json("GET", "/instances")

    def studies(self) -> list[str]:
        return self.json("GET", "/studies")

    def instance(self, instance_id: str) -> dict:
        """Orthanc's summary of one instance (MainDicomTags, ParentSeries, ...)."""
        return self.json("GET", f"/instances/{instance_id}")

    def instance_tags(self, instance_id: str) -> dict:
        """All tags of one instance as {keyword: value} (Orthanc's simplified form)."""
        return self.json("GET", f"/instances/{instance_id}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte as Orthanc keeps it."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def instance_dataset(self, instance_id: str) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(self.instance_file(instance_id)))

    def upload(self, source: Path | bytes) -> str:
        """Store one DICOM file through REST (POST /instances); returns the instance id."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        answer = json.loads(self.request("POST", "/instances", data, content_type="application/dicom"))
        return answer["ID"]

    def find_instances(self, query: Mapping[str, str]) -> list[str]:
        """Instance ids whose tags match `query` ({keyword: value}, wildcards allowed)."""
        return self.json("POST", "/tools/find", {"Level": "Instance", "Query": dict(query)})

    def find_by_sop_class(self, sop_class_uid: str) -> list[str]:
        return self.find_instances({"SOPClassUID": sop_class_uid})

    def delete_all(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient_id in self.json("GET", "/patients"):
            self.request("DELETE", f"/patients/{patient_id}")

    # -- DICOM network (Orthanc as SCU) ------------------------------------------
    def modalities(self) -> list[str]:
        return self.json("GET", "/modalities")

    def put_modality(self, name: str, *, ae_title: str, host: str, port: int, **options: Any) -> None:
        """Add or replace a DICOM peer at runtime (PUT /modalities/{name})."""
        self.json("PUT", f"/modalities/{name}", {"AET": ae_title, "Host": host, "Port": port, **options})

    def echo_modality(self, name: str) -> bool:
        """C-ECHO from Orthanc to the peer; True when it answered."""
        try:
            self.request("POST", f"/modalities/{name}/echo", b"{}")
        except OrthancError:
            return False
        return True

    def store_to_modality(self, name: str, resource_ids: Sequence[str] | str) -> dict:
        """C-STORE resources (instance/series/study ids) to a peer, as a PACS routes.

        Synchronous: returns once every C-STORE response came back, with Orthanc's
        job summary (InstancesCount, FailedInstancesCount, ...). Raises OrthancError
        when the association or any store failed.
        """
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        return self.json(
            "POST", f"/modalities/{name}/store", {"Resources": ids, "Synchronous": True}
        )


class OrthancServer:
    """One Orthanc process with its own storage, config and log under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = DEFAULT_AE_TITLE,
        modalities: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        dicom_port: int | None = None,
    ):
        self.workdir = workdir
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.overrides = dict(overrides or {})
        self.config_path = workdir / "orthanc.json"
        self.http_port: int | None = None
        # Given: a port chosen in advance (a PACS that comes up where a node already sends).
        self._fixed_dicom_port = dicom_port
        self.dicom_port: int | None = dicom_port
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def client(self) -> OrthancClient:
        return OrthancClient(self.url)

    def start(self, *, timeout: float = 60) -> OrthancServer:
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)

        def spawn(_attempt: int) -> ManagedProcess:
            if self._fixed_dicom_port is None:
                self.http_port, self.dicom_port = free_ports(2)
            else:
                (self.http_port,) = free_ports(1)
            config = orthanc_config(
                self.workdir,
                http_port=self.http_port,
                dicom_port=self.dicom_port,
                ae_title=self.ae_title,
                modalities=self.modalities,
                overrides=self.overrides,
            )
            self.config_path.write_text(json.dumps(config, indent=2))
            # A file, not the folder: given a folder, Orthanc merges every *.json in it.
            command = [binary, "--verbose", self.config_path]
            return ManagedProcess(
                f"Orthanc {self.ae_title}", command, log_path=self.workdir / "orthanc.log"
            )

        self.process = start_until_ready(spawn, self._ready, timeout=timeout)
        return self

    def _ready(self, _process: ManagedProcess) -> bool:
        # Ready means both doors are open: REST (GET /system) and DICOM (C-ECHO).
        return self.client.is_up() and echoscu(self.dicom_port, self.ae_title, timeout=10).ok

    def stop(self, *, graceful: bool = False) -> None:
        """End the process. By default SIGKILL: its storage is thrown away, and a
        graceful Orthanc shutdown spends about 3 s waiting for its server threads."""
        if self.process is not None:
            self.process.stop(graceful=graceful)

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def modality(ae_title: str, port: int, host: str = "127.0.0.1") -> list:
    """A DicomModalities entry: ``[AET, host, port]``."""
    return [ae_title, host, port]

