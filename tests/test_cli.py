"""The CLI's edges: bad config gives one line naming the key and exit 2, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    config.write_text("[detector]\narchitecture = 'retinanet_r50_fpn'\nweights = 'nowhere/model.pt'\n")
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
