"""End-to-end latency: last image acknowledged to GSPS stored in a real Orthanc, and memory.

For each queue backend (SQLite, or a throwaway PostgreSQL server), this starts a real
Orthanc (the PACS the results go to) and a real `dicom-node serve`, then sends synthetic
screening studies (four phantom views each, dicom_node.lab.phantom) with dcmtk storescu,
one association per study:

1. steady: N studies at a steady rate (studies per minute);
2. burst: N other studies at ten times that rate.

Per study, the latency runs from the C-STORE Success of its last image (storescu's verbose
output, timed here) to the moment Orthanc lists the study's GSPS (its /changes feed,
polled every 50 ms). It includes `study.stable_seconds` (the node waits that long after
the last image before it analyses a study), which is set small and printed. Per phase it
prints p50/p95/max and the peak resident memory (VmHWM, reset at the start of the phase)
of every process: the node's main process and each of its workers, Orthanc and, with
PostgreSQL, each server process; then whether the node's memory stayed bounded in the
burst (its peak in the burst against the steady run).

The default detector is `fixed` (the `fixed_boxes` test double: the same boxes on every
image, no model), so that the figures measure the node; `--detector demo` runs the real
demo weights on the CPU.

    python -m dicom_node.bench.latency [--studies 20] [--rate 20] [--queue sqlite|postgresql|both]

Everything listens on loopback; every process and temporary folder is removed at the end,
also on Ctrl-C. Figures depend on the machine: print only what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.bench.processes import (
    NodeProcess,
    PeakRss,
    Sent,
    Started,
    echo_answers,
    free_ports,
    storescu,
    wait_for,
    write_toml,
)

NODE_AE = "DICOM_NODE"
ORTHANC_AE = "ORTHANC"
GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State (PS3.4 B.5)
IMAGES_PER_STUDY = 4  # a screening exam: R CC, L CC, R MLO, L MLO
BURST_FACTOR = 10
MODEST_SIZE = (1664, 1280)  # half the full 3328 x 2560 in each direction
FULL_SIZE = (3328, 2560)
# The node's memory is "bounded" in the burst when no node process peaks above this
# multiple of its steady-run peak: ten times the rate must not mean ten times the memory.
RSS_BOUND = 1.5
FIXED_BOX = [0.25, 0.30, 0.50, 0.55, 0.91]  # relative x0, y0, x1, y1, score


# --------------------------------------------------------------------------- Orthanc


class Orthanc:
    """A throwaway Orthanc (the Debian binary, no plugins) on free loopback ports."""

    def __init__(self, folder: Path):
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            raise FileNotFoundError("Orthanc is not installed (Debian: orthanc)")
        self.http_port, self.dicom_port = free_ports(2)
        storage = folder / "storage"
        config = {
            "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "Plugins": [], "LuaScripts": [], "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "OrthancExplorerEnabled": False, "WebDavEnabled": False,
            "DicomServerEnabled": True, "DicomAet": ORTHANC_AE, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "SaveJobs": False, "SyncStorageArea": False, "HttpThreadsCount": 4,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process = Started("Orthanc", [binary, folder / "orthanc.json"], folder / "orthanc.log")

    def get(self, path: str):
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def _up(self) -> bool:
        self.process.check_running()
        try:
            self.get("/system")
        except OSError:  # not listening yet (URLError is an OSError)
            return False
        return echo_answers(self.dicom_port, ORTHANC_AE)

    def wait_ready(self) -> Orthanc:
        wait_for(self._up, 60, description="Orthanc to answer REST and C-ECHO")
        return self

    def stop(self) -> None:
        self.process.stop(graceful=False)  # its storage is thrown away


class GspsWatcher:
    """Polls Orthanc's /changes and notes when the first GSPS of each study appeared.

    Only the node sends to this Orthanc, so every new instance is one of its results;
    the SOP Class is checked anyway.
    """

    def __init__(self, orthanc: Orthanc, interval: float = 0.05):
        self.orthanc, self.interval = orthanc, interval
        self.stored: dict[str, float] = {}  # study UID -> time.monotonic() first seen
        self.error: Exception | None = None
        self._since = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        while True:
            answer = self.orthanc.get(f"/changes?since={self._since}&limit=1000")
            seen = time.monotonic()
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    tags = self.orthanc.get(f"/instances/{change['ID']}/simplified-tags")
                    if tags.get("SOPClassUID") == GSPS_SOP_CLASS:
                        self.stored.setdefault(tags["StudyInstanceUID"], seen)
            self._since = answer["Last"]
            if answer["Done"]:
                return

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._poll()
            except (OSError, ValueError, KeyError) as error:  # reported by the waiter
                self.error = error
                return

    def start(self) -> GspsWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# --------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class Study:
    uid: str
    files: list[Path]


def make_studies(folder: Path, *, count: int, seed: int, rows: int, columns: int) -> list[Study]:
    """`count` four-view phantom studies (dicom_node.lab.phantom), one folder each."""
    import pydicom

    from dicom_node.lab.phantom import write_phantoms

    write_phantoms(folder, n=count * IMAGES_PER_STUDY, seed=seed, rows=rows, columns=columns,
                   workers=max(1, min(4, os.cpu_count() or 1)))
    studies = []
    for study_folder in sorted(p for p in (folder / "images").iterdir() if p.is_dir()):
        files = sorted(study_folder.glob("*.dcm"))
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        studies.append(Study(uid, files))
    if len(studies) != count:
        raise RuntimeError(f"expected {count} phantom studies in {folder}, found {len(studies)}")
    return studies


# --------------------------------------------------------------------------- one run


@dataclass
class Phase:
    name: str
    rate_per_minute: float
    studies: list[Study]
    sent: dict[str, Sent] = field(default_factory=dict)
    latencies: dict[str, float] = field(default_factory=dict)
    peak_rss: list[dict] = field(default_factory=list)

    def figures(self) -> dict:
        values = sorted(self.latencies.values())
        return {
            "phase": self.name,
            "rate_per_minute": self.rate_per_minute,
            "studies": len(self.studies),
            "delivered": len(values),
            "missing": len(self.studies) - len(values),
            "send_failures": sum(1 for s in self.sent.values() if not s.ok),
            "latencies_s": [round(v, 3) for v in values],
            "p50_s": round(percentile(values, 50), 3) if values else None,
            "p95_s": round(percentile(values, 95), 3) if values else None,
            "max_s": round(values[-1], 3) if values else None,
            "peak_rss": self.peak_rss,
        }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); `values` sorted."""
    if len(values) == 1:
        return values[0]
    position = (len(values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def send_at_rate(phase: Phase, port: int) -> None:
    """Start one storescu association per study every 60/rate seconds (each in its own
    thread, so a slow send does not delay the next one), and wait for all of them."""
    interval = 60.0 / phase.rate_per_minute
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(32, len(phase.studies))) as pool:
        futures = {}
        for index, study in enumerate(phase.studies):
            delay = start + index * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures[study.uid] = pool.submit(storescu, port, NODE_AE, study.files)
        for uid, future in futures.items():
            phase.sent[uid] = future.result()


def run_phase(phase: Phase, node: NodeProcess, watcher: GspsWatcher, rss: PeakRss, timeout: float) -> None:
    with rss:
        send_at_rate(phase, node.port)
        acknowledged = {uid: s for uid, s in phase.sent.items() if s.ok}

        def all_stored() -> bool:
            node.check_running()
            if watcher.error is not None:
                raise RuntimeError(f"polling Orthanc failed: {watcher.error}")
            return all(uid in watcher.stored for uid in acknowledged)

        try:
            wait_for(all_stored, timeout, description=f"the GSPS of {len(acknowledged)} studies in Orthanc")
        except TimeoutError as error:
            print(f"  {phase.name}: {error}; the figures count only what arrived", file=sys.stderr)
    phase.peak_rss = rss.entries()
    for uid, sent in acknowledged.items():
        if uid in watcher.stored:
            phase.latencies[uid] = watcher.stored[uid] - sent.last_ack
    for uid, sent in phase.sent.items():
        if not sent.ok:
            print(f"  {phase.name}: storescu for study {uid} failed ({sent.returncode}): {sent.output_tail}",
                  file=sys.stderr)


def node_config(folder: Path, args: argparse.Namespace, orthanc: Orthanc, queue_url: str | None) -> Path:
    if args.detector == "fixed":
        boxes = folder / "boxes.json"
        boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes (benchmark)", "boxes": [FIXED_BOX]}))
        detector = {"architecture": "fixed_boxes", "weights": str(boxes), "score_threshold": 0.5}
    else:
        detector = {"weights": "demo"}
    sections = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(folder / "data"),
                 "fsync": True, "max_associations": 64},
        # The bench's one sender AE opens up to one association per study at once in the burst.
        "security": {"allow_any_caller": True, "max_associations_per_caller": 64,
                     "max_connections_per_address": 64},
        "study": {"stable_seconds": args.stable_seconds},
        "workers": {"count": args.workers, "device": "cpu"},
        "detector": detector,
        "delivery": {"retry_backoff_seconds": 1, "max_backoff_seconds": 5},
        "retention": {"enabled": False},
        "logging": {"level": "info", "format": "json"},
    }
    if queue_url:
        sections["queue"] = {"url": queue_url}
    destinations = [{"name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    return write_toml(folder / "node.toml", sections, destinations)


def run_backend(backend: str, args: argparse.Namespace, steady: list[Study], burst: list[Study],
                work: Path) -> dict:
    folder = work / backend
    folder.mkdir()
    roots: dict[str, int] = {}
    with ExitStack() as stack:
        queue_url = None
        if backend == "postgresql":
            from dicom_node.bench.postgres import PostgresServer, postgres_bin_dir

            bin_dir = postgres_bin_dir()
            if bin_dir is None:
                raise RuntimeError("the PostgreSQL server is not installed (Debian: postgresql)")
            server = PostgresServer(bin_dir)
            stack.callback(server.stop)
            server.start()
            queue_url = server.url(server.create_database())
        orthanc = Orthanc(folder / "orthanc")
        stack.callback(orthanc.stop)
        orthanc.wait_ready()
        node = NodeProcess(node_config(folder, args, orthanc, queue_url), folder / "node.log")
        stack.callback(node.stop)
        node.wait_ready()
        roots["dicom-node serve"] = node.pid
        roots["Orthanc"] = orthanc.process.pid
        if backend == "postgresql":
            roots["postgres"] = server.process.pid
        watcher = GspsWatcher(orthanc).start()
        stack.callback(watcher.stop)
        rss = PeakRss(roots)
        phases = [Phase("steady", args.rate, steady), Phase("burst", args.rate * BURST_FACTOR, burst)]
        for phase in phases:
            print(f"{backend}: {phase.name}, {len(phase.studies)} studies at {phase.rate_per_minute:g}/min ...",
                  flush=True)
            run_phase(phase, node, watcher, rss, args.timeout)
        status = node.stop()
        if status != 0:
            raise RuntimeError(f"dicom-node serve exited with {status}: {node.log_tail()}")
    figures = [phase.figures() for phase in phases]
    return {"queue": backend, "phases": figures, **rss_verdict(*figures), "rss_reset": rss.reset_ok}


def rss_verdict(steady: dict, burst: dict) -> dict:
    """The largest burst/steady ratio of peak RSS over the node's processes (by role)."""
    def node_peaks(phase: dict) -> dict[str, float]:
        peaks: dict[str, float] = {}
        for entry in phase["peak_rss"]:
            if entry["process"].startswith("dicom-node"):
                peaks[entry["process"]] = max(peaks.get(entry["process"], 0), entry["peak_rss_mib"])
        return peaks

    before, after = node_peaks(steady), node_peaks(burst)
    ratios = [after[role] / before[role] for role in after if before.get(role)]
    largest = round(max(ratios), 3) if ratios else None
    return {"node_rss_burst_over_steady": largest, "rss_bounded": largest is not None and largest <= RSS_BOUND}


# --------------------------------------------------------------------------- output


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(runs: list[dict]) -> None:
    print()
    print(f"{'queue':11} {'phase':7} {'rate/min':>8} {'studies':>7} {'missing':>7} {'p50 s':>7} {'p95 s':>7} "
          f"{'max s':>7}")
    for run in runs:
        for p in run["phases"]:
            print(f"{run['queue']:11} {p['phase']:7} {p['rate_per_minute']:8g} {p['studies']:7d} {p['missing']:7d} "
                  f"{_seconds(p['p50_s']):>7} {_seconds(p['p95_s']):>7} {_seconds(p['max_s']):>7}")
    print()
    print("peak RSS, MiB (VmHWM of each process, reset at the start of each phase)")
    print(f"{'queue':11} {'process':44} {'pid':>7} {'steady':>8} {'burst':>8} {'burst/steady':>12}")
    for run in runs:
        steady, burst = ({(e["process"], e["pid"]): e["peak_rss_mib"] for e in p["peak_rss"]} for p in run["phases"])
        for key in sorted(steady.keys() | burst.keys(), key=lambda k: (not k[0].startswith("dicom-node"), k)):
            before, after = steady.get(key), burst.get(key)
            ratio = f"{after / before:.2f}" if before and after else "-"
            print(f"{run['queue']:11} {key[0][:44]:44} {key[1]:7d} {before or '-':>8} {after or '-':>8} {ratio:>12}")
    print()
    for run in runs:
        if not run["rss_reset"]:
            print(f"{run['queue']}: note: the peak of some processes could not be reset (/proc/PID/clear_refs): "
                  "theirs count from their start")
        verdict = "yes" if run["rss_bounded"] else "NO"
        print(f"{run['queue']}: node memory bounded in the burst: {verdict} (largest burst/steady peak of a node "
              f"process {run['node_rss_burst_over_steady']}, bound {RSS_BOUND})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20, help="studies per phase (default 20)")
    parser.add_argument("--rate", type=float, default=20, help="steady rate, studies per minute (default 20); "
                        f"the burst is {BURST_FACTOR}x")
    parser.add_argument("--queue", choices=("sqlite", "postgresql", "both"), default="sqlite")
    parser.add_argument("--detector", choices=("fixed", "demo"), default="fixed",
                        help="fixed: the fixed_boxes test double (measures the node; default); demo: the demo "
                        "weights on the CPU")
    parser.add_argument("--workers", type=int, default=1, help="analysis workers (default 1)")
    parser.add_argument("--stable-seconds", type=float, default=1.0, help="study.stable_seconds (default 1)")
    parser.add_argument("--full-size", action="store_true",
                        help=f"full-size images {FULL_SIZE[0]}x{FULL_SIZE[1]} (default {MODEST_SIZE[0]}x"
                        f"{MODEST_SIZE[1]})")
    parser.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLUMNS"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for the last GSPS of a phase (default 600)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.studies < 1 or args.rate <= 0 or args.workers < 1 or args.stable_seconds < 0 or args.timeout <= 0:
        parser.error("--studies, --rate, --workers and --timeout must be positive, --stable-seconds >= 0")
    args.rows, args.columns = args.size or (FULL_SIZE if args.full_size else MODEST_SIZE)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            print(f"bench_latency: {tool} (dcmtk) is not on PATH", file=sys.stderr)
            return 2
    backends = ["sqlite", "postgresql"] if args.queue == "both" else [args.queue]
    detector = ("fixed_boxes test double (no model: the figures measure the node)" if args.detector == "fixed"
                else "demo weights on the CPU")
    settings = {
        "studies_per_phase": args.studies, "images_per_study": IMAGES_PER_STUDY, "rows": args.rows,
        "columns": args.columns, "steady_rate_per_minute": args.rate,
        "burst_rate_per_minute": args.rate * BURST_FACTOR, "detector": args.detector, "workers": args.workers,
        "stable_seconds": args.stable_seconds, "fsync": True, "cpus": os.cpu_count(),
    }
    print(f"bench_latency: {args.studies} studies x {IMAGES_PER_STUDY} images {args.rows}x{args.columns} per "
          f"phase, steady {args.rate:g}/min then burst {args.rate * BURST_FACTOR:g}/min; detector: {detector}; "
          f"{args.workers} worker(s); study.stable_seconds = {args.stable_seconds:g} (part of every latency); "
          f"fsync on; loopback; {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="bench-latency-", dir=os.environ.get("TMPDIR") or "/tmp"))
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    try:
        steady = make_studies(work / "steady", count=args.studies, seed=1, rows=args.rows, columns=args.columns)
        burst = make_studies(work / "burst", count=args.studies, seed=2, rows=args.rows, columns=args.columns)
        runs = [run_backend(backend, args, steady, burst, work) for backend in backends]
    except KeyboardInterrupt:
        print("bench_latency: interrupted; its processes and files are removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
    print_tables(runs)
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
