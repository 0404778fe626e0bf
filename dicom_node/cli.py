"""`dicom-node ...`: parse arguments, load the config, call the package. Nothing more.

Exit status: 0 success, 1 the operation failed (e.g. a destination is unreachable),
2 bad configuration or arguments. Expected errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from dicom_node.errors import NodeError
from dicom_node.log import report_failure

CONFIG_ENV = "DICOM_NODE_CONFIG"  # the config file when --config is not given
FALLBACK_CONFIG = "config/dicom-node.toml"
CONFIG_HELP = f"node config TOML (default: ${CONFIG_ENV} if set, else {FALLBACK_CONFIG})"


def _load(args):
    from dicom_node.config import load_config
    from dicom_node.libraries import configure_libraries
    from dicom_node.log import configure_logging

    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format)
    configure_libraries()
    return config


def _queue(config):
    from dicom_node.queue.ops import Queue

    queue = Queue(config.database_url)
    queue.migrate()
    return queue


def cmd_serve(args) -> int:
    from dicom_node.node import serve

    return serve(_load(args))


def cmd_worker(args) -> int:
    from dicom_node.node import work

    return work(_load(args))


def cmd_check_config(args) -> int:
    from dicom_node.ops.preflight import check_config

    print(check_config(_load(args), source=args.config))
    return 0


def _next_attempt(item) -> str | None:
    """When a pending job or delivery is tried next (its run_after); None otherwise."""
    return item.run_after.isoformat() if item.state == "pending" and item.run_after else None


def _job_summary(job) -> dict:
    return {
        "id": job.id,
        "study_uid": job.study_uid,
        "generation": job.generation,
        "state": job.state,
        "attempts": job.attempts,
        "detections": job.detections,
        "error": job.error,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "updated_at": job.updated_at.isoformat() if job.updated_at else None,
        "result_sop_instance_uid": job.result_sop_instance_uid,
        "next_attempt_at": _next_attempt(job),
        "deliveries": [
            {"destination": d.destination, "output": d.output, "state": d.state, "attempts": d.attempts,
             "error": d.error, "next_attempt_at": _next_attempt(d)}
            for d in job.deliveries
        ],
    }


def cmd_jobs(args) -> int:
    config = _load(args)
    queue = _queue(config)
    if args.jobs_command == "list":
        jobs = queue.list_jobs(state=args.state, limit=args.limit)
        if args.json:
            print(json.dumps([_job_summary(j) for j in jobs], indent=2))
            return 0
        print(f"{'ID':>6}  {'STATE':8}  {'GEN':>3}  {'TRIES':>5}  {'DETS':>4}  {'DELIVERY':18}  STUDY / ERROR")
        for job in jobs:
            states = defaultdict(int)
            for delivery in job.deliveries:
                states[delivery.state] += 1
            delivery = ",".join(f"{k}:{v}" for k, v in sorted(states.items())) or "-"
            detections = "-" if job.detections is None else job.detections
            print(f"{job.id:>6}  {job.state:8}  {job.generation:>3}  {job.attempts:>5}  {detections:>4}  "
                  f"{delivery:18}  {job.study_uid}")
            if job.error:
                print(f"{'':>6}  error: {job.error}")
            for delivery in job.deliveries:
                if delivery.error:
                    print(f"{'':>6}  delivery {delivery.destination} {delivery.output} ({delivery.state}): "
                          f"{delivery.error}")
        return 0
    if args.jobs_command == "show":
        job = queue.get_job(args.job_id)
        if job is None:
            print(f"no job {args.job_id}", file=sys.stderr)
            return 1
        print(json.dumps(_job_summary(job), indent=2))
        return 0
    if args.jobs_command == "retry":
        return _retry(queue, config, args.job_id, now=args.now)
    if args.jobs_command == "rerun":
        queued = queue.rerun_study(args.study)
        if queued is None:
            print(f"study {args.study}: no instance of it is recorded", file=sys.stderr)
            return 1
        job, instances = queued
        print(f"study {args.study}: job {job.id} queued (generation {job.generation}, "
              f"{instances} instance(s)); its result is a new object, sent to every destination")
        return 0
    raise AssertionError(args.jobs_command)


def _retry(queue, config, job_id: int, *, now: bool) -> int:
    from dicom_node.ops.runlock import running_node_pid

    requeued = queue.retry_job(job_id)
    hurried = queue.run_job_now(job_id) if now else 0
    if requeued:
        print(f"job {job_id}: queued again")
    elif hurried:
        print(f"job {job_id}: pending work due now")
    else:
        job = queue.get_job(job_id)
        waiting = [] if job is None else [d for d in job.deliveries if d.state == "pending"]
        if waiting:
            first = min(waiting, key=lambda d: d.run_after)
            print(f"job {job_id}: nothing failed; next delivery attempt at {first.run_after.isoformat()} "
                  "(--now sends it at once)", file=sys.stderr)
        else:
            print(f"job {job_id}: nothing to retry (unknown, or not failed)", file=sys.stderr)
        return 1
    if running_node_pid(config.node.data_dir) is None:
        print(f"no dicom-node is running on {config.node.data_dir}: the job is queued, but nothing "
              "sends it until a node runs (dicom-node serve)")
    return 0


def cmd_status(args) -> int:
    config = _load(args)
    from dicom_node.ops.status import format_status, status_report

    report = status_report(config, _queue(config))
    print(json.dumps(report, indent=2, default=str) if args.json else format_status(report))
    return 0


def cmd_purge(args) -> int:
    from dicom_node.config import parse_duration

    try:
        older_than = parse_duration(args.older_than)
    except ValueError as error:
        print(f"error: argument --older-than: {error}", file=sys.stderr)
        return 2
    from dicom_node.ops.retention import format_purge, purge

    run = purge(_load(args), older_than=older_than)
    print(format_purge(run))
    return 1 if run.failed else 0


def cmd_echo(args) -> int:
    from dicom_node.deliver.scu import echo
    from dicom_node.errors import RetryableError

    config = _load(args)
    destinations = [config.destination(args.destination)] if args.destination else config.destinations
    if not destinations:
        print("no destinations configured", file=sys.stderr)
        return 1
    failed = 0
    for destination in destinations:
        try:
            result = echo(destination, calling_ae_title=config.node.ae_title, tls=config.security.tls)
            print(f"{destination.name}: {result}")
        except RetryableError as error:
            print(f"{destination.name}: FAILED {error}")
            failed += 1
    return 1 if failed else 0


def cmd_analyze(args) -> int:
    """Offline: the node's pipeline on files, each study's results (--outputs) written to --out."""
    import pydicom

    from dicom_node.analyse.worker import offline_results
    from dicom_node.model.detector import load_detector

    config = _load(args)
    detector = load_detector(config.detector, device=args.device or config.workers.device)
    studies: dict[str, list[str]] = defaultdict(list)
    for name in args.files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            studies[str(ds.StudyInstanceUID)].append(name)
        except Exception as error:
            print(f"{name}: not readable as DICOM ({error})", file=sys.stderr)
            return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for study_uid, paths in studies.items():
        results, analysis = offline_results(paths, detector, config, outputs=args.outputs)
        for result in results:
            target = out / f"{result.SOPInstanceUID}.dcm"
            result.save_as(target, enforce_file_format=True)
            print(f"{target}: {result.SOPClassUID.name}, study {study_uid}: {len(analysis.images)} image(s), "
                  f"{len(analysis.skipped)} skipped, {analysis.detection_count} mass(es) marked")
    return 0


def _outputs(text: str) -> list[str]:
    """`--outputs gsps,sr,sc`: which results `analyze` writes (names as in [[destinations]] outputs)."""
    from typing import get_args

    from dicom_node.config import Output

    known = get_args(Output)
    outputs = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in outputs if name not in known]
    if unknown or not outputs:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more of {', '.join(known)}, separated by commas")
    return outputs


def cmd_phantom(args) -> int:
    from dicom_node.lab.phantom import write_phantoms
    from dicom_node.lab.phantom_variety import VARIETIES

    variety = VARIETIES[args.variety] if args.variety else None
    annotations = write_phantoms(Path(args.out), n=args.n, seed=args.seed, rows=args.rows, columns=args.columns,
                                 variety=variety)
    print(f"wrote {args.n} synthetic phantom image(s) and {annotations} (SYNTHETIC - not patient data)")
    return 0


def cmd_train(args) -> int:
    from dicom_node.lab.train.config import load_train_config
    from dicom_node.lab.train.loop import train

    path = train(load_train_config(args.config), device=args.device)
    print(f"deployable checkpoint: {path}")
    return 0


def cmd_evaluate(args) -> int:
    from dicom_node.errors import ConfigError
    from dicom_node.lab.evaluate.run import run_evaluation, score_detections

    config = _load(args)
    if args.detections:
        model_options = [flag for flag, value in (("--weights", args.weights), ("--architecture", args.architecture),
                                                  ("--device", args.device)) if value]
        if model_options:
            raise ConfigError(f"--detections scores detections made elsewhere, {' and '.join(model_options)} "
                              "would run a model: give one or the other")
        threshold = config.detector.score_threshold if args.threshold is None else args.threshold
        result = score_detections(Path(args.detections), Path(args.data), Path(args.out), threshold=threshold,
                                  by=args.by)
    else:
        result = run_evaluation(config.detector, Path(args.data), Path(args.out), by=args.by,
                                device=args.device or "cpu", threshold=args.threshold, weights=args.weights,
                                architecture=args.architecture)
    print(json.dumps(result.get("summary", result), indent=2, default=str))
    return 0


def cmd_convert_cbis_ddsm(args) -> int:
    from dicom_node.lab.datasets.cbis_ddsm import convert_cbis_ddsm

    summary = convert_cbis_ddsm(args.csv, Path(args.root), Path(args.out))
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


def cmd_split(args) -> int:
    from dicom_node.lab.datasets.coco import write_splits

    written = write_splits(Path(args.data), seed=args.seed, group_by=args.group_by or None)
    for part, path in written.items():
        print(f"{part}: {path}")
    return 0


def cmd_import_detectron2(args) -> int:
    from dicom_node.model.detectron2_import import import_detectron2

    import_detectron2(Path(args.source), Path(args.target), architecture=args.architecture)
    print(f"wrote {args.target} ({args.architecture})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="An AI node for mammography that speaks DICOM. Not a medical device.",
        epilog=f"--config may come before or after the command. Environment: {CONFIG_ENV}=PATH "
               "names the node config when --config is not given.",
    )

    def with_config(p):
        # SUPPRESS: a level where --config is not given leaves what another level set;
        # main() fills in the default once all levels are parsed.
        p.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help=CONFIG_HELP)
        return p

    with_config(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    with_config(sub.add_parser("serve", help="run the node in the foreground")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser(
        "worker", help="run only the analysis workers, on a PostgreSQL job table that receivers share",
    )).set_defaults(func=cmd_worker)
    with_config(sub.add_parser("check-config", help="validate the config and load the detector")).set_defaults(
        func=cmd_check_config)
    status = with_config(sub.add_parser("status", help="node running?, queue depth, oldest pending job, last errors"))
    status.add_argument("--json", action="store_true", help="the full report as JSON")
    status.set_defaults(func=cmd_status)

    jobs = with_config(sub.add_parser("jobs", help="inspect and retry analysis jobs"))
    jobs.set_defaults(func=cmd_jobs)
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = with_config(jobs_sub.add_parser("list", help="the newest jobs with their delivery states"))
    listing.add_argument("--state", choices=["pending", "running", "done", "failed"],
                         help="only jobs in this state (failed: also done jobs with a failed delivery)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    with_config(jobs_sub.add_parser("show", help="one job as JSON")).add_argument("job_id", type=int)
    retry = with_config(jobs_sub.add_parser("retry", help="retry a failed job or its failed deliveries"))
    retry.add_argument("job_id", type=int)
    retry.add_argument("--now", action="store_true",
                       help="also send its pending deliveries at once instead of after their backoff")
    rerun = with_config(jobs_sub.add_parser("rerun", help="analyse a study again (a new result) and send it"))
    rerun.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")

    purge = with_config(sub.add_parser("purge", help="remove studies delivered longer ago than DURATION"))
    purge.add_argument("--older-than", required=True, metavar="DURATION",
                       help="90s, 30m, 48h, 7d; 0s: every fully delivered study")
    purge.set_defaults(func=cmd_purge)

    echo = with_config(sub.add_parser("echo", help="C-ECHO the configured destinations"))
    echo.add_argument("--destination", help="only this destination (by name)")
    echo.set_defaults(func=cmd_echo)

    analyze = with_config(sub.add_parser("analyze", help="offline: analyse files, write their results"))
    analyze.add_argument("files", nargs="+")
    analyze.add_argument("--out", required=True)
    analyze.add_argument("--outputs", type=_outputs, default=["gsps"], metavar="gsps,sr,sc",
                         help="which results to write: GSPS, structured report, burned-in captures (default gsps)")
    analyze.add_argument("--device")
    analyze.set_defaults(func=cmd_analyze)

    phantom = sub.add_parser("phantom", help="write synthetic mammogram phantoms with COCO labels")
    phantom.add_argument("--out", required=True)
    phantom.add_argument("--n", type=int, default=8)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--rows", type=int, default=3328)
    phantom.add_argument("--columns", type=int, default=2560)
    phantom.add_argument("--variety", choices=["training", "texture_reticular", "contrast_band", "size_3328x2560"],
                         help="draw size, encoding, look, masses and burned-in text from a named variety "
                              "(dicom_node/lab/phantom_variety.py); --rows/--columns are then not used")
    phantom.set_defaults(func=cmd_phantom)

    train = sub.add_parser("train", help="train a detector (config/train/*.toml)")
    train.add_argument("--config", required=True)
    train.add_argument("--device")
    train.set_defaults(func=cmd_train)

    evaluate = with_config(sub.add_parser("evaluate", help="AP50, precision/recall/F1, FROC on a COCO set"))
    evaluate.add_argument("--data", required=True, help="COCO annotations JSON (images relative to it)")
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--weights", help="checkpoint, training checkpoint, or 'demo' (default: detector.weights)")
    evaluate.add_argument("--architecture", help="make sure the checkpoint is this architecture")
    evaluate.add_argument("--detections", metavar="FILE",
                          help="score these detections (COCO results JSON, made elsewhere) instead of running a model")
    evaluate.add_argument("--threshold", type=float, help="operating threshold (default: detector.score_threshold)")
    evaluate.add_argument("--by", help="break metrics down by this image field (view, density, ...)")
    evaluate.add_argument("--device")
    evaluate.set_defaults(func=cmd_evaluate)

    cbis = sub.add_parser("convert-cbis-ddsm", help="CBIS-DDSM mass CSVs + DICOM tree -> COCO JSON")
    cbis.add_argument("--csv", nargs="+", required=True, help="mass_case_description_*.csv files")
    cbis.add_argument("--root", required=True, help="folder holding the CBIS-DDSM DICOM download")
    cbis.add_argument("--out", required=True, help="COCO annotations JSON to write")
    cbis.set_defaults(func=cmd_convert_cbis_ddsm)

    split = sub.add_parser("split", help="split a COCO file into train/val/test (the study's 2378/400/400 shares)")
    split.add_argument("--data", required=True)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--group-by", default="patient_id", help="image field kept within one part ('' for none)")
    split.set_defaults(func=cmd_split)

    d2 = sub.add_parser("import-detectron2", help="convert a Detectron2 checkpoint to a dicom-node checkpoint")
    d2.add_argument("source")
    d2.add_argument("target")
    d2.add_argument("--architecture", required=True)
    d2.set_defaults(func=cmd_import_detectron2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = os.environ.get(CONFIG_ENV) or FALLBACK_CONFIG
    try:
        return args.func(args)
    except NodeError as error:
        return report_failure(error)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
