"""Disk watermark (node.min_free_megabytes): a C-STORE that would leave too little free space
is refused with Out of Resources (PS3.4 B.2.3, 0xA700), nothing of it is written, and
storage resumes as soon as space returns.

Real free space, no fake: a small tmpfs mounted for the test (skipped where mounting is
not permitted), and on any filesystem a watermark set above its actual free space.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicom_node.receive.handlers import MEGABYTE
from tests import synthetic
from tests.receive.helpers import storescu

TMPFS_MEGABYTES = 32
WATERMARK_MEGABYTES = 8
# storescu -v names the response status of each C-STORE.
OUT_OF_RESOURCES = "Refused: OutOfResources"


@pytest.fixture
def small_disk(small_filesystem, tmp_path) -> Path:
    return small_filesystem(tmp_path / "tmpfs", size=f"{TMPFS_MEGABYTES}m").path


def instance(folder: Path, *, rows: int, columns: int, seed: int = 0) -> Path:
    ds = synthetic.mammogram(rows=rows, columns=columns, seed=seed)
    return synthetic.write(ds, folder / f"{ds.SOPInstanceUID}.dcm")


def stored_files(node) -> list[Path]:
    return [p for p in node.store.instances_dir.rglob("*") if p.is_file()]


def assert_refused_and_nothing_written(node, result) -> None:
    assert result.returncode != 0, result.stderr
    assert OUT_OF_RESOURCES in result.stdout + result.stderr, result.stdout + result.stderr
    assert stored_files(node) == []
    assert list(node.store.tmp_dir.iterdir()) == []
    assert node.queue.stats()["instances"]["total"] == 0


def test_store_is_refused_below_the_watermark_and_resumes_when_space_returns(
    small_disk, make_node, tmp_path
):
    node = make_node(node={"data_dir": str(small_disk / "data"),
                           "min_free_megabytes": WATERMARK_MEGABYTES})
    # ~26 MB of pixel data: the filesystem has room for it (32 MB), but storing it
    # would leave less than the watermark, so the incoming size must be counted.
    large = instance(tmp_path / "large", rows=3600, columns=3600)
    assert node.store.free_bytes() > os.path.getsize(large) > node.store.free_bytes() - WATERMARK_MEGABYTES * MEGABYTE
    assert_refused_and_nothing_written(node, storescu(node.port, large))

    # Fill the disk until less than the watermark is left: even a small image is refused.
    ballast = small_disk / "ballast"
    keep_free = (WATERMARK_MEGABYTES - 2) * MEGABYTE
    with open(ballast, "wb") as out:
        out.write(b"\0" * (node.store.free_bytes() - keep_free))
    small = instance(tmp_path / "small", rows=256, columns=192, seed=1)
    assert node.store.free_bytes() < WATERMARK_MEGABYTES * MEGABYTE
    assert_refused_and_nothing_written(node, storescu(node.port, small))

    # Space returns: the next C-STORE of the same instance is stored, with no restart.
    ballast.unlink()
    result = storescu(node.port, small)
    assert result.returncode == 0, result.stdout + result.stderr
    (stored,) = stored_files(node)
    assert stored.name == f"{small.stem}.dcm"
    assert node.queue.stats()["instances"] == {"total": 1, "missing": 0}


def test_watermark_above_the_real_free_space_refuses_then_a_lower_one_stores(make_node, tmp_path):
    """Works on any filesystem: the watermark is set above what the disk really has free."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    free_megabytes = shutil.disk_usage(data_dir).free // MEGABYTE
    image = instance(tmp_path / "image", rows=256, columns=192)

    full = make_node(node={"data_dir": str(data_dir), "min_free_megabytes": free_megabytes + 1024})
    assert_refused_and_nothing_written(full, storescu(full.port, image))

    # A node on the same data_dir with a watermark the disk satisfies (as after freeing space).
    ok = make_node(node={"data_dir": str(data_dir), "min_free_megabytes": 1})
    result = storescu(ok.port, image)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(stored_files(ok)) == 1
    assert ok.queue.stats()["instances"]["total"] == 1
