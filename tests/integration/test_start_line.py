"""`dicom-node serve` tells the person who started it, in one line on stdout, where it listens,
where results go and how to send a test image; and that command works as printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dicom_node.queue import Queue

from .fault_node import NODE_AE, write_node_config
from .node_process import READY_TIMEOUT_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRINTED_FOLDER = "/tmp/dicom-node-test"


def test_serve_prints_where_it_listens_where_results_go_and_how_to_try_it(tmp_path):
    config = write_node_config(
        tmp_path / "node",
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}],
    )
    stderr = open(tmp_path / "stderr.jsonl", "w")  # noqa: SIM115 (closed below)
    serve = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(serve.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not stdout and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stdout, (tmp_path / "stderr.jsonl").read_text()
        [line] = stdout  # one line, and nothing else on stdout (the logs are on stderr)
        port = int(line.split(f"receiving as {NODE_AE} on 127.0.0.1:")[1].split(";")[0])
        assert line == (
            f"dicom-node: receiving as {NODE_AE} on 127.0.0.1:{port}; results go to pacs (ORTHANC at "
            f"127.0.0.1:4242); to send a test image: dicom-node phantom --out {PRINTED_FOLDER} --n 1 && "
            f"storescu -aec {NODE_AE} 127.0.0.1 {port} +sd +r {PRINTED_FOLDER}/images\n"
        )

        # As an administrator would: run it (into this test's folder, not the shared /tmp).
        command = line.split("to send a test image: ")[1].strip().replace(PRINTED_FOLDER, str(tmp_path / "try"))
        command = command.replace("dicom-node phantom", f"{sys.executable} -m dicom_node phantom", 1)
        tried = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
        assert tried.returncode == 0, tried.stdout + tried.stderr
        queue = Queue(f"sqlite:///{tmp_path / 'node' / 'data' / 'dicom-node.sqlite'}")
        try:
            assert queue.stats()["instances"]["total"] == 1
        finally:
            queue.close()
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(120) == 0
        stderr.close()
    assert all(line.startswith("{") for line in (tmp_path / "stderr.jsonl").read_text().splitlines())
