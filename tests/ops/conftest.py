"""Fixtures for retention: a real data_dir (files written as the SCP and the worker write
them) and a real SQLite queue inside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.config import Config, parse_config
from dicom_node.queue import Queue
from dicom_node.store import InstanceStore
from tests import synthetic
from tests.queue.queue_helpers import analyse, deliver


@dataclass
class StoredStudy:
    study_uid: str
    instance_paths: list[Path]
    result_path: Path
    capture_paths: list[Path] = field(default_factory=list)  # a folder of captures ("sc")

    @property
    def files(self) -> list[Path]:
        return [*self.instance_paths, self.result_path, *self.capture_paths]

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    @property
    def folder(self) -> Path:
        return self.instance_paths[0].parent.parent  # instances/<study>


def node_config(data_dir: Path, **retention) -> Config:
    return parse_config(
        {"node": {"data_dir": str(data_dir), "min_free_megabytes": 0}, "retention": retention},
        base_dir=data_dir.parent,
    )


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir) -> InstanceStore:
    return InstanceStore(data_dir)


@pytest.fixture
def queue(data_dir):
    queue = Queue(f"sqlite:///{data_dir / 'dicom-node.sqlite'}")
    queue.migrate()
    yield queue
    queue.close()


@pytest.fixture
def make_study(store, queue, tmp_path):
    """``make_study(delivered_at, series=2, fail=("pacs",))``: a stored, analysed study.

    Its instances are persisted and recorded as the SCP does, its GSPS written as the
    worker does, then its deliveries are sent at `delivered_at` (or fail for good for the
    destinations named in `fail`; `send=False`: they stay pending, retried years later).
    """
    def make(delivered_at: datetime, *, series: int = 2, per_series: int = 1, rows: int = 64,
             fail: Sequence[str] = (), send: bool = True, captures: int = 0) -> StoredStudy:
        study_uid = generate_uid()
        paths = []
        for series_index in range(series):
            series_uid = generate_uid()
            for index in range(per_series):
                ds = synthetic.mammogram(study_uid=study_uid, series_uid=series_uid, rows=rows, columns=rows,
                                         seed=index)
                source = synthetic.write(ds, tmp_path / "incoming" / f"{ds.SOPInstanceUID}.dcm")
                path = store.persist_instance(source, study_uid=study_uid, series_uid=series_uid,
                                              sop_instance_uid=ds.SOPInstanceUID)
                queue.record_instance(
                    sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_uid=study_uid,
                    series_uid=series_uid, path=str(path), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                    calling_ae="MODALITY", size_bytes=path.stat().st_size,
                    now=delivered_at - timedelta(hours=1),
                )
                paths.append(path)
        result = synthetic.mammogram(study_uid=study_uid, rows=16, columns=16)  # stands in for the GSPS
        result_path = store.write_result(result, name=f"{result.SOPInstanceUID}.dcm")
        # `captures`: also that many burned-in captures, one folder, delivered as one ("sc").
        stand_ins = [synthetic.mammogram(study_uid=study_uid, rows=16, columns=16, seed=i) for i in range(captures)]
        folder = store.write_result_set(stand_ins, name=f"{stand_ins[0].SOPInstanceUID}.sc") if captures else None
        job_id = analyse(queue, study_uid, now=delivered_at, result_path=str(result_path),
                         destinations={"pacs": ["gsps", "sc"] if captures else ["gsps"]},
                         outputs={"sc": (str(folder), stand_ins[0].SOPInstanceUID)} if captures else None)
        if send:
            deliver(queue, now=delivered_at, fail=tuple(fail))
        else:  # the PACS is down: retried much later (so no later deliver() sends it)
            delivery = queue.claim_next_delivery(worker="d", lease_seconds=60, now=delivered_at)
            assert delivery.job_id == job_id
            queue.fail_delivery(delivery.id, worker="d", error="cannot connect", retryable=True,
                                backoff_seconds=10**9, max_backoff_seconds=10**9, max_attempts=100,
                                now=delivered_at)
        return StoredStudy(study_uid, paths, result_path, sorted(folder.iterdir()) if captures else [])

    return make
