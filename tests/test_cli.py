"""The CLI's edges: bad config gives one line naming the key and exit 2, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import main

REPO = Path(__file__).resolve().parents[1]


def failure_message(stderr: str) -> str:
    """A command's one failure line: plain text, or from `serve` (whose every stderr line
    is JSON once its config is loaded) the `error` of its command_failed event."""
    (line,) = stderr.strip().splitlines()
    if not line.startswith("{"):
        return line
    event = json.loads(line)
    assert event["event"] == "command_failed", event
    return event["error"]


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_unknown_key_is_one_line_naming_the_key(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[detector]\nscore_treshold = 0.3\n")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "detector.score_treshold: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_is_a_config_error_naming_file_and_architecture(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[security]\nallow_any_caller = true\n"
                      "[detector]\narchitecture = 'retinanet_r50_fpn'\nweights = 'nowhere/model.pt'\n")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "nowhere/model.pt" in result.stderr
    assert "retinanet_r50_fpn" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_to_start_without_its_checkpoint(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(
        "[node]\nport = 0\ndata_dir = 'data'\n[security]\nallow_any_caller = true\n"
        "[detector]\narchitecture = 'retinanet_r50_fpn'\nweights = 'missing.pt'\n"
    )
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "missing.pt" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_port_in_use_is_a_config_error_and_exits(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        boxes = tmp_path / "boxes.json"
        boxes.write_text('{"label": "TEST DOUBLE", "boxes": []}')
        config = tmp_path / "node.toml"
        config.write_text(
            f"[node]\nhost = '127.0.0.1'\nport = {port}\ndata_dir = 'data'\n"
            "[security]\nallow_any_caller = true\n"
            f"[detector]\narchitecture = 'fixed_boxes'\nweights = '{boxes}'\n"
        )
        result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    # Once serve has its config, every line on stderr is a JSON event, the reason included.
    events = [json.loads(line) for line in result.stderr.splitlines()]
    (failed,) = [e for e in events if e["event"] == "command_failed"]
    assert failed["exit_status"] == 2
    assert failed["error"].startswith(f"config error: node.host/node.port: cannot listen on 127.0.0.1:{port}")


def test_purge_with_a_bad_duration_is_one_line_naming_the_argument(tmp_path):
    result = run_cli("purge", "--older-than", "3 weeks", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: argument --older-than: '3 weeks' is not a duration: a number and a unit s, m, h or d "
        "(90s, 30m, 48h, 7d)"]
    assert result.stdout == ""


def test_purge_on_an_empty_data_dir_has_nothing_to_remove(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[node]\ndata_dir = 'data'\n")
    result = run_cli("purge", "--older-than", "0s", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "nothing to remove\n"


# --- where operators put --config, and what they are told --------------------------------


def node_config(tmp_path, text: str = "") -> Path:
    config = tmp_path / "node.toml"
    config.write_text(f"[node]\ndata_dir = 'data'\n[security]\nallow_any_caller = true\n"
                      f"[logging]\nlevel = 'warning'\n{text}")
    return config


def failed_job(config: Path) -> int:
    """A job that failed for good, in the node's queue (no node running)."""
    from datetime import datetime, timezone

    from dicom_node.config import load_config
    from dicom_node.queue import Queue

    queue = Queue(load_config(config).database_url)
    queue.migrate()
    try:
        now = datetime.now(timezone.utc)
        queue.record_instance(sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                              study_uid="1.2.3", series_uid="1.2.3.1", path="/nowhere.dcm",
                              transfer_syntax="1.2.840.10008.1.2.1", calling_ae="MODALITY", size_bytes=1, now=now)  # fmt: skip
        (job_id,) = queue.enqueue_ready_studies(stable_seconds=0, now=now)
        queue.claim_next_job(worker="w", lease_seconds=60, now=now)
        queue.fail_job(job_id, worker="w", error="boom", retryable=False, backoff_seconds=1, max_attempts=1)
        return job_id
    finally:
        queue.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "list", "--config", "{config}"],
        ["jobs", "--config", "{config}", "list"],
        ["--config", "{config}", "jobs", "list"],
        ["jobs", "show", "{job}", "--config", "{config}"],
        ["jobs", "retry", "{job}", "--config", "{config}"],
        ["status", "--config", "{config}"],
        ["--config", "{config}", "status"],
    ],
)
def test_config_is_accepted_before_and_after_the_command_at_every_level(tmp_path, capsys, argv):
    config = node_config(tmp_path)
    job = failed_job(config)
    assert main([a.format(config=config, job=job) for a in argv]) == 0, capsys.readouterr().err
    assert "config error" not in capsys.readouterr().err


