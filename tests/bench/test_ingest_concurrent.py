"""bench_ingest --senders runs end to end, tiny: 4 senders against storescp --fork, one
receiver process and two sharing the port, with sane figures in its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.bench.ingest import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_ingest_four_senders_against_one_and_two_receivers(tmp_path, capsys, monkeypatch):
    # A relative work folder, as the default (.bench): the receivers' data_dir must still be
    # where the bench counts their files.
    monkeypatch.chdir(tmp_path)
    work, figures = Path("bench"), tmp_path / "ingest.json"
    assert main(["--senders", "4", "--count", "2", "--rows", "64", "--cols", "48", "--repeat", "1",
                 "--work-dir", str(work), "--json", str(figures)]) == 0  # fmt: skip
    output = capsys.readouterr().out
    document = json.loads(figures.read_text())
    assert (document["senders"], document["images_per_sender"]) == (4, 2)
    runs = {run["receiver"]: run for run in document["runs"]}
    assert set(runs) == {"storescp --fork", "dicom-node x1", "dicom-node x2"}
    for receiver, run in runs.items():
        assert run["instances"] == 8 and run["seconds"] > 0
        assert run["mb_per_second"] > 0 and run["instances_per_second"] > 0
        assert document["median"][receiver]["mb_per_second"] > 0
        assert receiver in output
    # Every instance was stored by one of the two receivers (which one: the kernel's choice).
    assert len(runs["dicom-node x2"]["per_receiver"]) == 2 and sum(runs["dicom-node x2"]["per_receiver"]) == 8
    assert runs["dicom-node x1"]["per_receiver"] == [8]
    assert "2 receivers / 1 receiver" in output
    assert list(work.iterdir()) == []  # generated and received files removed
