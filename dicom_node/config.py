"""The node's one typed configuration, loaded from TOML and validated once at startup.

Every section forbids unknown keys, so a typo is a startup error naming the key
(``ConfigError: detector.score_treshold: unknown key``) instead of a silently
ignored setting. Relative paths are resolved against the config file's folder,
so the same file works from any working directory (systemd, scripts, tests).
"""

from __future__ import annotations

import re
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from dicom_node.errors import ConfigError

Output = Literal["gsps", "sr", "sc"]  # the results a destination may take (DestinationConfig.outputs)
Architecture = Literal[
    "retinanet_r101_fpn",  # the study's best model, the default
    "retinanet_r50_fpn",
    "faster_rcnn_r101_fpn",
    "faster_rcnn_r50_fpn",
    # Small backbone used only by the shipped demo weights (synthetic masses only).
    "retinanet_r18_fpn",
    # Test double behind the detector interface: returns the boxes listed in the
    # JSON file named by `weights` (relative coordinates). For placement tests only.
    "fixed_boxes",
]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)

ModelT = TypeVar("ModelT", bound=BaseModel)

# The packaged demo checkpoint; ``weights = "demo"`` in the config selects it.
DEMO_WEIGHTS = "demo"


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: an AE title is at most 16 characters of the default character
    # repertoire, without backslash or control characters; all-space is invalid.
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > 16:
        raise ValueError(f"{value!r} is longer than 16 characters")
    if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]+", value):
        raise ValueError(f"{value!r} has characters not allowed in an AE title")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


# Where a model runs: the node's workers and training take the same values.
Device = Annotated[str, AfterValidator(_check_device)]

_DURATION = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)([smhd])")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
MAX_DURATION = timedelta(days=36500)


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"48h"``, ``"7d"`` (or ``"1.5h"``) as a timedelta.

    The one parser for durations, in the config (``retention.*``) and on the command
    line (``dicom-node purge --older-than``); ValueError saying what is expected otherwise.
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: a number and a unit s, m, h or d (90s, 30m, 48h, 7d)"
        )
    duration = timedelta(**{_DURATION_UNITS[match[2]]: float(match[1])})
    if duration > MAX_DURATION:  # so that "now - duration" is always a date
        raise ValueError(f"{text!r} is longer than {MAX_DURATION.days}d")
    return duration


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):  # a config built in code (tests)
        return value
    return parse_duration(value)


