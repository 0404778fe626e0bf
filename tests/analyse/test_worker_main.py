"""A worker process never ends with a traceback on stderr (dicom_node.analyse.worker.worker_main).

When an exception escapes a multiprocessing target, multiprocessing prints "Process
worker-1:" and the traceback, whose last line is the exception's message: a library's
message can quote dataset values. The worker logs it as one JSON event instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHI = ("DOE^JOHN", "DOE JOHN", "DOE", "JOHN", "19700101")

# A real spawned worker whose ready queue fails like a library would, quoting a patient.
SPAWNING_SCRIPT = '''
import json, multiprocessing, sys
from dicom_node.analyse.worker import worker_main
from dicom_node.config import load_config
from dicom_node.analyse.pool import StopFlag


class FailingReadyQueue:
    """Stands in for the pool's ready queue; its put() fails with a library-like message."""

    def put(self, item):
        raise ValueError("cannot encode DOE^JOHN born 19700101")


if __name__ == "__main__":
    config = load_config(sys.argv[1])
    context = multiprocessing.get_context("spawn")
    worker = context.Process(target=worker_main, name="worker-1",
                             args=(config, "worker-1", StopFlag(context), FailingReadyQueue()))
    worker.start()
    worker.join(240)
    print(json.dumps({"exitcode": worker.exitcode}))
'''


def test_an_exception_escaping_the_worker_is_one_json_event_and_exit_status_1(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": []}))
    config = tmp_path / "node.toml"
    config.write_text(
        f"[node]\ndata_dir = '{tmp_path / 'data'}'\n[security]\nallow_any_caller = true\n"
        f"[workers]\ndevice = 'cpu'\n[detector]\narchitecture = 'fixed_boxes'\nweights = '{boxes}'\n"
    )
    script = tmp_path / "spawn_worker.py"
    script.write_text(textwrap.dedent(SPAWNING_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(config)], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(result.stdout) == {"exitcode": 1}, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    crashed = [e for e in events if e["event"] == "worker_crashed"]
    assert [(e["worker"], e["error"]) for e in crashed] == [("worker-1", "ValueError at spawn_worker.py:12")]
    for value in PHI:
        assert value not in result.stderr
