"""Is the node alive and well? The HTTP health endpoint.

- `health_report` turns queue statistics and liveness into (HTTP status, JSON body):
  200 ``"status": "ok"``, or 503 ``"status": "degraded"`` with the problems found.
- `HealthServer` answers ``GET /health`` from a stdlib HTTP server thread in the main
  process (``[health] enabled = true``; off by default, loopback by default).

The body carries counts, ages, UIDs and our own error messages, never patient data.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dicom_node.config import Config
from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger("dicom_node.ops.health")

HEALTH_PATH = "/health"
MAX_ERROR_CHARS = 300  # per last error in the report
REQUEST_TIMEOUT_SECONDS = 10  # a client that stops talking cannot hold a thread for long


def queue_depth(stats: dict) -> int:
    """Jobs not finished yet: pending plus running."""
    jobs = stats.get("jobs", {})
    return int(jobs.get("pending", 0)) + int(jobs.get("running", 0))


def _json_value(value):
    return value.isoformat() if isinstance(value, datetime) else value


def _errors(stats: dict) -> list[dict]:
    errors = []
    for item in stats.get("last_errors", ()):
        item = {key: _json_value(value) for key, value in item.items()}
        if isinstance(item.get("error"), str):
            item["error"] = item["error"][:MAX_ERROR_CHARS]
        errors.append(item)
    return errors


def health_report(
    *,
    stats: dict | None,
    scp_listening: bool,
    workers_alive: int,
    workers_expected: int,
    max_pending_age_seconds: float,
    stats_error: str | None = None,
) -> tuple[int, dict]:
    """(HTTP status, body): 200 when nothing is wrong, 503 with the problems otherwise.

    Degraded: the SCP is not listening, no worker process is alive, the oldest pending
    job has waited longer than `max_pending_age_seconds`, or the queue cannot be read.
    """
    problems = []
    if not scp_listening:
        problems.append("the DICOM SCP is not listening")
    if workers_alive == 0:
        problems.append("no worker process is alive")
    oldest = None
    if stats is None:
        problems.append(f"the job table cannot be read ({stats_error or 'unknown error'})")
    else:
        oldest = stats.get("oldest_pending_job_age_seconds")
        if oldest is not None and oldest > max_pending_age_seconds:
            problems.append(
                f"the oldest pending job has waited {oldest:.0f} s "
                f"(health.max_pending_age_seconds is {max_pending_age_seconds:g})"
            )
    body = {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "scp_listening": scp_listening,
        "workers": {"alive": workers_alive, "expected": workers_expected},
        "queue_depth": None if stats is None else queue_depth(stats),
        "oldest_pending_job_age_seconds": oldest,
        "jobs": None if stats is None else stats.get("jobs"),
        "deliveries": None if stats is None else stats.get("deliveries"),
        "last_errors": [] if stats is None else _errors(stats),
    }
    status = HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK
    return int(status), body


def scp_is_listening(server) -> bool:
    """True while the association server's listening socket is open."""
    sock = getattr(server, "socket", None)
    return sock is not None and sock.fileno() != -1


class _Handler(BaseHTTPRequestHandler):
    server_version = "dicom-node"
    timeout = REQUEST_TIMEOUT_SECONDS

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0].rstrip("/") != HEALTH_PATH:
            self._answer(int(HTTPStatus.NOT_FOUND), {"error": f"not found; try GET {HEALTH_PATH}"})
            return
        try:
            status, body = self.server.probe()
        except Exception as error:  # answer, never drop the connection
            status = int(HTTPStatus.SERVICE_UNAVAILABLE)
            body = {"status": "degraded", "problems": [f"health check failed ({type(error).__name__})"]}
        self._answer(status, body)

    def _answer(self, status: int, body: dict) -> None:
        payload = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("health_request", client=self.client_address[0], request=format % args)


class HealthServer(ThreadingHTTPServer):
    """``GET /health`` answered with ``probe()``; ``stop()`` ends it."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], probe: Callable[[], tuple[int, dict]]):
        super().__init__(address, _Handler)
        self.probe = probe
        self._thread = threading.Thread(target=self.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def start_health_server(config: Config, *, queue, scp, pool) -> HealthServer | None:
    """Serve ``GET /health`` when ``[health] enabled``; None when it is off.

    `scp` is the association server, `pool` the WorkerPool (its ``processes``).
    """
    if not config.health.enabled:
        return None

    def probe() -> tuple[int, dict]:
        try:
            stats, stats_error = queue.stats(), None
        except Exception as error:  # e.g. the database is locked or gone
            stats, stats_error = None, type(error).__name__
        return health_report(
            stats=stats,
            scp_listening=scp_is_listening(scp),
            workers_alive=sum(1 for p in list(pool.processes.values()) if p.is_alive()),
            workers_expected=config.workers.count,
            max_pending_age_seconds=config.health.max_pending_age_seconds,
            stats_error=stats_error,
        )

    address = (config.health.host, config.health.port)
    try:
        server = HealthServer(address, probe)
    except OSError as error:
        raise ConfigError(
            f"health: cannot listen on {address[0]}:{address[1]} ({error.strerror or error})"
        ) from None
    log.info("health_listening", host=server.server_address[0], port=server.port, path=HEALTH_PATH)
    return server.start()
