"""Retention: remove delivered studies the node no longer needs, never anything undelivered.

What may go (one rule, Queue.delivered_studies): a study with at least one analysis
job, every job done, every job delivered to at least one destination and every
delivery done, and no instance received since its last enqueue. Its rows (study,
instances, jobs, deliveries), its instance files (the ones its rows name, then the
series and study folders left empty) and its result files go together. A pending,
running or failed job or delivery keeps the whole study, whatever its age or the
disk: the PACS does not have its result yet.

When (the `retention` runner thread of `serve`, every retention.check_interval):
- by age: fully delivered longer than retention.keep_delivered_for ago;
- by disk space: while the free space on data_dir is under the retention level
  (retention.min_free_megabytes), the longest-delivered studies first, whatever their age;
- by hand: `dicom-node purge --older-than DURATION` (reason "operator").

Races and crashes (Queue.purge_study): each study is removed in one BEGIN IMMEDIATE
transaction that checks it again, deletes its rows, deletes its files (fsyncing their
folders) and only then commits. The SCP records a new instance with its own write
transaction, so it commits either before (the study no longer qualifies, nothing is
removed) or after (its file was never one of the removed study's; it starts a new
study row). A crash before the commit leaves every row and some files of a delivered
study gone: the next start marks those rows missing (store.reconcile), and the next
retention pass, finding the study still delivered, completes the removal. A crash
after the commit leaves nothing behind: the files were deleted before it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from dicom_node.config import Config
from dicom_node.log import describe_error, get_logger
from dicom_node.queue.models import DeliveredStudy
from dicom_node.queue.ops import Queue, utcnow
from dicom_node.store import InstanceStore

log = get_logger("dicom_node.retention")

BATCH = 100  # studies listed per query; each is then removed in its own short transaction
MEGABYTE = 1024 * 1024


class Reason(StrEnum):
    """Why a study was removed (the `reason` field of `study_purged`)."""

    AGE = "age"  # delivered longer than retention.keep_delivered_for ago
    DISK_SPACE = "disk_space"  # free space under the retention level
    OPERATOR = "operator"  # dicom-node purge


@dataclass(frozen=True)
class PurgedStudy:
    """One removed study: UIDs and counts only, never patient data."""

    study_uid: str
    reason: Reason
    delivered_at: datetime
    instances: int  # instance rows removed
    results: int  # result files removed
    bytes: int  # bytes of the files removed


@dataclass
class RetentionRun:
    """What one pass (or one `dicom-node purge`) removed and what it could not."""

    purged: list[PurgedStudy] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # study UID -> error
    free_bytes: int | None = None  # on data_dir after the pass
    below_level: bool = False  # still under the retention level, nothing more to remove

    def totals(self) -> dict:
        return {
            "studies": len(self.purged),
            "instances": sum(p.instances for p in self.purged),
            "results": sum(p.results for p in self.purged),
            "bytes": sum(p.bytes for p in self.purged),
            "failed": len(self.failed),
        }


def _purge_one(
    queue: Queue, store: InstanceStore, study: DeliveredStudy, *, reason: Reason,
    delivered_before: datetime | None,
) -> PurgedStudy | None:
    """Remove one study (rows and files together); None if it no longer qualifies."""

    def remove_files(instance_paths: list[str], result_paths: list[str]):
        removed = store.remove_files(instance_paths, result_paths)
        # Its ledger says what was delivered; gone with the study, or a rebuilt database
        # would take a study sent again for one already delivered.
        store.remove_ledger(study.study_uid)
        return len(instance_paths), removed

    outcome = queue.purge_study(
        study.study_uid, delivered_before=delivered_before, remove_files=remove_files
    )
    if outcome is None:
        return None
    instance_rows, removed = outcome
    if removed.skipped:
        # Rows naming files outside data_dir's instances/ and results/: the node does not
        # delete what it did not write there; the rows are gone, the files stay.
        log.warning("purge_files_skipped", study_uid=study.study_uid, count=len(removed.skipped),
                    paths=removed.skipped[:10])
    purged = PurgedStudy(
        study_uid=study.study_uid, reason=reason, delivered_at=study.delivered_at,
        instances=instance_rows, results=removed.results, bytes=removed.bytes,
    )
    log.info("study_purged", study_uid=purged.study_uid, reason=str(reason), instances=purged.instances,
             results=purged.results, bytes=purged.bytes, delivered_at=purged.delivered_at.isoformat())
    return purged


def purge_delivered(
    queue: Queue,
    store: InstanceStore,
    run: RetentionRun,
    *,
    reason: Reason,
    delivered_before: datetime | None = None,
    enough: Callable[[], bool] = lambda: False,
) -> None:
    """Remove delivered studies, longest delivered first, until none is left or `enough()`.

    `delivered_before`: only studies fully delivered at or before it (None: any).
    A study that cannot be removed (a file that cannot be deleted) is logged, kept
    whole, and skipped for the rest of this pass.
    """
    skip: set[str] = set()
    while not enough():
        listed = queue.delivered_studies(delivered_before=delivered_before, limit=BATCH + len(skip))
        batch = [study for study in listed if study.study_uid not in skip]
        if not batch:
            return
        for study in batch:
            if enough():
                return
            try:
                purged = _purge_one(queue, store, study, reason=reason, delivered_before=delivered_before)
            except Exception as error:  # rolled back: rows kept; retried at the next pass
                message = f"{type(error).__name__}: {error}"
                log.error("study_purge_failed", study_uid=study.study_uid, reason=str(reason), error=message)
                run.failed[study.study_uid] = message
                skip.add(study.study_uid)
                continue
            if purged is None:  # no longer qualifies (an instance arrived meanwhile)
                skip.add(study.study_uid)
            else:
                run.purged.append(purged)


def retention_pass(
    queue: Queue, store: InstanceStore, config: Config, *, now: datetime | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> RetentionRun:
    """One pass of the node's retention: by age, then by disk space; see the module docstring."""
    now = now or utcnow()
    run = RetentionRun()
    level = config.retention.min_free_bytes(config.node)
    purge_delivered(queue, store, run, reason=Reason.AGE,
                    delivered_before=now - config.retention.keep_delivered_for, enough=stop)

    def enough_space() -> bool:
        return stop() or store.free_bytes() >= level

    purge_delivered(queue, store, run, reason=Reason.DISK_SPACE, enough=enough_space)
    run.free_bytes = store.free_bytes()
    run.below_level = run.free_bytes < level
    return run


