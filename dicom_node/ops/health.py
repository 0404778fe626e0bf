"""Is the node alive and well? The health report, and the HTTP endpoint that serves it.

- `health_report` turns its inputs into (HTTP status, JSON body): 200 ``"status": "ok"``,
  or 503 ``"status": "degraded"`` with one human-readable line per problem found. It is a
  pure function: the queue's statistics, the free space, and the `Liveness` of the node
  (what only the running process knows: its SCP, its workers, the C-STOREs it refused
  lately) are read by the caller.
- `HealthServer` answers ``GET /health`` from a stdlib HTTP server thread (ops/http.py) in the main
  process (``[health] enabled = true``; off by default, loopback by default).
- `dicom-node status` (ops/status.py) builds the same report in another process, with the
  `Liveness` the node writes to its state file (ops/state.py).

The body carries counts, ages, UIDs and our own error messages, never patient data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus

from dicom_node.config import Config
from dicom_node.ops.http import Answer, EndpointServer, listen

HEALTH_PATH = "/health"
MAX_ERROR_CHARS = 300  # per error in the report
MEGABYTE = 1024 * 1024


@dataclass(frozen=True)
class HealthLimits:
    """Where healthy ends: the thresholds of `health_report`, from the config."""

    max_pending_age_seconds: float = 1800.0
    max_pending_delivery_age_seconds: float = 1800.0
    refusal_window_seconds: float = 300.0
    min_free_bytes: int = 0  # node.min_free_megabytes: below it, C-STOREs are refused

    @classmethod
    def from_config(cls, config: Config) -> HealthLimits:
        return cls(
            max_pending_age_seconds=config.health.max_pending_age_seconds,
            max_pending_delivery_age_seconds=config.health.max_pending_delivery_age_seconds,
            refusal_window_seconds=config.health.refusal_window_seconds,
            min_free_bytes=config.node.min_free_megabytes * MEGABYTE,
        )


@dataclass(frozen=True)
class Liveness:
    """What only the running node knows (and writes to its state file for `status`)."""

    scp_listening: bool
    workers_alive: int
    workers_expected: int
    # C-STOREs refused within HealthLimits.refusal_window_seconds, and the reason given
    # for the latest (our own words, never received values: see receive/activity.py).
    refused_recently: int = 0
    last_refusal_reason: str | None = None


def liveness(config: Config, *, scp, pool) -> Liveness:
    """The running node's `Liveness`: `scp` is the association server, `pool` the WorkerPool."""
    refusals = scp.activity.refusals_since(config.health.refusal_window_seconds)
    return Liveness(
        scp_listening=scp_is_listening(scp),
        workers_alive=sum(1 for p in list(pool.processes.values()) if p.is_alive()),
        workers_expected=config.workers.count,
        refused_recently=len(refusals),
        last_refusal_reason=refusals[-1].reason if refusals else None,
    )


def queue_depth(stats: dict) -> int:
    """Jobs not finished yet: pending plus running."""
    jobs = stats.get("jobs", {})
    return int(jobs.get("pending", 0)) + int(jobs.get("running", 0))


def _json_value(value):
    return value.isoformat() if isinstance(value, datetime) else value


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _errors(stats: dict) -> list[dict]:
    errors = []
    for item in stats.get("last_errors", ()):
        item = {key: _json_value(value) for key, value in item.items()}
        if isinstance(item.get("error"), str):
            item["error"] = item["error"][:MAX_ERROR_CHARS]
        errors.append(item)
    return errors


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _delivery(item: dict) -> str:
    return f"job {item['job_id']} to {item['destination']}: {_clip(item.get('error'))}"


def _live_problems(live: Liveness, limits: HealthLimits) -> list[str]:
    problems = []
    if not live.scp_listening:
        problems.append("the DICOM SCP is not listening")
    if live.workers_alive == 0 and live.workers_expected > 0:  # 0 expected: a receiver only
        problems.append("no worker process is alive")
    if live.refused_recently:
        problems.append(
            f"{_plural(live.refused_recently, 'C-STORE', 'C-STOREs')} refused in the last "
            f"{limits.refusal_window_seconds:g} s (last: {_clip(live.last_refusal_reason) or 'no reason given'})"
        )
    return problems


def _disk_problems(free_bytes: int | None, limits: HealthLimits) -> list[str]:
    if free_bytes is None or free_bytes >= limits.min_free_bytes:
        return []
    return [(
        f"free space on node.data_dir is {free_bytes // MEGABYTE} MB, below node.min_free_megabytes "
        f"({limits.min_free_bytes // MEGABYTE}): C-STOREs are refused with Out of Resources"
    )]


def _queue_problems(stats: dict, deliveries: dict | None, limits: HealthLimits) -> list[str]:
    problems = []
    oldest = stats.get("oldest_pending_job_age_seconds")
    if oldest is not None and oldest > limits.max_pending_age_seconds:
        problems.append(
            f"the oldest pending job has waited {oldest:.0f} s "
            f"(health.max_pending_age_seconds is {limits.max_pending_age_seconds:g})"
        )
    if deliveries:
        if deliveries["failed"]:
            problems.append(
                f"{_plural(deliveries['failed'], 'delivery', 'deliveries')} failed "
                f"(latest: {_delivery(deliveries['latest_failed'])}); "
                "once the destination is fixed: dicom-node jobs retry ID"
            )
        if deliveries["retrying"]:
            problems.append(
                f"{_plural(deliveries['retrying'], 'delivery is', 'deliveries are')} failing and being "
                f"retried (latest: {_delivery(deliveries['latest_retrying'])})"
            )
        waited = deliveries.get("oldest_pending_age_seconds")
        if waited is not None and waited > limits.max_pending_delivery_age_seconds:
            problems.append(
                f"the oldest pending delivery has waited {waited:.0f} s "
                f"(health.max_pending_delivery_age_seconds is {limits.max_pending_delivery_age_seconds:g})"
            )
    missing = (stats.get("instances") or {}).get("missing", 0)
    if missing:
        first = (stats.get("missing_instances") or [{}])[0]
        where = f" (first: {first['sop_instance_uid']} at {first['path']})" if first else ""
        problems.append(
            f"{_plural(missing, 'stored instance has', 'stored instances have')} no file since the "
            f"last start{where}; restore the files, then restart the node"
        )
    return problems


