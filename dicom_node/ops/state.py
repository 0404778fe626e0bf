"""``data_dir/node-state.json``: what the running node knows, for `dicom-node status`.

`status` runs in another process than the node. The job table tells it about jobs and
deliveries, the free space it measures itself; but whether the SCP listens, how many
workers are alive and which C-STOREs were refused lately live only in the node's memory.
The node rewrites this small file every `WRITE_EVERY_SECONDS` (atomically: temp file and
rename, so a reader never sees half of it) and removes it when it stops.

Why a file and not GET /health: it works whether or not ``[health]`` is enabled, needs no
port and no network path from wherever `status` runs to the health listener, and a hung
node shows as a stale file (older than `STALE_AFTER_SECONDS`) instead of a timeout.
The run lock (ops/runlock.py) remains what says whether a node runs at all.

The file holds counts, our own refusal reasons and the listening address; no patient data.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dicom_node.log import get_logger
from dicom_node.ops.health import Liveness

log = get_logger("dicom_node.ops.state")

STATE_NAME = "node-state.json"
WRITE_EVERY_SECONDS = 2.0
# Ten missed writes: the node is hung (or starved) rather than busy for a moment.
STALE_AFTER_SECONDS = 20.0
STATE_FORMAT = "dicom-node-state/1"


def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_NAME


def state_document(live: Liveness, *, listening: dict, pid: int, now: float) -> dict:
    """The JSON written to the state file."""
    return {"format": STATE_FORMAT, "pid": pid, "written_at": now, "listening": listening, **asdict(live)}


def read_state(data_dir: Path, *, pid: int, now: float | None = None) -> tuple[Liveness | None, str | None, dict | None]:
    """(Liveness, None, document) from the state file of the node running as `pid` (0: any).

    (None, problem, document or None) when it cannot be trusted: missing, unreadable,
    written by another process (a node that crashed), or stale.
    """
    now = time.time() if now is None else now
    path = state_path(data_dir)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != STATE_FORMAT:
            raise ValueError(f"format {document.get('format')!r}")
        live = Liveness(**{key: document[key] for key in Liveness.__dataclass_fields__})
        written_at = float(document["written_at"])
    except FileNotFoundError:
        return None, f"the node (pid {pid}) has not written {path} yet: still starting?", None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{path} cannot be read ({type(error).__name__}: {error})", None
    # pid 0: processes sharing data_dir (PostgreSQL) name none; the file is then the last
    # writer's among the receivers, trusted while fresh.
    if pid and document.get("pid") != pid:
        return None, f"{path} was written by pid {document.get('pid')}, not by the running node (pid {pid})", None
    age = now - written_at
    if age > STALE_AFTER_SECONDS:
        return None, (
            f"the node's state file is stale: written {age:.0f} s ago (it is rewritten every "
            f"{WRITE_EVERY_SECONDS:g} s): the node may be hung"
        ), document
    return live, None, document


class StateWriter:
    """A thread that writes ``snapshot()`` (a `Liveness`) to the state file every few seconds."""

    def __init__(self, data_dir: Path, snapshot: Callable[[], Liveness], *, listening: dict,
                 every: float = WRITE_EVERY_SECONDS):
        self.path = state_path(data_dir)
        self._snapshot = snapshot
        self._listening = listening
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state", daemon=True)
        self._failing = False

    def start(self) -> StateWriter:
        self.write()
        self._thread.start()
        return self

    def write(self) -> None:
        from dicom_node.files import SHARED, write_atomically

        document = state_document(self._snapshot(), listening=self._listening, pid=os.getpid(), now=time.time())
        try:
            write_atomically(self.path, json.dumps(document), fsync=False, mode=SHARED)
        except OSError as error:  # e.g. the disk is full: `status` will call the file stale
            if not self._failing:
                log.warning("state_write_failed", path=str(self.path), error=f"{type(error).__name__}: {error}")
            self._failing = True
            return
        if self._failing:
            log.info("state_write_resumed", path=str(self.path))
        self._failing = False

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.write()
            except Exception as error:  # keep writing; a snapshot may fail during shutdown
                log.error("state_write_error", error=f"{type(error).__name__}: {error}")

    def stop(self) -> None:
        """Stop writing and remove the file: no state is better than a stopped node's."""
        self._stop.set()
        self._thread.join(10)
        self.path.unlink(missing_ok=True)
