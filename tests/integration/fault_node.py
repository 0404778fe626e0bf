"""Helpers for the fault tests: a real node with fast retry settings, its CLI, its queue.

The node runs the `fixed_boxes` test double (no model to load), one worker, and
backoffs of about a second, so that a retry is seen within a test's time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_node.config import load_config
from dicom_node.queue import Job, Queue

from .node_process import NodeProcess, write_config
from .process import wait_for

NODE_AE = "DICOM_NODE"
CLI_TIMEOUT_SECONDS = 120
JOB_TIMEOUT_SECONDS = 120


def fixed_boxes(folder: Path, boxes=((0.25, 0.30, 0.50, 0.55, 0.91),)) -> Path:
    path = folder / "boxes.json"
    path.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": [list(b) for b in boxes]}))
    return path


def write_node_config(folder: Path, *, destinations: Sequence[dict] = (), **sections: dict) -> Path:
    """A node config under `folder` (data in folder/data); `sections` override the defaults."""
    folder.mkdir(parents=True, exist_ok=True)
    defaults = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(folder / "data"),
                 "min_free_megabytes": 1},
        "study": {"stable_seconds": 1},
        "workers": {"count": 1, "device": "cpu", "retry_backoff_seconds": 1, "max_attempts": 3},
        "detector": {"architecture": "fixed_boxes", "weights": str(fixed_boxes(folder))},
        "delivery": {"retry_backoff_seconds": 0.5, "max_backoff_seconds": 1, "max_attempts": 3},
    }
    for section, values in sections.items():
        defaults[section] = {**defaults.get(section, {}), **values}
    return write_config(folder / "node.toml", defaults, destinations=list(destinations))


class FaultNode:
    """A `dicom-node serve` process plus its config, CLI and queue (read by the test)."""

    def __init__(self, config: Path):
        self.config = config
        self.process = NodeProcess(config)
        self.queue = Queue(load_config(config).database_url)

    @property
    def port(self) -> int:
        return self.process.port

    def start(self) -> FaultNode:
        self.process.start()
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """The real `dicom-node ARGS --config <this node's config>`."""
        command = [sys.executable, "-m", "dicom_node", args[0], "--config", str(self.config), *args[1:]]
        return subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)

    def job_of(self, study_uid: str, *, generation: int = 1) -> Job | None:
        for job in self.queue.list_jobs(limit=1000):
            if job.study_uid == study_uid and job.generation == generation:
                return job
        return None

    def wait_for_job(self, study_uid: str, state: str, *, generation: int = 1,
                     timeout: float = JOB_TIMEOUT_SECONDS) -> Job:
        """Wait until the study's job reaches `state`; fail at once if the node exits."""

        def reached():
            if self.process.process.poll() is not None:
                raise RuntimeError(f"dicom-node exited:\n{self.process.output()}")
            job = self.job_of(study_uid, generation=generation)
            return job if job is not None and job.state == state else None

        return wait_for(reached, timeout, description=f"study {study_uid} job {state}")

    def wait_for_event(self, name: str, count: int = 1, *, timeout: float = JOB_TIMEOUT_SECONDS,
                       **fields) -> list[dict]:
        """Wait until `count` log events `name` (with these field values) were logged."""

        def logged():
            found = [e for e in self.process.events(name) if all(e.get(k) == v for k, v in fields.items())]
            return found if len(found) >= count else None

        return wait_for(logged, timeout, description=f"{count} {name} event(s) {fields or ''}")

    def stop(self) -> int:
        self.queue.close()
        return self.process.stop()