def health_report(
    *,
    stats: dict | None,
    live: Liveness | None,
    limits: HealthLimits = HealthLimits(),
    deliveries: dict | None = None,
    free_bytes: int | None = None,
    stats_error: str | None = None,
    live_error: str | None = None,
) -> tuple[int, dict]:
    """(HTTP status, body): 200 when nothing is wrong, 503 with the problems otherwise.

    Degraded, one problem line each, when: the SCP is not listening; no worker process is
    alive; C-STOREs were refused within `limits.refusal_window_seconds`; the free space on
    data_dir (`free_bytes`) is below the watermark; the oldest pending job or delivery has
    waited too long; a delivery failed, or is failing and being retried; stored instances
    have lost their file; the queue cannot be read (`stats` None, `stats_error` says why);
    or the node's liveness is unknown (`live` None, `live_error` says why).

    `stats` is Queue.stats(), `deliveries` Queue.delivery_stats() (None: not checked),
    `free_bytes` the free space on data_dir (None: not checked).
    """
    problems = []
    if live is None:
        problems.append(live_error or "the node's state is unknown")
    else:
        problems += _live_problems(live, limits)
    problems += _disk_problems(free_bytes, limits)
    if stats is None:
        problems.append(f"the job table cannot be read ({stats_error or 'unknown error'})")
    else:
        problems += _queue_problems(stats, deliveries, limits)
    body = {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "scp_listening": None if live is None else live.scp_listening,
        "workers": None if live is None else {"alive": live.workers_alive, "expected": live.workers_expected},
        "c_stores_refused": None if live is None else {
            "window_seconds": limits.refusal_window_seconds,
            "count": live.refused_recently,
            "last_reason": _clip(live.last_refusal_reason),
        },
        "free_megabytes": None if free_bytes is None else free_bytes // MEGABYTE,
        "queue_depth": None if stats is None else queue_depth(stats),
        "oldest_pending_job_age_seconds": None if stats is None else stats.get("oldest_pending_job_age_seconds"),
        "jobs": None if stats is None else stats.get("jobs"),
        "deliveries": None if stats is None else stats.get("deliveries"),
        "delivery": None if deliveries is None else _delivery_body(deliveries),
        "instances": None if stats is None else stats.get("instances"),
        "last_errors": [] if stats is None else _errors(stats),
    }
    status = HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK
    return int(status), body


def _delivery_body(deliveries: dict) -> dict:
    def plain(item):
        if isinstance(item, dict):
            return {key: plain(value) for key, value in item.items()}
        if isinstance(item, str):
            return _clip(item)
        return _json_value(item)

    return plain(deliveries)


def scp_is_listening(server) -> bool:
    """True while the association server's listening socket is open."""
    sock = getattr(server, "socket", None)
    return sock is not None and sock.fileno() != -1


def _json(status: int, body: dict) -> Answer:
    return int(status), "application/json", json.dumps(body, default=str).encode()


class HealthServer(EndpointServer):
    """``GET /health`` answered with ``probe()`` (HTTP status, body); ``stop()`` ends it."""

    def __init__(self, address: tuple[str, int], probe: Callable[[], tuple[int, dict]]):
        super().__init__(
            address, name="health", path=HEALTH_PATH,
            answer=lambda _headers: _json(*probe()),
            failure=lambda status, message: _json(status, (
                {"error": message} if status == HTTPStatus.NOT_FOUND
                else {"status": "degraded", "problems": [message]}
            )),
        )


def assess(config: Config, queue, live: Liveness | None, *, live_error: str | None = None) -> tuple[int, dict]:
    """Read the queue and the free space on data_dir, then `health_report` with `live`."""
    from dicom_node.store import free_bytes

    try:
        stats, deliveries, stats_error = queue.stats(), queue.delivery_stats(), None
    except Exception as error:  # e.g. the database is locked or gone
        stats, deliveries, stats_error = None, None, type(error).__name__
    try:
        free = free_bytes(config.node.data_dir)
    except OSError:  # data_dir not created yet: nothing stored, nothing refused for space
        free = None
    return health_report(
        stats=stats, deliveries=deliveries, free_bytes=free, live=live, live_error=live_error,
        limits=HealthLimits.from_config(config), stats_error=stats_error,
    )


def start_health_server(config: Config, *, queue, scp, pool) -> HealthServer | None:
    """Serve ``GET /health`` when ``[health] enabled``; None when it is off.

    `scp` is the association server, `pool` the WorkerPool (its ``processes``).
    """
    if not config.health.enabled:
        return None

    def probe() -> tuple[int, dict]:
        return assess(config, queue, liveness(config, scp=scp, pool=pool))

    return listen(HealthServer, "health", config.health.host, config.health.port, probe)