# A duration string in the TOML; a bare number is refused, so the unit is never guessed.
Duration = Annotated[timedelta, BeforeValidator(_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeConfig(_Section):
    ae_title: AETitle = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112  # 0: pick a free port (tests)
    data_dir: Path = Path("var")
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    # Open TCP connections, associated or not. When all are taken, a new connection
    # replaces the oldest one that has not sent its A-ASSOCIATE-RQ yet, so silent peers
    # cannot lock out the PACS; with none such, it is closed.
    max_connections: Annotated[int, Field(ge=1, le=10000)] = 64
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # An association is aborted after this long, whatever it does (a peer dripping one
    # small PDU now and then would otherwise hold its slot for good).
    max_association_seconds: Annotated[float, Field(gt=0)] = 3600.0
    # The largest data set accepted, as received and as inflated (Deflated transfer
    # syntax); also the largest image (Rows x Columns x frames x bits) a worker decodes.
    # Breast tomosynthesis volumes reach 1-2 GB uncompressed.
    max_dataset_megabytes: Annotated[int, Field(ge=1, le=65536)] = 4096
    # Only for benchmarks and throwaway test nodes: skipping fsync breaks the
    # promise that an acknowledged instance survives a power loss.
    fsync: bool = True
    # Disk watermark: a C-STORE is refused with Out of Resources (0xA700, the sender
    # retries later) when storing it would leave less than this free under data_dir.
    min_free_megabytes: Annotated[int, Field(ge=0)] = 1024
    # SO_REUSEPORT: several receiver processes (`serve` with workers.count = 0, one
    # PostgreSQL queue.url) listen on the same port and the kernel spreads the incoming
    # connections over them, so ingest uses more than one core. Linux 3.9+, BSDs.
    reuse_port: bool = False

    @field_validator("reuse_port")
    @classmethod
    def _platform_has_reuse_port(cls, value: bool) -> bool:
        if value and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("this platform has no SO_REUSEPORT: run one receiver per port")
        return value


class CallerConfig(_Section):
    ae_title: AETitle
    host: str | None = None  # None: any address


class TLSConfig(_Section):
    """DICOM over TLS (PS3.15 Annex B); the files are loaded at startup by dicom_node.tls."""

    enabled: bool = False  # the SCP accepts TLS connections only
    # This node's certificate chain and key (PEM): the SCP's server certificate, and the
    # client certificate the SCU presents to destinations with `tls = true`.
    certificate: Path | None = None
    private_key: Path | None = None
    # CAs trusted for client certificates (SCP) and destination servers (SCU);
    # unset: the SCU trusts the system's CAs.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False
    # PS3.15 B.9/B.10 (BCP 195 profiles): TLS 1.2 or later, never older.
    minimum_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _complete(self) -> "TLSConfig":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key must be set together")
        if self.enabled and self.certificate is None:
            raise ValueError("enabled = true needs certificate and private_key")
        if self.require_client_certificate and not self.enabled:
            raise ValueError("require_client_certificate = true needs enabled = true")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "require_client_certificate = true needs ca_certificates (the CAs that sign "
                "client certificates)"
            )
        return self


class SecurityConfig(_Section):
    # Who may send. An empty list admits anyone only with allow_any_caller = true, so an
    # open node is always a choice someone wrote down (checked when the SCP starts).
    allowed_callers: list[CallerConfig] = Field(default_factory=list)
    allow_any_caller: bool = False
    require_called_ae_title: bool = True
    max_associations_per_caller: Annotated[int, Field(ge=1)] = 8
    # Open TCP connections from one IP address, before anything is known of the peer.
    max_connections_per_address: Annotated[int, Field(ge=1)] = 8
    tls: TLSConfig = Field(default_factory=TLSConfig)


class StudyConfig(_Section):
    # A study is analysed once no new instance has arrived for this long.
    stable_seconds: Annotated[float, Field(ge=0)] = 10.0


class WorkersConfig(_Section):
    # Analysis processes, each with one loaded model. 0 in `serve`: a receiver only (SCP,
    # scheduler, delivery, retention; no model), with `dicom-node worker` processes
    # analysing elsewhere through a PostgreSQL queue.url. README "Scaling out".
    count: Annotated[int, Field(ge=0, le=64)] = 1
    device: Device = "auto"
    lease_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 30.0


class DetectorConfig(_Section):
    # Unset: the checkpoint's (it names its architecture); set, it must be the checkpoint's.
    architecture: Architecture | None = None
    weights: str = DEMO_WEIGHTS
    score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    # Longest image side fed to the model; the pixel pipeline does the resize.
    # Unset: the size the checkpoint was trained at (recorded in the checkpoint).
    input_size: Annotated[int, Field(ge=64, le=8192)] | None = None
    # What to do with images that are not For Presentation 2D mammograms.
    for_processing: Literal["skip", "analyse"] = "skip"
    tomosynthesis: Literal["skip", "central_slice"] = "central_slice"


LongString = Annotated[str, Field(min_length=1, max_length=64)]  # LO: at most 64 characters


class ReportConfig(_Section):
    manufacturer: LongString = "dicom-node"
    series_description: LongString = "AI mass detection (dicom-node, not for diagnosis)"
    content_label: str = "MASS_CAD"
    content_creator_name: LongString = "DICOM_NODE^AI"
    graphic_layer: str = "MASS_DETECTIONS"
    series_number: Annotated[int, Field(ge=1)] = 9901

    @field_validator("content_label", "graphic_layer")
    @classmethod
    def _code_string(cls, value: str) -> str:
        # PS3.3 C.10.9 Content Label is a CS: upper case, digits, space, underscore, <= 16.
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", value):
            raise ValueError(f"{value!r} is not a valid CS (A-Z, 0-9, space, _; at most 16)")
        return value


class DestinationConfig(_Section):
    name: Annotated[str, Field(min_length=1)]
    ae_title: AETitle
    host: str
    port: Port
    # DICOM over TLS (PS3.15 B.9): the destination's certificate must be signed by
    # security.tls.ca_certificates (or a system CA) and name tls_server_name (default: host).
    tls: bool = False
    tls_server_name: str | None = None
    # What the destination gets of each analysed study (README "What the radiologist sees"):
    # "gsps", the presentation state (Weasis, most PACS workstations); "sr", the TID 1500
    # structured report (OHIF); "sc", burned-in Secondary Captures, one per analysed image (any
    # viewer that shows images). Each is its own delivery.
    outputs: Annotated[list[Output], Field(min_length=1)] = ["gsps"]

    @field_validator("outputs")
    @classmethod
    def _each_output_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists an output twice: {value}")
        return value


class DeliveryConfig(_Section):
    max_attempts: Annotated[int, Field(ge=1)] = 20
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 10.0
    max_backoff_seconds: Annotated[float, Field(ge=0)] = 600.0
    lease_seconds: Annotated[float, Field(gt=0)] = 120.0


class HealthConfig(_Section):
    """What counts as healthy (GET /health and `dicom-node status`); the HTTP endpoint is off by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080  # 0: pick a free port (tests)
    # Degraded (HTTP 503) when the oldest pending job has waited longer than this.
    max_pending_age_seconds: Annotated[float, Field(gt=0)] = 1800.0
    # ... when the oldest pending delivery (a result not yet sent) has waited longer than this.
    max_pending_delivery_age_seconds: Annotated[float, Field(gt=0)] = 1800.0
    # ... when a C-STORE was refused (disk space, bad dataset...) within this many seconds.
    refusal_window_seconds: Annotated[float, Field(gt=0)] = 300.0


class MetricsConfig(_Section):
    """Prometheus metrics (GET /metrics, dicom_node.ops.metrics); off by default, loopback by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    # 9464: the port OpenTelemetry's Prometheus exporter uses; free on most hosts.
    port: Annotated[int, Field(ge=0, le=65535)] = 9464  # 0: pick a free port (tests)


class RetentionConfig(_Section):
    """What the node removes once it is no longer needed (dicom_node.ops.retention).

    Only studies whose every analysis is done and every result delivered to every
    destination are ever removed; the PACS then holds the images and the GSPS.
    """

    enabled: bool = True
    # Age, counted from when the study became fully delivered, after which it is removed.
    # 7 days: long enough to look into a question about a result within the week (weekend
    # included), short enough that the node does not become a second, unmanaged archive
    # of patient images (data minimisation; the PACS is the archive).
    keep_delivered_for: Duration = timedelta(days=7)
    # Under this free space on data_dir, delivered studies are removed early, oldest
    # first, whatever their age. None: twice node.min_free_megabytes, so retention
    # frees space before the SCP starts refusing C-STOREs (0xA700).
    min_free_megabytes: Annotated[int, Field(ge=0)] | None = None
    check_interval: Duration = timedelta(minutes=1)

    @field_validator("keep_delivered_for", "check_interval")
    @classmethod
    def _long_enough(cls, value: timedelta, info) -> timedelta:
        floor = timedelta(seconds=1) if info.field_name == "check_interval" else timedelta(0)
        if value < floor:
            raise ValueError(f"must be at least {floor.total_seconds():g}s")
        return value

    def min_free_bytes(self, node: NodeConfig) -> int:
        """The free-space level under which delivered studies are removed early, in bytes."""
        megabytes = self.min_free_megabytes
        if megabytes is None:
            megabytes = 2 * node.min_free_megabytes
        return megabytes * 1024 * 1024


def _queue_url(value: str | None) -> str | None:
    """A SQLite file or a PostgreSQL database on psycopg 3; the password never in a message."""
    if value is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(
            "not a database URL (sqlite:///path or postgresql+psycopg://user@host/database)"
        ) from None
    shown = url.render_as_string(hide_password=True)
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "postgresql":
        if "+" not in url.drivername:  # plain postgresql://: the one driver we ship
            url = url.set(drivername="postgresql+psycopg")
        elif driver != "psycopg":
            raise ValueError(f"{shown}: use the psycopg 3 driver (postgresql+psycopg://...)")
    elif backend != "sqlite" or not url.database or url.database == ":memory:":
        raise ValueError(f"{shown}: the job table runs on a SQLite file or on PostgreSQL")
    return url.render_as_string(hide_password=False)


class QueueConfig(_Section):
    # SQLAlchemy URL of the job table. Unset: the SQLite file dicom-node.sqlite in
    # node.data_dir. postgresql://role@host/database (psycopg 3) for a shared server;
    # its password is best left to PGPASSWORD or ~/.pgpass (libpq reads both).
    url: Annotated[str | None, AfterValidator(_queue_url)] = None


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


_ANY_ADDRESS = {"", "0.0.0.0", "::"}  # a server listening there takes the port on every address


def _invalid(loc: tuple[str, ...], value, kind: str, template: str, **context) -> ValidationError:
    """A validation error of the whole config that names the key at `loc` (a cross-section rule)."""
    error = PydanticCustomError(kind, template, context)
    return ValidationError.from_exception_data("Config", [InitErrorDetails(type=error, loc=loc, input=value)])


class Config(_Section):
    node: NodeConfig = Field(default_factory=NodeConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[DestinationConfig]) -> list[DestinationConfig]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, repeated: {duplicates}")
        return value

    @model_validator(mode="after")
    def _retention_before_refusal(self) -> "Config":
        # Retention must free space before the SCP refuses C-STOREs, not after.
        level, floor = self.retention.min_free_megabytes, self.node.min_free_megabytes
        if level is not None and level < floor:
            raise _invalid(
                ("retention", "min_free_megabytes"), level, "retention_level",
                "{level} is below node.min_free_megabytes ({floor}): retention must free space "
                "before the SCP refuses C-STOREs",
                level=level, floor=floor,
            )
        return self

    @model_validator(mode="after")
    def _receiver_needs_a_shared_queue(self) -> "Config":
        # A receiver's studies are analysed by `dicom-node worker` processes, which need a
        # job table they can share: on the SQLite default nothing would ever analyse them.
        if self.workers.count == 0 and not self.shared_queue:
            raise _invalid(
                ("workers", "count"), 0, "receiver_without_queue",
                "0 (a receiver only) needs a PostgreSQL queue.url that `dicom-node worker` "
                "processes share; with the SQLite default the workers run inside serve (1 or more)",
            )
        return self

    @model_validator(mode="after")
    def _metrics_port_of_its_own(self) -> "Config":
        # Two servers cannot listen on one address: say which key, before anything starts.
        metrics = self.metrics
        if not metrics.enabled or metrics.port == 0:
            return self
        taken = {"node.port": (self.node.host, self.node.port)}
        if self.health.enabled:
            taken["health.port"] = (self.health.host, self.health.port)
        for key, (host, port) in taken.items():
            if port == metrics.port and (host == metrics.host or {host, metrics.host} & _ANY_ADDRESS):
                raise _invalid(("metrics", "port"), port, "port_taken", "{port} is also {key}", port=port, key=key)
        return self

    @property
    def shared_queue(self) -> bool:
        """Whether the job table is a PostgreSQL server that several processes and hosts
        may share (one data_dir, many receivers and workers); SQLite is one node's."""
        return bool(self.queue.url and self.queue.url.startswith("postgresql"))

    @property
    def database_url(self) -> str:
        """queue.url, or the SQLite file in node.data_dir (the default)."""
        return self.queue.url or f"sqlite:///{self.node.data_dir / 'dicom-node.sqlite'}"

    @property
    def outputs_by_destination(self) -> dict[str, list[str]]:
        """Destination name -> the outputs it takes."""
        return {destination.name: list(destination.outputs) for destination in self.destinations}

    def destination(self, name: str) -> DestinationConfig:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise ConfigError(f"destinations: no destination named {name!r}")


def _error_location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = _error_location(item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{key}: {message}")
    return f"{source}: " + "; ".join(lines)


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(path: Path | None) -> Path | None:
        if path is None or path.is_absolute():
            return path
        return (base / path).resolve()

    node = config.node.model_copy(update={"data_dir": resolve(config.node.data_dir)})
    tls = config.security.tls
    tls = tls.model_copy(
        update={
            "certificate": resolve(tls.certificate),
            "private_key": resolve(tls.private_key),
            "ca_certificates": resolve(tls.ca_certificates),
        }
    )
    security = config.security.model_copy(update={"tls": tls})
    detector = config.detector
    if detector.weights != DEMO_WEIGHTS:
        detector = detector.model_copy(update={"weights": str(resolve(Path(detector.weights)))})
    queue = config.queue
    if queue.url and queue.url.startswith("sqlite:///") and not queue.url.startswith("sqlite:////"):
        # A relative SQLite file, like every other path: against the config file's folder.
        queue = queue.model_copy(update={"url": f"sqlite:///{resolve(Path(queue.url[len('sqlite:///'):]))}"})
    return config.model_copy(
        update={"node": node, "security": security, "detector": detector, "queue": queue}
    )


def validate_model(model: type[ModelT], data: dict, *, source: str) -> ModelT:
    """``data`` validated as ``model``; a ConfigError naming each bad key otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def parse_config(data: dict, *, base_dir: Path, source: str = "config") -> Config:
    """Validate a config mapping; relative paths resolve against ``base_dir``."""
    return _resolve_paths(validate_model(Config, data, source=source), base_dir)


def load_config(path: str | Path) -> Config:
    """Load and validate the TOML file at ``path``; raise ConfigError naming the bad key."""
    path = Path(path)
    return parse_config(read_toml(path), base_dir=path.resolve().parent, source=str(path))


def read_toml(path: Path, *, what: str = "config file") -> dict:
    """The TOML mapping in ``path``; an unreadable or invalid file is a ConfigError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {what} ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