def test_the_config_can_come_from_the_environment_and_help_says_so(tmp_path, monkeypatch):
    config = node_config(tmp_path)
    job = failed_job(config)
    monkeypatch.chdir(tmp_path / "data")  # not where config/dicom-node.toml is
    result = subprocess.run([sys.executable, "-m", "dicom_node", "jobs", "show", str(job)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "DICOM_NODE_CONFIG": str(config),
                                                         "PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == job
    for command in ([], ["status"], ["jobs", "list"]):
        helped = subprocess.run([sys.executable, "-m", "dicom_node", *command, "--help"], capture_output=True,
                                text=True, timeout=120, cwd=REPO)  # fmt: skip
        assert "$DICOM_NODE_CONFIG" in " ".join(helped.stdout.split()), helped.stdout


def test_retry_says_that_nothing_sends_the_job_while_no_node_runs(tmp_path, capsys):
    config = node_config(tmp_path)
    job = failed_job(config)
    assert main(["jobs", "retry", str(job), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"job {job}: queued again" in out
    assert (f"no dicom-node is running on {tmp_path / 'data'}: the job is queued, but nothing sends it "
            "until a node runs (dicom-node serve)") in out  # fmt: skip


def test_check_config_and_serve_name_a_data_dir_that_cannot_be_created_or_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # /proc exists and refuses new files even to root; a path under a file cannot be created.
    for data_dir, message in ((blocker / "data", f"node.data_dir: cannot create {blocker / 'data'} (Not a directory)"),
                              ("/proc", "node.data_dir: /proc is not writable (")):  # fmt: skip
        config = node_config(tmp_path)
        config.write_text(config.read_text().replace("data_dir = 'data'", f"data_dir = {str(data_dir)!r}"))
        for command in ("check-config", "serve"):
            result = run_cli(command, "--config", str(config))
            assert result.returncode == 2, (command, result.stderr)
            assert failure_message(result.stderr).startswith(f"config error: {message}"), (command, result.stderr)
            assert "Traceback" not in result.stderr


def test_check_config_names_a_port_in_use(tmp_path):
    import socket

    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"label": "TEST DOUBLE", "boxes": []}')
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for section, key in (("node", "node.port"), ("health", "health.port")):
            other = "[health]\nenabled = true\nhost = '127.0.0.1'\nport = 0\n" if section == "node" else \
                f"[health]\nenabled = true\nhost = '127.0.0.1'\nport = {port}\n"
            node_port = port if section == "node" else 0
            config = tmp_path / f"{section}.toml"
            config.write_text(
                f"[node]\nhost = '127.0.0.1'\nport = {node_port}\ndata_dir = 'data'\n"
                "[security]\nallow_any_caller = true\n"
                f"[detector]\narchitecture = 'fixed_boxes'\nweights = '{boxes}'\n{other}"
            )
            result = run_cli("check-config", "--config", str(config))
            assert result.returncode == 2, result.stdout + result.stderr
            assert result.stderr.splitlines()[-1] == (
                f"config error: {key}: port {port} on 127.0.0.1 is in use by another program")
            assert "Traceback" not in result.stderr
    free = run_cli("check-config", "--config", str(config))  # the port is free again
    assert free.returncode == 0, free.stderr
    assert free.stdout.strip().endswith("ports free)")


def test_serve_and_check_config_refuse_a_node_open_to_anyone_by_omission(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[node]\nport = 0\ndata_dir = 'data'\n")
    for command in ("serve", "check-config"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 2, result.stderr
        assert "config error: security.allowed_callers: empty, so nobody may send" in result.stderr
        assert "security.allow_any_caller = true" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_postgresql_queue_that_does_not_answer_or_does_not_exist_stops_the_start_in_one_line(
    tmp_path, postgres_server
):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        silent = probe.getsockname()[1]
    down = f"postgresql://node:s3cret-pw@127.0.0.1:{silent}/queue"
    missing = postgres_server.url("no_such_db", password="s3cret-pw")
    shown = {down: f"postgresql+psycopg://node:***@127.0.0.1:{silent}/queue",
             missing: missing.replace("s3cret-pw", "***")}
    for url, command, status, line in (
        # Away, so waiting may help: serve fails (1) and systemd starts it again later;
        # check-config, for the operator at the keyboard, calls it a config error.
        (down, "serve", 1, f"error: job database {shown[down]} unavailable: server unavailable"),
        (down, "check-config", 2,
         f"config error: queue.url: job database {shown[down]} unavailable: server unavailable"),
        (missing, "serve", 2, f"config error: queue.url: cannot use the job database {shown[missing]} "
                              "(no such database)"),
        (missing, "check-config", 2, f"config error: queue.url: cannot use the job database "
                                     f"{shown[missing]} (no such database)"),
    ):
        config = node_config(tmp_path, f"[queue]\nurl = '{url}'\n")
        result = run_cli(command, "--config", str(config))
        assert result.returncode == status, (command, result.stderr)
        last = result.stderr.strip().splitlines()[-1]  # after serve's any_caller_allowed warning
        assert failure_message(last).startswith(line), (command, result.stderr)
        assert "s3cret-pw" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


def test_check_config_of_a_receiver_loads_no_detector(tmp_path, postgres_url):
    """A receiver (workers.count = 0) never loads a model: its check does not either, so a
    receiver host needs no weights file."""
    config = tmp_path / "node.toml"
    config.write_text(f"[node]\ndata_dir = 'data'\nport = 0\n[security]\nallow_any_caller = true\n"
                      f"[workers]\ncount = 0\n[queue]\nurl = '{postgres_url}'\n"
                      "[detector]\narchitecture = 'retinanet_r50_fpn'\nweights = 'nowhere/model.pt'\n")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "receiver: workers.count = 0, no detector loaded" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ("[workers]\ncount = 0\n[queue]\nurl = 'postgresql://dn@127.0.0.1:1/dn'\n",
         "workers.count: 0 workers to run; `dicom-node worker` needs 1 or more"),
        ("", "queue.url: `dicom-node worker` needs a PostgreSQL job table that the receivers share"),
    ],
)
def test_worker_without_workers_or_on_sqlite_is_a_config_error(tmp_path, sections, message):
    config = tmp_path / "node.toml"
    config.write_text(f"[node]\ndata_dir = 'data'\n{sections}")
    result = run_cli("worker", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
