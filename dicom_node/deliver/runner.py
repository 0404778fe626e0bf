"""The delivery runner: claim a pending delivery, send it, record the outcome; repeat.

A delivered result is also noted in the study's delivered-results ledger (see
dicom_node.store), the record that outlives a lost job database.
"""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_node import metrics
from dicom_node.config import Config
from dicom_node.deliver.scu import send_files
from dicom_node.errors import (
    ConfigError,
    PermanentError,
    QueueUnavailable,
    RetryableError,
)
from dicom_node.log import describe_error, get_logger
from dicom_node.queue.ops import utcnow
from dicom_node.queue.outage import Outage
from dicom_node.store import InstanceStore, LedgerError, result_files

log = get_logger("dicom_node.deliver")

IDLE_POLL_SECONDS = 0.5


def deliver_once(
    queue, config: Config, *, worker: str = "deliver", store: InstanceStore | None = None,
    outage: Outage | None = None, stop: threading.Event | None = None,
) -> bool:
    """Claim and send one pending delivery; return False when there was none.

    With `store`, a delivered result is noted in its study's ledger. A database outage
    after the send is waited out (`outage`, until `stop`) so the delivery is recorded
    done; stopped first, it stays leased and is sent again later (the same object:
    harmless for the destination).
    """
    delivery = queue.claim_next_delivery(
        worker=worker, lease_seconds=config.delivery.lease_seconds, max_attempts=config.delivery.max_attempts
    )
    if delivery is None:
        return False
    delivery_log = log.bind(
        delivery_id=delivery.id, job_id=delivery.job_id, destination=delivery.destination,
        output=delivery.output, sop_instance_uid=delivery.sop_instance_uid,
    )
    policy = config.delivery
    try:
        destination = config.destination(delivery.destination)
        # One result, one association: a file, or every capture of a study's folder
        # (sent again as a whole after a failure).
        send_files(result_files(Path(delivery.path)), destination, calling_ae_title=config.node.ae_title,
                   tls=config.security.tls)
    except (RetryableError, PermanentError, ConfigError) as error:
        state = queue.fail_delivery(
            delivery.id, worker=worker, error=str(error), retryable=isinstance(error, RetryableError),
            backoff_seconds=policy.retry_backoff_seconds,
            max_backoff_seconds=policy.max_backoff_seconds, max_attempts=policy.max_attempts,
        )
        (delivery_log.error if state == "failed" else delivery_log.warning)(
            "delivery_failed" if state == "failed" else "delivery_retry", error=str(error), state=state
        )
        metrics.get().delivery_failures.labels(
            destination=_destination_label(config, delivery.destination), outcome=metrics.failure_outcome(state)
        ).inc()
        return True
    if store is not None:
        _note_delivered(store, delivery, delivery_log)
    outage = outage or Outage("deliver")
    outage.call(lambda: queue.complete_delivery(delivery.id, worker=worker), stop=stop or threading.Event())
    # A delivery row is made when its job is done: created_at is the job's done time.
    metrics.get().job_done_to_delivered.labels(destination=_destination_label(config, delivery.destination)).observe(
        metrics.seconds_between(delivery.created_at, utcnow())
    )
    delivery_log.info("delivery_done")
    return True


def _destination_label(config: Config, name: str) -> str:
    """A destination's name as a metric label: one of the config's (a row may name one since removed)."""
    return name if any(d.name == name for d in config.destinations) else "(not configured)"


def _note_delivered(store: InstanceStore, delivery, delivery_log) -> None:
    """Add the delivery to the study's ledger; a failure is logged (the database still has it)."""
    try:
        store.record_delivered(Path(delivery.path), delivery.destination, output=delivery.output)
    except (OSError, LedgerError) as error:  # disk full, a ledger we cannot read
        delivery_log.error("ledger_write_failed", error=str(error))
    except Exception as error:  # a result file that does not read back: its type, not its contents
        delivery_log.error("ledger_write_failed", error=type(error).__name__)



def run_deliveries(
    queue, config: Config, stop: threading.Event, *, worker: str = "deliver", store: InstanceStore | None = None
) -> None:
    """Deliver until `stop` is set; the main thread of `serve` runs this in a thread.

    `worker`: the id its delivery leases are held under, unique per process when several
    receivers share the job table ("<owner>/deliver"): a receiver whose lease ran out must
    not complete a delivery another receiver has claimed since.
    """
    store = store or InstanceStore(config.node.data_dir, fsync=config.node.fsync)
    outage = Outage("deliver")
    while not stop.is_set():
        try:
            if not deliver_once(queue, config, worker=worker, store=store, outage=outage, stop=stop):
                stop.wait(IDLE_POLL_SECONDS)
            outage.ok()
        except QueueUnavailable as error:  # logged once per outage, tried again after a pause
            stop.wait(outage.failed(error))
        except Exception as error:
            log.error("delivery_loop_error", error=describe_error(error))
            stop.wait(1)
