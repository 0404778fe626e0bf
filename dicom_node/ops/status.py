"""`dicom-node status`: is the node running, is it healthy, its queue, its last errors.

The health part is the same report as GET /health (ops/health.py), built in this process:
the job table and the free space are read here; what only the node knows (SCP listening,
workers alive, C-STOREs refused lately) comes from the state file it keeps in data_dir
(ops/state.py), so `status` does not depend on ``[health]`` being enabled.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from dicom_node.ops.health import assess, queue_depth
from dicom_node.ops.runlock import running_node_pid
from dicom_node.ops.state import read_state


def status_report(config, queue) -> dict:
    """What `dicom-node status` shows: is the node running and healthy, the queue, the last errors."""
    stats = queue.stats()
    pid = running_node_pid(config.node.data_dir)
    node = {"running": pid is not None, "pid": pid or None, "data_dir": str(config.node.data_dir)}
    if pid is None:
        live, live_error = None, f"no dicom-node is running on {config.node.data_dir}"
    else:
        live, live_error, document = read_state(config.node.data_dir, pid=pid)
        if document is not None:
            node["state_age_seconds"] = round(max(0.0, time.time() - document["written_at"]), 1)
            node["listening"] = document.get("listening")
    _, health = assess(config, queue, live, live_error=live_error)
    return {
        "node": node,
        "health": health,
        "queue_depth": queue_depth(stats),
        **stats,
        "delivery": health["delivery"],
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _states(counts: dict) -> str:
    return ", ".join(f"{state} {count}" for state, count in counts.items())


def _when(at: str | datetime | None, now: datetime | None = None) -> str:
    """An ISO time (UTC) as "at <time> (in 25 s)", or "now" when it is due."""
    if at is None:
        return "-"
    at = datetime.fromisoformat(at) if isinstance(at, str) else at
    now = now or datetime.now(timezone.utc)
    wait = (at - now).total_seconds()
    if wait <= 0:
        return "due now"
    return f"at {at.isoformat(timespec='seconds')} (in {_age(wait)})"


def format_status(report: dict) -> str:
    """The report as the lines `dicom-node status` prints."""
    lines: list[str] = []
    add = lines.append
    node = report["node"]
    running = f"running (pid {node['pid']})" if node["running"] else "not running"
    add(f"node:        {running}, data_dir {node['data_dir']}")
    health = report["health"]
    add(f"health:      {health['status']}")
    for problem in health["problems"]:
        add(f"  problem:   {problem}")
    if health.get("workers") is not None:
        listening = "listening" if health.get("scp_listening") else "NOT listening"
        workers = health["workers"]
        add(f"             SCP {listening}, workers alive {workers['alive']}/{workers['expected']} "
            f"(node state {int(node.get('state_age_seconds', 0))} s old)")
    add(f"jobs:        {_states(report['jobs'])} (queue depth {report['queue_depth']})")
    add(f"oldest pending job: {_age(report['oldest_pending_job_age_seconds'])}")
    add(f"deliveries:  {_states(report['deliveries'])}")
    delivery = report.get("delivery") or {}
    nxt = delivery.get("next_attempt")
    if nxt:
        add(f"next delivery attempt: {_when(nxt['at'])}, job {nxt['job_id']} to {nxt['destination']}")
    instances = report.get("instances") or {}
    if instances:
        add(f"instances:   {instances['total']} stored, {instances['missing']} missing their file")
    for missing in report.get("missing_instances") or []:
        add(f"  missing: {missing['sop_instance_uid']} at {missing['path']}")
    errors = report.get("last_errors") or []
    add("last errors:" + ("" if errors else " none"))
    for error in errors:
        where = f" -> {error['destination']}" if error.get("destination") else ""
        add(f"  {error.get('at')}  job {error.get('job_id')}{where}  study {error.get('study_uid')}")
        add(f"      {error.get('error')}")
    return "\n".join(lines)


def start_line(config, port: int) -> str:
    """The one line `serve` prints on stdout once it listens: where, where results go, how to try it."""
    node = config.node
    if config.destinations:
        results = "results go to " + ", ".join(
            f"{d.name} ({d.ae_title} at {d.host}:{d.port})" for d in config.destinations
        )
    else:
        results = "results go nowhere (no [[destinations]] configured)"
    here = "127.0.0.1" if node.host in ("", "0.0.0.0", "::") else node.host
    callers = config.security.allowed_callers
    calling = f"-aet {callers[0].ae_title} " if callers and not config.security.allow_any_caller else ""
    tls = "+tls client.key client.crt +cf ca.crt " if config.security.tls.enabled else ""
    folder = "/tmp/dicom-node-test"
    return (
        f"dicom-node: receiving as {node.ae_title} on {node.host}:{port}; {results}; "
        f"to send a test image: dicom-node phantom --out {folder} --n 1 && "
        f"storescu {tls}{calling}-aec {node.ae_title} {here} {port} +sd +r {folder}/images"
    )