def _log_summary(run: RetentionRun, *, always: bool, **fields) -> None:
    totals = run.totals()
    emit = log.info if always or totals["studies"] or totals["failed"] else log.debug
    free = None if run.free_bytes is None else run.free_bytes // MEGABYTE
    emit("retention_done", **totals, free_megabytes=free, **fields)


def purge(config: Config, *, older_than: timedelta, now: datetime | None = None) -> RetentionRun:
    """`dicom-node purge`: remove studies fully delivered at least `older_than` ago.

    Safe while a node runs on the same data_dir (each removal is one SQLite write
    transaction; see the module docstring). `older_than` 0 removes every delivered study.
    """
    now = now or utcnow()
    store = InstanceStore(config.node.data_dir, fsync=config.node.fsync)
    queue = Queue(config.database_url)
    try:
        queue.migrate()
        run = RetentionRun()
        purge_delivered(queue, store, run, reason=Reason.OPERATOR, delivered_before=now - older_than)
        run.free_bytes = store.free_bytes()
    finally:
        queue.close()
    _log_summary(run, always=True, reason=str(Reason.OPERATOR), older_than_seconds=older_than.total_seconds())
    return run


def format_purge(run: RetentionRun) -> str:
    """The operator's report of a purge: one line per study and a total (UIDs, no patient data)."""
    lines = [
        f"{p.study_uid}  {p.instances} instance(s), {p.results} result(s), {p.bytes} bytes"
        for p in run.purged
    ]
    lines += [f"{uid}  NOT removed: {error}" for uid, error in run.failed.items()]
    totals = run.totals()
    if not totals["studies"] and not totals["failed"]:
        return "nothing to remove"
    lines.append(
        f"removed {totals['studies']} study(ies): {totals['instances']} instance(s), "
        f"{totals['results']} result(s), {totals['bytes']} bytes ({totals['bytes'] / MEGABYTE:.1f} MB)"
        + (f"; {totals['failed']} could not be removed (see above)" if totals["failed"] else "")
    )
    return "\n".join(lines)


def run_retention(queue: Queue, config: Config, stop: threading.Event) -> None:
    """Run retention passes every retention.check_interval until `stop`; `serve` runs this in a thread.

    An error (the database busy beyond its timeout, a disk fault) is logged and the
    next pass tries again; the thread never dies of it.
    """
    retention = config.retention
    if not retention.enabled:
        log.info("retention_off")
        return
    store = InstanceStore(config.node.data_dir, fsync=config.node.fsync)
    level = retention.min_free_bytes(config.node)
    log.info("retention_started", keep_delivered_for_seconds=retention.keep_delivered_for.total_seconds(),
             min_free_megabytes=level // MEGABYTE, check_interval_seconds=retention.check_interval.total_seconds())
    low = False
    while not stop.is_set():
        started = time.monotonic()
        try:
            run = retention_pass(queue, store, config, stop=stop.is_set)
            _log_summary(run, always=False, seconds=round(time.monotonic() - started, 3))
            if run.below_level and not low:
                # Only undelivered (or failed) studies are left to hold the space: the SCP
                # will refuse C-STOREs once node.min_free_megabytes is reached.
                log.warning("retention_free_space_low", free_megabytes=run.free_bytes // MEGABYTE,
                            min_free_megabytes=level // MEGABYTE)
            low = run.below_level
        except Exception as error:
            log.error("retention_error", error=describe_error(error))
        stop.wait(retention.check_interval.total_seconds())
