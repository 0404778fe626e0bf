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


def analyse(queue: Queue, study_uid: str, *, now: datetime, destinations=("pacs",),
            result_path: str | None = None, outputs=None) -> int:
    """Enqueue the study's received instances and complete its job at `now`; returns the job id.

    One pending delivery per destination (and output: `destinations` name -> outputs, with
    `outputs` for those other than the GSPS) is created, as the worker does.
    """
    assert queue.enqueue_ready_studies(stable_seconds=0, now=now)
    job = queue.claim_next_job(worker="w", lease_seconds=600, now=now)
    assert job is not None and job.study_uid == study_uid
    queue.complete_job(
        job.id, worker="w", result_path=result_path or f"/data/results/{job.id}.dcm",
        result_sop_instance_uid=new_uid(), detections=0,
        destinations=destinations if isinstance(destinations, dict) else list(destinations), outputs=outputs, now=now,
    )
    return job.id


def deliver(queue: Queue, *, now: datetime, fail: tuple[str, ...] = ()) -> None:
    """Send every due delivery at `now`: done, or failed for good for destinations in `fail`."""
    while (delivery := queue.claim_next_delivery(worker="d", lease_seconds=600, now=now)) is not None:
        if delivery.destination in fail:
            queue.fail_delivery(delivery.id, worker="d", error="rejected", retryable=False,
                                backoff_seconds=1, max_backoff_seconds=1, max_attempts=1, now=now)
        else:
            queue.complete_delivery(delivery.id, worker="d", now=now)
