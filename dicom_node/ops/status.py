"""`dicom-node status`: is the node running, its queue, its last errors, its health."""

from __future__ import annotations

import json

from dicom_node.ops.health import queue_depth
from dicom_node.ops.runlock import running_node_pid


def fetch_health(config) -> dict:
    """The running node's GET /health answer (200 or 503 both carry the report)."""
    import urllib.error
    import urllib.request

    host = config.health.host if config.health.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host}:{config.health.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 503: degraded, the body says why
        return json.load(error)
    except (OSError, ValueError) as error:
        return {"status": "unreachable", "problems": [f"GET {url}: {error}"]}


def status_report(config, queue) -> dict:
    """What `dicom-node status` shows: is the node running, the queue, the last errors."""
    stats = queue.stats()
    pid = running_node_pid(config.node.data_dir)
    report = {
        "node": {"running": pid is not None, "pid": pid or None, "data_dir": str(config.node.data_dir)},
        "queue_depth": queue_depth(stats),
        **stats,
    }
    if config.health.enabled and pid is not None:
        report["health"] = fetch_health(config)
    return report


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


def format_status(report: dict) -> str:
    """The report as the lines `dicom-node status` prints."""
    lines: list[str] = []
    add = lines.append
    node = report["node"]
    running = f"running (pid {node['pid']})" if node["running"] else "not running"
    add(f"node:        {running}, data_dir {node['data_dir']}")
    health = report.get("health")
    if health:
        add(f"health:      {health.get('status')}" + "".join(f"; {p}" for p in health.get("problems", [])))
        if "workers" in health:
            workers = health["workers"]
            listening = "listening" if health.get("scp_listening") else "NOT listening"
            add(f"             SCP {listening}, workers alive {workers['alive']}/{workers['expected']}")
    add(f"jobs:        {_states(report['jobs'])} (queue depth {report['queue_depth']})")
    add(f"oldest pending job: {_age(report['oldest_pending_job_age_seconds'])}")
    add(f"deliveries:  {_states(report['deliveries'])}")
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
