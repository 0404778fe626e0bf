"""bench_latency runs end to end, tiny (one study per phase, small images), on both queue
backends, and its JSON holds sane figures: every study delivered, 0 < p50 <= p95 <= max,
and one peak-RSS entry per process (the node, each of its workers, Orthanc, PostgreSQL's)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from dicom_node.bench.latency import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STABLE_SECONDS = 0.5
WORKERS = 2


def test_bench_latency_prints_figures_for_both_queues(tmp_path, capsys):
    if shutil.which("Orthanc") is None and shutil.which("/usr/sbin/Orthanc") is None:
        pytest.skip("Orthanc is not installed")
    figures = tmp_path / "latency.json"
    assert main(["--studies", "1", "--size", "256", "256", "--rate", "120", "--queue", "both",
                 "--workers", str(WORKERS), "--stable-seconds", str(STABLE_SECONDS), "--timeout", "120",
                 "--json", str(figures)]) == 0  # fmt: skip
    output = capsys.readouterr().out
    assert "detector: fixed_boxes test double" in output and "study.stable_seconds = 0.5" in output
    document = json.loads(figures.read_text())
    assert document["settings"]["stable_seconds"] == STABLE_SECONDS
    assert [run["queue"] for run in document["runs"]] == ["sqlite", "postgresql"]
    for run in document["runs"]:
        assert [phase["phase"] for phase in run["phases"]] == ["steady", "burst"]
        for phase in run["phases"]:
            assert (phase["studies"], phase["delivered"], phase["missing"], phase["send_failures"]) == (1, 1, 0, 0)
            # The node waits stable_seconds after the last image before it analyses a study.
            assert STABLE_SECONDS <= phase["p50_s"] <= phase["p95_s"] <= phase["max_s"] < 120
            entries = phase["peak_rss"]
            assert len({e["pid"] for e in entries}) == len(entries)  # one entry per process
            assert all(e["peak_rss_mib"] > 0 for e in entries)
            roles = Counter(e["process"] for e in entries)
            assert roles["dicom-node serve"] == 1 and roles["Orthanc"] == 1
            assert roles["dicom-node serve: worker"] == WORKERS
            assert any(e["process"].startswith("postgres") for e in entries) == (run["queue"] == "postgresql")
        assert run["node_rss_burst_over_steady"] > 0 and isinstance(run["rss_bounded"], bool)
        assert f"{run['queue']}: node memory bounded in the burst:" in output
    assert "p50 s" in output and "burst/steady" in output
