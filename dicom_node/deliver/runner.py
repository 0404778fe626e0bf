"""The delivery runner: claim a pending delivery, send it, record the outcome; repeat."""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_node.config import Config
from dicom_node.deliver.scu import send_file
from dicom_node.errors import ConfigError, PermanentError, RetryableError
from dicom_node.log import get_logger

log = get_logger("dicom_node.deliver")

IDLE_POLL_SECONDS = 0.5


def deliver_once(queue, config: Config, *, worker: str = "deliver") -> bool:
    """Claim and send one pending delivery; return False when there was none."""
    delivery = queue.claim_next_delivery(
        worker=worker, lease_seconds=config.delivery.lease_seconds, max_attempts=config.delivery.max_attempts
    )
    if delivery is None:
        return False
    delivery_log = log.bind(
        delivery_id=delivery.id, job_id=delivery.job_id, destination=delivery.destination,
        sop_instance_uid=delivery.sop_instance_uid,
    )
    policy = config.delivery
    try:
        destination = config.destination(delivery.destination)
        send_file(Path(delivery.path), destination, calling_ae_title=config.node.ae_title,
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
        return True
    queue.complete_delivery(delivery.id, worker=worker)
    delivery_log.info("delivery_done")
    return True



def run_deliveries(queue, config: Config, stop: threading.Event) -> None:
    """Deliver until `stop` is set; the main thread of `serve` runs this in a thread."""
    while not stop.is_set():
        try:
            if not deliver_once(queue, config):
                stop.wait(IDLE_POLL_SECONDS)
        except Exception as error:
            log.error("delivery_loop_error", error=f"{type(error).__name__}: {error}")
            stop.wait(1)
