"""The node's Prometheus metrics: every definition in one place, and how processes share them.

Any stage counts here (like it logs through dicom_node.log), so this module sits at the
bottom of the layers and imports nothing of the node. What serves them (``GET /metrics``)
and the gauges read from the job table at scrape time live in dicom_node.ops.metrics.

Across processes. `dicom-node serve` runs the SCP and the delivery runner in its main
process and the analysis workers in spawned processes, so the metrics use
prometheus-client's multiprocess mode: with ``[metrics] enabled``, `serve` calls
`use_directory` before any worker starts; each process then writes its values to its own
memory-mapped files there (the environment variable is inherited by the spawned workers),
and the serving process adds them up at every scrape (``MultiProcessCollector``). A
counter of a worker that died keeps counting in the sum, as a total should. There are no
multiprocess gauges: every gauge is computed at scrape time in the serving process (queue
depth, associations open), so no gauge of a dead process can linger. With metrics off,
the values are counted in memory, where nothing reads them (a few nanoseconds each).

No patient data, bounded cardinality: labels take values from fixed small sets only (DIMSE
status names, A-ASSOCIATE-RJ diagnostics, job states, outcome kinds, destination names from
the config), never UIDs, AE titles or anything received.

Names carry the ``dicom_node_`` prefix and their unit; counters end in ``_total``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client import Counter, Histogram, values

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Waits in the job's life: from a second (a quiet node) to hours (a backlog, a PACS down).
DURATION_BUCKETS_SECONDS = (
    0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400,
)  # fmt: skip
# Storing one received instance: a fraction of a millisecond to a few on a local disk (its
# fsyncs); longer on a busy disk or a network filesystem.
STORE_BUCKETS_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
# One detector call on one image: tens of milliseconds on a GPU, seconds to a minute on a CPU.
FORWARD_BUCKETS_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class Metrics:
    """The node's metric objects (see `get`)."""

    instances_received: Counter
    received_bytes: Counter
    instance_store: Histogram
    c_store_refusals: Counter
    associations_refused: Counter
    job_stable_to_claimed: Histogram
    job_claimed_to_done: Histogram
    job_failures: Counter
    model_forward: Histogram
    job_done_to_delivered: Histogram
    delivery_failures: Counter


def _define() -> Metrics:
    # registry=None: the serving process reads every process's values from the multiprocess
    # directory, not from a registry; and `use_directory` may make these again.
    def counter(name: str, help_text: str, labels=()) -> Counter:
        return Counter(name, help_text, labels, registry=None)

    def histogram(name: str, help_text: str, buckets, labels=()) -> Histogram:
        return Histogram(name, help_text, labels, buckets=buckets, registry=None)

    return Metrics(
        instances_received=counter(
            "dicom_node_instances_received_total",
            "C-STOREs answered Success: the instance is stored (or was already)."),
        received_bytes=counter(
            "dicom_node_received_bytes_total",
            "Data set bytes received in C-STORE requests, as they arrived (refused ones too)."),
        instance_store=histogram(
            "dicom_node_instance_store_seconds",
            "From a C-STORE data set received whole to its instance durable and recorded (answered "
            "Success): the checks, the fsyncs of file and folder, the job table's commit.",
            STORE_BUCKETS_SECONDS),
        c_store_refusals=counter(
            "dicom_node_c_store_refusals_total",
            "C-STOREs answered with a failure status, by status name.", ["status"]),
        associations_refused=counter(
            "dicom_node_associations_refused_total",
            "Association requests rejected (A-ASSOCIATE-RJ), by diagnostic.", ["reason"]),
        job_stable_to_claimed=histogram(
            "dicom_node_job_stable_to_claimed_seconds",
            "From a job's creation (its study became stable) to its first claim by a worker.",
            DURATION_BUCKETS_SECONDS),
        job_claimed_to_done=histogram(
            "dicom_node_job_claimed_to_done_seconds",
            "From the claim of the attempt that succeeded to the job recorded done.",
            DURATION_BUCKETS_SECONDS),
        job_failures=counter(
            "dicom_node_job_failures_total",
            "Failed analysis attempts: retry (pending again) or failed (for good).", ["outcome"]),
        model_forward=histogram(
            "dicom_node_model_forward_seconds",
            "One detector call on one image (in the worker): to the device, forward, boxes back.",
            FORWARD_BUCKETS_SECONDS),
        job_done_to_delivered=histogram(
            "dicom_node_job_done_to_delivered_seconds",
            "From the job recorded done to its result recorded delivered, per destination.",
            DURATION_BUCKETS_SECONDS, ["destination"]),
        delivery_failures=counter(
            "dicom_node_delivery_failures_total",
            "Failed sends of a result: retry (sent again later) or failed (for good), per destination.",
            ["destination", "outcome"]),
    )  # fmt: skip


_made: Metrics | None = None
_making = threading.Lock()


def get() -> Metrics:
    """This process's metric objects, made at first use (after `use_directory`, in serve)."""
    global _made
    if _made is None:
        with _making:  # the SCP's threads and the delivery thread may come at once
            if _made is None:
                _made = _define()
    return _made


def count_and_sum(histogram: Histogram) -> tuple[float, float]:
    """How many values an unlabelled histogram observed in this process, and their sum."""
    (family,) = histogram.collect()
    found = {sample.name.removeprefix(family.name): sample.value for sample in family.samples}
    return found["_count"], found["_sum"]


def seconds_between(start: datetime, end: datetime) -> float:
    """A duration to observe, from two timestamps of the job table (never negative)."""
    return max(0.0, (end - start).total_seconds())


FAILURE_OUTCOMES = ("retry", "failed")  # the `outcome` label of job and delivery failures


def failure_outcome(state: str) -> str:
    """The `outcome` label of a failed attempt, from the row's new state."""
    return "failed" if state == "failed" else "retry"


def use_directory(directory: Path | None) -> None:
    """Count into `directory` (multiprocess mode, shared with processes spawned after this
    call), or in memory with None. Call before any worker process starts.

    prometheus-client picks where values live (memory or files) once, when it is imported,
    from the environment: serve decides later, from the config, so the choice is made
    again here, and the metric objects are made anew.
    """
    if directory is None:
        os.environ.pop(MULTIPROCESS_ENV, None)  # an inherited one must not send workers there
    else:
        os.environ[MULTIPROCESS_ENV] = str(directory)
    global _made
    with _making:
        values.ValueClass = values.get_value_class()
        _made = None


def multiprocess_directory() -> Path | None:
    """Where this process's values are shared, or None when they stay in memory."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    return Path(directory) if directory else None
