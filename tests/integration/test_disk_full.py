"""A real `dicom-node serve` on a small real filesystem that senders try to fill.

The free-space watermark (node.min_free_megabytes) is enforced while a data set arrives,
fragment by fragment, and across concurrent associations (InstanceStore.reserve): free
space never falls more than a few fragments under it, the sender gets 0xA700, the partial
file is removed, and the job table, the results and the logs keep the reserve to work
in: a study stored before the disk filled is still analysed and its result written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicom_node.queue import Queue
from tests import synthetic
from tests.receive.helpers import storescu

from .node_process import NodeProcess, write_config
from .process import temp_files_left, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1024 * 1024
FILESYSTEM_MEGABYTES = 128
WATERMARK_MEGABYTES = 40
# Each association may write one fragment (pynetdicom's PDUs: at most 1 MiB) between two
# checks of the free space; SQLite and the logs write a little too.
SLACK = 6 * MIB
OUT_OF_RESOURCES = "Refused: OutOfResources"


class FreeSpaceLow:
    """The lowest free space of a filesystem seen while the block runs (statvfs, every ms)."""

    def __init__(self, path: Path):
        self.path, self.lowest = path, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _free(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def _watch(self) -> None:
        while not self._stop.is_set():
            free = self._free()
            self.lowest = free if self.lowest is None else min(self.lowest, free)
            time.sleep(0.001)

    def __enter__(self) -> FreeSpaceLow:
        self.lowest = self._free()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def image(folder: Path, megabytes: int, *, seed: int) -> Path:
    side = int((megabytes * MIB / 2) ** 0.5)
    ds = synthetic.mammogram(rows=side, columns=side, seed=seed)
    return synthetic.write(ds, folder / f"{ds.SOPInstanceUID}.dcm")


def test_the_watermark_holds_while_data_sets_arrive_and_the_job_table_stays_writable(small_filesystem, tmp_path):
    disk = small_filesystem(tmp_path / "disk", size=f"{FILESYSTEM_MEGABYTES}m").path
    data_dir = disk / "data"
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": [[0.2, 0.2, 0.4, 0.4, 0.9]]}))
    config = write_config(tmp_path / "node.toml", {
        "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 0, "data_dir": str(data_dir),
                 "min_free_megabytes": WATERMARK_MEGABYTES},
        "study": {"stable_seconds": 2},
        "workers": {"count": 1, "device": "cpu"},
        "detector": {"architecture": "fixed_boxes", "weights": str(boxes)},
    })  # fmt: skip
    node = NodeProcess(config).start()
    try:
        # A study stored while there is room; it is analysed once the disk is "full".
        study = synthetic.study(tmp_path / "study", n_images=2)
        assert storescu(node.port, *study).returncode == 0

        # One data set larger than the room left above the watermark: cut as it arrives.
        large = image(tmp_path / "large", 100, seed=1)
        with FreeSpaceLow(disk) as free:
            result = storescu(node.port, large)
        assert result.returncode != 0 and OUT_OF_RESOURCES in result.stdout + result.stderr
        assert free.lowest >= WATERMARK_MEGABYTES * MIB - SLACK, (
            f"free space fell to {free.lowest / MIB:.1f} MiB, watermark {WATERMARK_MEGABYTES} MiB")

        # Four senders at once, 24 MiB each (a spool and a staged copy each): not all fit.
        files = [image(tmp_path / f"c{i}", 24, seed=10 + i) for i in range(4)]
        with FreeSpaceLow(disk) as free, ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda path: storescu(node.port, path), files))
        refused = [r for r in results if OUT_OF_RESOURCES in r.stdout + r.stderr]
        assert refused, "four 24 MiB images all fitted above the watermark"
        assert free.lowest >= WATERMARK_MEGABYTES * MIB - SLACK, (
            f"free space fell to {free.lowest / MIB:.1f} MiB, watermark {WATERMARK_MEGABYTES} MiB")

        # Nothing half-written is left, and the node logged why it refused.
        wait_for(lambda: not temp_files_left(data_dir), 10, description="no temp file left under tmp/")
        assert [e for e in node.events("data_set_discarded") if "disk space low" in e["reason"]]

        # The reserve was kept: the first study is analysed, its GSPS written, its job done.
        queue = Queue(f"sqlite:///{data_dir / 'dicom-node.sqlite'}")
        try:
            done = wait_for(lambda: queue.list_jobs(state="done"), 120, description="the study's job to be done")
        finally:
            queue.close()
        assert Path(done[0].result_path).is_file()
        assert not [line for line in node.lines if "Traceback" in line]
    finally:
        node.stop()
