"""Helpers for the queue tests (imported by the tests and by their child processes)."""

from __future__ import annotations

import itertools
import os
from datetime import datetime, timezone

from dicom_node.queue import Queue

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=timezone.utc)
_uids = itertools.count(1)


def new_uid() -> str:
    """A fresh UID, unique across the processes of one test run."""
    return f"1.2.826.0.1.3680043.10.1234.{os.getpid()}.{next(_uids)}"


def record(queue: Queue, study_uid: str, *, now: datetime, sop_instance_uid: str | None = None) -> bool:
    """Record one synthetic instance of `study_uid` received at `now`."""
    return queue.record_instance(
        sop_instance_uid=sop_instance_uid or new_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray, For Presentation
        study_uid=study_uid,
        series_uid=study_uid + ".1",
        path=f"/data/instances/{study_uid}.dcm",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        size_bytes=1234,
        now=now,
    )
