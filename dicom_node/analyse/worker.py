"""Analysis workers: claim a study job, run the detector on its images, write its results
(the GSPS; the structured report and the burned-in captures when a destination takes them).

Each worker is its own process holding one loaded model (loaded once, not per job).
A job's lease is renewed by a heartbeat thread while the model runs; a worker that
dies leaves its job to be reclaimed when the lease expires.

Image rules (documented in README, "What gets analysed"):
- For Presentation mammograms (and MG secondary captures, e.g. digitised film): analysed.
- For Processing mammograms: raw detector data, not what the model was trained on.
  `detector.for_processing = "skip"` (default) leaves them out with a log line and a
  "not analysed" note in the GSPS; "analyse" runs them through the same pipeline
  (approximation: the VOI window is the image's min/max).
- Breast tomosynthesis: `detector.tomosynthesis = "central_slice"` (default) analyses
  the central frame of the volume as an approximation of a 2D view and places the
  boxes on that frame; "skip" leaves the volume out.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import pydicom

from dicom_node import metrics
from dicom_node.config import Config
from dicom_node.errors import PermanentError, QueueUnavailable, UnsupportedImage
from dicom_node.log import describe_error, get_logger
from dicom_node.queue.ops import LeaseLost, new_analysis_key, utcnow
from dicom_node.queue.outage import Outage

log = get_logger("dicom_node.worker")


def result_uid(analysis_key: str, model: str, purpose: str) -> str:
    """A UID of one analysis's result: the same on every attempt, another for any other analysis.

    `analysis_key` is the job's random key, stored in its row (queue.ops.new_analysis_key):
    a job retried after a crash rebuilds the same GSPS, and a PACS that already stored it
    sees the same object again. Another installation, a rebuilt database or a reused row
    id has another key, and `model` (the detector's fingerprint) gives a result of
    another model another UID: a PACS keeps the first object it gets under a UID and
    silently drops a different one sent under it later.
    """
    # PS3.5 B.2: "2.25." followed by a UUID as an integer. A name-based UUID (RFC 4122
    # version 5) is a function of its name. (pydicom's generate_uid(prefix=None) ignores
    # entropy_srcs and returns a random UUID: a different UID on every attempt.)
    name = "/".join(("dicom-node", analysis_key, model, purpose))
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


@dataclass
class StudyAnalysis:
    images: list[pydicom.Dataset] = field(default_factory=list)
    detections: dict[str, list] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    frames: dict[str, int] = field(default_factory=dict)

    @property
    def detection_count(self) -> int:
        return sum(len(boxes) for boxes in self.detections.values())


def _frame_to_analyse(ds: pydicom.Dataset, config: Config) -> int | None:
    """Return the frame index to analyse (None for single-frame); raise UnsupportedImage to skip."""
    from dicom_node.pixels import central_frame, image_kind

    kind = image_kind(ds)
    if kind == "processing" and config.detector.for_processing == "skip":
        raise UnsupportedImage("For Processing image (detector.for_processing = skip)")
    if kind == "tomosynthesis":
        if config.detector.tomosynthesis == "skip":
            raise UnsupportedImage("tomosynthesis volume (detector.tomosynthesis = skip)")
        return central_frame(ds)
    return None


def analyse_study(paths: Sequence[str], detector, config: Config, *, job_log=log) -> StudyAnalysis:
    """Run the detector on every analysable image; images that cannot be analysed are listed."""
    from dicom_node.pixels import prepare

    analysis = StudyAnalysis()
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except Exception as error:  # a stored file that no longer parses
            raise PermanentError(f"cannot read stored instance {path}: {describe_error(error)}") from error
        uid = str(ds.SOPInstanceUID)
        analysis.images.append(ds)
        try:
            frame = _frame_to_analyse(ds, config)
            prepared = prepare(ds, input_size=detector.input_size, frame=frame,
                               max_bytes=config.node.max_dataset_megabytes * 2**20)
        except UnsupportedImage as reason:
            analysis.skipped[uid] = str(reason)
            job_log.info("image_skipped", sop_instance_uid=uid, reason=str(reason))
            continue
        except Exception as error:
            # Corrupt or undecodable pixel data fails this image's study, not the worker.
            raise PermanentError(f"cannot decode pixel data of {uid}: {describe_error(error)}") from error
        if frame is not None:
            analysis.frames[uid] = frame
        with metrics.get().model_forward.time():
            analysis.detections[uid] = list(detector.detect([prepared])[0])
    return analysis


class _Heartbeat:
    """Renews the job lease in the background while the model runs."""

    def __init__(self, queue, job_id: int, worker: str, lease_seconds: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(queue, job_id, worker, lease_seconds), daemon=True
        )

    def _run(self, queue, job_id, worker, lease_seconds):
        while not self._stop.wait(lease_seconds / 3):
            try:
                if not queue.heartbeat_job(job_id, worker=worker, lease_seconds=lease_seconds):
                    return
            except QueueUnavailable:
                continue  # the lease may run out; completing the job checks who holds it

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _is_demo(detector) -> bool:
    return str(getattr(detector, "label", "")).upper().startswith("DEMO")


def _report_config(detector, config: Config):
    from dicom_node.report.common import DEMO_SERIES_DESCRIPTION

    report = config.report
    if _is_demo(detector):
        # The radiologist sees the series description in the viewer's series list: a
        # result of the demo weights must say what it is there, whatever the config says.
        report = report.model_copy(update={"series_description": DEMO_SERIES_DESCRIPTION})
    return report


def report_study(
    paths, detector, config: Config, *, analysis_key: str | None = None, job_log=log,
    previous: PreviousResults | None = None,
):
    """Analyse one study's files and build its GSPS; returns (gsps, analysis).

    The GSPS UIDs derive from `analysis_key` (the job's) and the detector's fingerprint;
    without a key (offline analysis) they are new on every call. `previous`: the study's
    earlier results, whose GSPS this one replaces (`previous_results`).
    """
    from dicom_node.report.gsps import build_gsps

    analysis_key = analysis_key or new_analysis_key()
    model = detector.fingerprint
    analysis = analyse_study(paths, detector, config, job_log=job_log)
    report = _report_config(detector, config)
    predecessor = _predecessor(previous, "gsps", analysis)
    gsps = build_gsps(
        analysis.images,
        analysis.detections,
        report=report,
        sop_instance_uid=result_uid(analysis_key, model, "gsps-instance"),
        series_instance_uid=(predecessor.series_instance_uid if predecessor
                             else result_uid(analysis_key, model, "gsps-series")),
        skipped=analysis.skipped,
        frames=analysis.frames,
        instance_number=predecessor.next_instance_number if predecessor else 1,
        note=predecessor.note if predecessor else None,
    )
    return gsps, analysis


def offline_results(paths, detector, config: Config, *, outputs) -> tuple[list[pydicom.Dataset], StudyAnalysis]:
    """`dicom-node analyze`: one study's files through the node's pipeline, and the objects
    of the wanted `outputs` ("gsps", "sr", "sc": the GSPS, the structured report, the
    captures), all under one new analysis key, as one job's are."""
    analysis_key = new_analysis_key()
    gsps, analysis = report_study(paths, detector, config, analysis_key=analysis_key)
    results = [gsps] if "gsps" in outputs else []
    if "sr" in outputs:
        results.append(structured_report(analysis, detector, config, analysis_key=analysis_key))
    if "sc" in outputs:
        results.extend(captures(analysis, detector, config, analysis_key=analysis_key))
    return results, analysis


@dataclass(frozen=True)
class PreviousResults:
    """A study's earlier results that a job of a later generation replaces (`previous_results`):
    output -> its objects without bulk data (one, or the capture set's several)."""

    by_output: dict[str, list[pydicom.Dataset]]

    def latest(self, output: str) -> pydicom.Dataset | None:
        """The output's object with the highest Instance Number: the new one comes after it."""
        objects = self.by_output.get(output) or []
        return max(objects, key=lambda ds: int(ds.get("InstanceNumber") or 1), default=None)

    def covered(self) -> set[str]:
        """The images the earlier results covered together (the GSPS: all of them)."""
        from dicom_node.store import covered_images

        return set().union(*(covered_images(ds) for objects in self.by_output.values() for ds in objects))


def previous_results(queue, job, *, job_log=log) -> PreviousResults | None:
    """The study's earlier results that a job of a later generation replaces: an image came
    after them, or an operator reran the study; None when there are none. One that cannot
    be read (removed by hand) is logged and replaced by nothing."""
    from dicom_node.store import result_files

    earlier = queue.previous_results(job.study_uid, before_generation=job.generation) if job.generation > 1 else []
    if not earlier:
        return None
    paths = {}  # output -> (path, job id): the newest job that made it
    for previous in earlier:
        made = {delivery.output: delivery.path for delivery in previous.deliveries}
        # The job's result is its GSPS, unless a delivery says it is another output (a job
        # restored from the ledger holds one result of any output: store.reconcile).
        if previous.result_path not in made.values():
            made.setdefault("gsps", previous.result_path)
        for output, path in made.items():
            paths.setdefault(output, (path, previous.id))
    found = {}
    for output, (path, previous_id) in paths.items():
        try:
            found[output] = [pydicom.dcmread(file, stop_before_pixels=True) for file in result_files(path)]
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            job_log.warning("previous_result_unreadable", output=output, previous_job_id=previous_id,
                            error=type(error).__name__)
    return PreviousResults(found)


def _predecessor(previous: PreviousResults | None, output: str, analysis: StudyAnalysis):
    """What a new result of `output` says of the one it replaces, or None when it replaces
    none. The reason is the same in every output: the images none of the earlier results
    covered came after them."""
    from dicom_node.report.common import Predecessor, count

    latest = previous.latest(output) if previous else None
    if latest is None:
        return None
    late = {str(ds.SOPInstanceUID) for ds in analysis.images} - previous.covered()
    reason = f"{count(len(late), 'image', 'images')} arrived after it" if late else "the study was analysed again"
    return Predecessor(latest, reason)


def structured_report(
    analysis: StudyAnalysis, detector, config: Config, *, analysis_key: str, previous: PreviousResults | None = None
):
    """The TID 1500 report of an analysed study (dicom_node.report.sr), in the series after
    the GSPS's; its UIDs derive from the job's key and the model, as the GSPS's do.
    `previous`: the study's earlier results, whose report this one replaces."""
    from dicom_node.report.common import fit
    from dicom_node.report.sr import build_sr

    report = _report_config(detector, config)
    model = detector.fingerprint
    predecessor = _predecessor(previous, "sr", analysis)
    return build_sr(
        analysis.images,
        analysis.detections,
        report=report,
        weights_label=str(getattr(detector, "label", "") or detector.architecture),
        sop_instance_uid=result_uid(analysis_key, model, "sr-instance"),
        series_instance_uid=(predecessor.series_instance_uid if predecessor
                             else result_uid(analysis_key, model, "sr-series")),
        series_number=report.series_number + 1,
        series_description=fit(report.series_description, 61) + " SR",
        skipped=analysis.skipped,
        frames=analysis.frames,
        instance_number=predecessor.next_instance_number if predecessor else 1,
        note=predecessor.note if predecessor else None,
        predecessors=[predecessor.dataset] if predecessor else (),
    )


def captures(
    analysis: StudyAnalysis, detector, config: Config, *, analysis_key: str, previous: PreviousResults | None = None
) -> list:
    """The burned-in captures of an analysed study (dicom_node.report.capture): one per
    analysed image, in the order of the study's images, in the series after the report's.
    UIDs derive from the job's key, the model and the source image, as the GSPS's do.
    An image that was not analysed gets none (the GSPS and the report say why).

    `previous`: the study's earlier results; the new captures go into the earlier captures'
    series, numbered on from the last of them, each saying what it replaces and why.
    """
    from dicom_node.report.capture import build_capture

    report = _report_config(detector, config)
    model = detector.fingerprint
    predecessor = _predecessor(previous, "sc", analysis)
    first = predecessor.next_instance_number if predecessor else 1
    series_uid = predecessor.series_instance_uid if predecessor else result_uid(analysis_key, model, "sc-series")
    built = []
    for image in analysis.images:
        uid = str(image.SOPInstanceUID)
        if uid not in analysis.detections:
            continue
        built.append(build_capture(
            image, analysis.detections[uid], report=report,
            sop_instance_uid=result_uid(analysis_key, model, f"sc-instance/{uid}"),
            series_instance_uid=series_uid, series_number=report.series_number + 2,
            instance_number=first + len(built), demo=_is_demo(detector), frame=analysis.frames.get(uid),
            note=predecessor.note if predecessor else None,
        ))
    return built


def _make_outputs(analysis, detector, config: Config, store, *, analysis_key: str, previous, job_log) -> dict:
    """Build and write the structured report and the captures when a destination takes
    them: output -> (path, SOP Instance UID) for Queue.complete_job. The captures are one
    folder, named by its first capture, one delivery; none when no image was analysed."""
    wanted = {output for outputs in config.outputs_by_destination.values() for output in outputs}
    made = {}
    if "sr" in wanted:
        sr = structured_report(analysis, detector, config, analysis_key=analysis_key, previous=previous)
        made["sr"] = (str(store.write_result(sr, name=f"{sr.SOPInstanceUID}.dcm")), str(sr.SOPInstanceUID))
    if "sc" in wanted:
        built = captures(analysis, detector, config, analysis_key=analysis_key, previous=previous)
        if built:
            first = str(built[0].SOPInstanceUID)
            made["sc"] = (str(store.write_result_set(built, name=f"{first}.sc")), first)
        else:
            job_log.warning("captures_none", reason="no image was analysed")
    return made


def check_files_present(instances) -> None:
    """Raise PermanentError naming the study's stored files that are gone.

    The whole job fails rather than skipping those images: a result that silently
    covers part of the study could be read as "analysed, nothing found". Once the
    files are restored, `dicom-node jobs retry ID` analyses the study again.
    """
    missing = [instance for instance in instances if not os.path.exists(instance.path)]
    if missing:
        first = missing[0]
        raise PermanentError(
            f"{len(missing)} of {len(instances)} stored instance file(s) of the study are missing "
            f"(first: {first.sop_instance_uid} at {first.path}); restore them, then retry the job"
        )


def _fail(queue, job, worker: str, config: Config, error: str, *, retryable: bool, outage, stop) -> str | None:
    """Record a failed attempt; None when the lease was lost to another worker."""
    try:
        return outage.call(
            lambda: queue.fail_job(
                job.id, worker=worker, error=error, retryable=retryable,
                backoff_seconds=config.workers.retry_backoff_seconds,
                max_attempts=config.workers.max_attempts,
            ),
            stop=stop,
        )
    except LeaseLost:
        return None


def process_job(
    job, *, queue, store, detector, config: Config, worker: str, outage: Outage | None = None, stop=None
) -> None:
    """Analyse one claimed job and record its outcome (complete or fail) in the queue.

    A database outage while recording the outcome is waited out (`outage` logs it and
    paces the tries) until the database is back or `stop` is set. Stopped first, the job
    stays leased to this worker: it is claimed again when the lease ends (at once at the
    next start) and rebuilds the same result, under the same UIDs.
    """
    outage = outage or Outage("worker", logger=log.bind(worker=worker))
    stop = stop or threading.Event()  # never set: wait for the database as long as it takes
    job_log = log.bind(worker=worker, **job.log_context())
    job_log.info("job_started", attempt=job.attempts)
    if job.attempts == 1:  # the claim set updated_at; created_at is when the study became stable
        metrics.get().job_stable_to_claimed.observe(metrics.seconds_between(job.created_at, job.updated_at))
    try:
        with _Heartbeat(queue, job.id, worker, config.workers.lease_seconds):
            instances = queue.study_instances(job.study_uid)
            check_files_present(instances)
            previous = previous_results(queue, job, job_log=job_log)
            gsps, analysis = report_study(
                [i.path for i in instances], detector, config, analysis_key=job.analysis_key,
                job_log=job_log, previous=previous,
            )
            gsps_uid = str(gsps.SOPInstanceUID)
            path = store.write_result(gsps, name=f"{gsps_uid}.dcm")
            outputs = _make_outputs(analysis, detector, config, store, analysis_key=job.analysis_key,
                                    previous=previous, job_log=job_log)
    except Exception as error:
        # PermanentError (corrupt pixels, unreadable file) fails at once; anything else
        # is retried with backoff, up to workers.max_attempts.
        retryable = not isinstance(error, PermanentError)
        message = describe_error(error)
        try:
            state = _fail(queue, job, worker, config, message, retryable=retryable, outage=outage, stop=stop)
        except QueueUnavailable as unavailable:
            job_log.warning("job_left_leased", error=str(unavailable))
            return
        if state is None:
            job_log.warning("job_lease_lost")
            return
        metrics.get().job_failures.labels(outcome=metrics.failure_outcome(state)).inc()
        if state == "failed":
            job_log.error("job_failed", error=message, state=state)
        else:
            job_log.warning("job_error_retry", error=message, state=state)
        return
    try:
        outage.call(
            lambda: queue.complete_job(
                job.id,
                worker=worker,
                result_path=str(path),
                result_sop_instance_uid=gsps_uid,
                detections=analysis.detection_count,
                # Each destination gets what it takes of what was made (no capture of a
                # study where no image was analysed).
                destinations={name: [o for o in wanted if o == "gsps" or o in outputs]
                              for name, wanted in config.outputs_by_destination.items()},
                outputs=outputs,
            ),
            stop=stop,
        )
    except LeaseLost:
        # Our lease expired and another worker holds the job now; its result
        # (same deterministic GSPS UID) is the one that counts.
        job_log.warning("job_lease_lost")
        return
    except QueueUnavailable as unavailable:
        # Told to stop while the database was away; the result file is written, and
        # the next attempt rewrites the same object under the same name.
        job_log.warning("job_left_leased", error=str(unavailable))
        return
    metrics.get().job_claimed_to_done.observe(metrics.seconds_between(job.updated_at, utcnow()))
    job_log.info(
        "job_done",
        images=len(analysis.images),
        skipped=len(analysis.skipped),
        detections=analysis.detection_count,
        gsps_sop_instance_uid=gsps_uid,
        sr_sop_instance_uid=outputs["sr"][1] if "sr" in outputs else None,
        sc_sop_instance_uid=outputs["sc"][1] if "sc" in outputs else None,
    )


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker if the node process dies (prctl PR_SET_PDEATHSIG).

    Without it a `kill -9` of the node would leave workers running on, claiming jobs
    that a restarted node also works on.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass  # not Linux/glibc: the parent-pid check in the loop still stops the worker


def worker_main(
    config: Config, name: str, stop_event, ready_queue, poll_seconds: float = 0.5, *,
    worker_id: str | None = None, tmp_dir=None,
) -> None:
    """Entry point of a worker process (spawned: it inherits none of the parent's settings).

    Everything it prints is a log event (dicom_node.log, dicom_node.libraries), and it
    never ends with a traceback: multiprocessing prints "Process worker-1:" and the
    traceback of an exception that escapes the target, whose last line is the exception's
    message (a library's message can quote dataset values). Such an exception is logged
    as `worker_crashed` with its type and raise site, and the process exits with status 1
    (the pool logs worker_died and replaces it). `worker_id`: its id in the job table
    (default `name`); `tmp_dir`: where its temp files go (its pool owner's spool area).
    """
    from dicom_node.libraries import configure_libraries
    from dicom_node.log import capture_stray_output, configure_logging

    configure_logging(config.logging.level, config.logging.format)
    configure_libraries()
    stray_output = capture_stray_output(native=True)  # C decoders write to fd 2 themselves
    try:
        _run_worker(config, name, stop_event, ready_queue, poll_seconds, worker_id=worker_id or name,
                    tmp_dir=tmp_dir)
    except SystemExit:
        raise
    except BaseException as error:
        log.error("worker_crashed", worker=name, error=describe_error(error))
        raise SystemExit(1) from None
    finally:
        stray_output.close()


def _run_worker(
    config: Config, name: str, stop_event, ready_queue, poll_seconds: float, *, worker_id: str, tmp_dir
) -> None:
    """Load the model once, then claim jobs until told to stop."""
    from dicom_node.errors import CheckpointError
    from dicom_node.model.detector import load_detector
    from dicom_node.queue.ops import Queue
    from dicom_node.store import InstanceStore

    # The parent handles SIGINT/SIGTERM and tells workers through stop_event, so a
    # Ctrl-C in the foreground does not kill a worker in the middle of a job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    parent_pid = os.getppid()
    worker_log = log.bind(worker=name)
    try:
        detector = load_detector(config.detector, device=config.workers.device)
        device = str(getattr(detector, "device", "cpu"))
    except CheckpointError as error:
        ready_queue.put((name, "error", str(error)))
        return
    except Exception as error:
        ready_queue.put((name, "error", describe_error(error)))
        return
    queue = Queue(config.database_url)
    store = InstanceStore(config.node.data_dir, fsync=config.node.fsync, tmp_dir=tmp_dir)
    worker_log.info(
        "worker_ready", pid=os.getpid(), device=device, architecture=detector.architecture, worker_id=worker_id
    )
    ready_queue.put((name, "ready", device))
    outage = Outage("worker", logger=worker_log)
    while not stop_event.is_set() and os.getppid() == parent_pid:
        try:
            job = queue.claim_next_job(
                worker=worker_id, lease_seconds=config.workers.lease_seconds, max_attempts=config.workers.max_attempts
            )
        except QueueUnavailable as error:
            stop_event.wait(outage.failed(error))  # logged once per outage; growing pauses
            continue
        outage.ok()
        if job is None:
            stop_event.wait(poll_seconds)
            continue
        process_job(
            job, queue=queue, store=store, detector=detector, config=config, worker=worker_id,
            outage=outage, stop=stop_event,
        )
    worker_log.info("worker_stopped")
