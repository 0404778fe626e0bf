"""The ingest benchmark runs end to end on tiny images (its figures are not checked)."""

from __future__ import annotations

import re

from dicom_node.bench.ingest import main


def test_bench_ingest_runs_both_receivers_the_node_unflushed_and_the_disk_alone(tmp_path, capsys):
    work = tmp_path / "bench"
    assert main(["--count", "2", "--rows", "64", "--cols", "48", "--repeat", "1",
                 "--work-dir", str(work)]) == 0  # fmt: skip
    output = capsys.readouterr().out
    assert re.search(r"run 1 +storescp: .* MB/s", output)
    assert re.search(r"run 1 dicom-node: .* MB/s   storing \d+\.\d\d ms per instance", output)
    assert re.search(r"run 1 +no-fsync: .* MB/s   storing \d+\.\d\d ms per instance", output)
    assert re.search(r"run 1 +disk: .* MB/s", output)
    assert re.search(r"disk: .* median \d+\.\d MB/s \(\d+\.\d\dx storescp\)", output)
    assert re.search(r"no-fsync: the node with node.fsync = false .* median \d+\.\d MB/s "
                     r"\(\d+\.\d\dx storescp\)", output)
    assert re.search(r"ratio in each round: \d+\.\d\dx\n", output)
    assert re.search(r"ratio \d+\.\d\dx", output)
    assert list(work.iterdir()) == []  # generated and received files removed
