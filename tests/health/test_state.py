"""The node's state file (ops/state.py) and how `dicom-node status` reads it.

`status` runs in another process than the node: the state file is how it learns what only
the node knows (SCP, workers, recent refusals), with or without [health] enabled.
"""

from __future__ import annotations

import json
import os
import time

from dicom_node.cli import main
from dicom_node.ops.health import Liveness
from dicom_node.ops.runlock import RunLock
from dicom_node.ops.state import (
    STALE_AFTER_SECONDS,
    StateWriter,
    read_state,
    state_document,
    state_path,
)

LISTENING = {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 11112}
REFUSING = Liveness(scp_listening=True, workers_alive=1, workers_expected=1, refused_recently=2,
                    last_refusal_reason="disk space low: 12 MB free, node.min_free_megabytes is 1024")  # fmt: skip


def test_writer_keeps_the_file_current_and_removes_it_at_stop(tmp_path):
    snapshots = iter([REFUSING] + [Liveness(scp_listening=False, workers_alive=0, workers_expected=1)] * 1000)
    writer = StateWriter(tmp_path, lambda: next(snapshots), listening=LISTENING, every=0.05).start()
    try:
        live, problem, document = read_state(tmp_path, pid=os.getpid())
        assert (live, problem) == (REFUSING, None)  # written at start, before the first interval
        assert document["listening"] == LISTENING
        deadline = time.monotonic() + 30
        while read_state(tmp_path, pid=os.getpid())[0].scp_listening and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_state(tmp_path, pid=os.getpid())[0].workers_alive == 0
        assert not [p for p in tmp_path.iterdir() if p.name != state_path(tmp_path).name]  # no temp files left
    finally:
        writer.stop()
    assert not state_path(tmp_path).exists()


def write_state(data_dir, live: Liveness, *, pid: int, age: float = 0.0) -> None:
    document = state_document(live, listening=LISTENING, pid=pid, now=time.time() - age)
    state_path(data_dir).write_text(json.dumps(document))


def test_a_state_file_that_cannot_be_trusted_is_a_problem_not_a_guess(tmp_path):
    live, problem, _ = read_state(tmp_path, pid=123)
    assert live is None and "has not written" in problem and "still starting" in problem
    write_state(tmp_path, REFUSING, pid=456)
    live, problem, _ = read_state(tmp_path, pid=123)
    assert live is None and "written by pid 456, not by the running node (pid 123)" in problem
    write_state(tmp_path, REFUSING, pid=123, age=STALE_AFTER_SECONDS + 10)
    live, problem, _ = read_state(tmp_path, pid=123)
    assert live is None and problem.startswith("the node's state file is stale: written 30 s ago")
    state_path(tmp_path).write_text("{not json")
    live, problem, _ = read_state(tmp_path, pid=123)
    assert live is None and "cannot be read (JSONDecodeError" in problem


def status_config(tmp_path, **health) -> str:
    data = tmp_path / "data"
    data.mkdir()
    path = tmp_path / "node.toml"
    lines = [f"[node]\ndata_dir = {str(data)!r}\nmin_free_megabytes = 0\n[logging]\nlevel = 'warning'\n[health]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in health.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_status_reports_the_refusals_of_the_running_node_without_the_health_endpoint(tmp_path, capsys):
    config = status_config(tmp_path, enabled=False)
    data = tmp_path / "data"
    lock = RunLock(data).acquire()  # this process stands in for the node
    try:
        write_state(data, REFUSING, pid=os.getpid(), age=1)
        assert main(["status", "--config", config]) == 0
        text = capsys.readouterr().out
        assert main(["status", "--config", config, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)

        write_state(data, REFUSING, pid=os.getpid(), age=STALE_AFTER_SECONDS + 5)
        assert main(["status", "--config", config]) == 0
        stale = capsys.readouterr().out
    finally:
        lock.release()
    assert "health:      degraded" in text
    assert ("  problem:   2 C-STOREs refused in the last 300 s (last: disk space low: 12 MB free, "
            "node.min_free_megabytes is 1024)") in text  # fmt: skip
    assert "SCP listening, workers alive 1/1 (node state 1 s old)" in text
    assert report["health"]["status"] == "degraded"
    assert report["health"]["c_stores_refused"]["count"] == 2
    assert report["node"]["listening"] == LISTENING
    assert "problem:   the node's state file is stale: written 25 s ago" in stale


def test_status_of_a_healthy_running_node_is_ok(tmp_path, capsys):
    config = status_config(tmp_path)
    data = tmp_path / "data"
    lock = RunLock(data).acquire()
    try:
        write_state(data, Liveness(scp_listening=True, workers_alive=2, workers_expected=2), pid=os.getpid())
        assert main(["status", "--config", config]) == 0
    finally:
        lock.release()
    text = capsys.readouterr().out
    assert "health:      ok" in text and "problem" not in text
