"""Ingest throughput: this node's Storage SCP against dcmtk's storescp.

One set of full-size synthetic mammograms is sent by the same sender (dcmtk
storescu, one association per run, over loopback) first to ``storescp`` and then
to this node's SCP (the real ``start_scp`` with a real SQLite ``Queue`` and
fsync on), for several repetitions. Each run prints MB/s (10^6 bytes of the
sent files per second of storescu wall time); the summary prints the median of
each and their ratio. The node's target is at least 0.8x storescp.

Before each timed run the node (a fresh one per run) stores WARM_UP_INSTANCES small
instances over an untimed association, as a node in service has: the write-ahead log of
its job database is then reused after a checkpoint instead of growing, which a fresh
database's does for its first ~200 rows (each commit then also journals the log's new
size: 0.51 against 0.38 ms per recorded instance, measured here).

Each repetition also writes the same bytes to disk with no network at all, with the
node's own writer and store (128 KiB at a time into a SpoolFile, writeback started every
128 KiB, then the fsync, the link into place and the fsync of its folder): the "disk" figure.
storescp writes nothing to disk within its timing (its files stay in the page cache; the
`sync` after each run writes them untimed), while the node answers each instance only once
it is on disk: the node does the work of both figures, on the same CPUs, and waits for the
disk at the end of every instance, while the sender waits for the answer. Where the disk
figure is not well above storescp's, that, not the node's own code, is what holds the
ratio down.

Each repetition also runs the node once more with node.fsync = false ("no-fsync": never a
setting for service, its answers outrun the disk): its instance files then stay in the
page cache within its timing, as storescp's do (the job table's commit is still flushed).
What separates it from storescp is the node's own code; what separates the node from it
is making each instance durable before its answer.

Each node run also prints how long the node took, on average, to store an instance once its
data set was whole (the checks, the fsyncs of file and folder, the job table's commit: its
dicom_node_instance_store_seconds), while the sender waited for the answer.

    python -m dicom_node.bench.ingest --count 8 --repeat 3

With ``--senders 4``, 4 storescu processes send at once (``--count`` images each) to
storescp --fork, to one `dicom-node serve` receiver process and to two sharing the port
(dicom_node.bench.ingest_concurrent); it prints aggregate MB/s and instances/s of each.

Figures depend on the machine (CPU, disk, fsync cost); print only what was measured.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.bench.processes import free_ports

SENDER_AE = "BENCH_SCU"
STORESCP_AE = "STORESCP"
NODE_AE = "DICOM_NODE"
READY_TIMEOUT_SECONDS = 30
SEND_TIMEOUT_SECONDS = 600
IMAGES_PER_STUDY = 4  # a screening exam: L/R CC and MLO
WARM_UP_INSTANCES = 250  # ~5 log pages each: past the 1000-page checkpoint of SQLite's WAL
WARM_UP_SIZE = (64, 64)


@dataclass(frozen=True)
class Run:
    receiver: str
    repetition: int
    seconds: float
    megabytes: float

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


def make_images(folder: Path, *, count: int, rows: int, columns: int, seed: int = 0) -> list[Path]:
    """``count`` MG For Presentation images, 16 bits allocated, 12 stored, uncompressed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    base = 1000 + 1500 * (xx / columns) + 400 * np.sin(yy / 97.0)
    paths = []
    study_uid = series_uid = ""
    for index in range(count):
        if index % IMAGES_PER_STUDY == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        noise = rng.normal(0, 60, size=(rows, columns)).astype(np.float32)
        pixels = np.clip(base + noise, 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = "BENCH^SYNTHETIC"
        ds.PatientID = "BENCH-0001"
        ds.StudyDate = ds.ContentDate = "20260101"
        ds.Modality = "MG"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImageLaterality = "LR"[index % 2]
        ds.ViewPosition = ("CC", "MLO")[(index // 2) % 2]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# dcmtk sets TCP_NODELAY on its sockets unless this variable says 0: say 1, for the record.
DCMTK_ENVIRONMENT = {**os.environ, "TCP_NODELAY": "1"}
STORESCP_MAX_PDU = 131072  # the largest PDU storescp accepts (dcmtk's maximum)
# The node as in service, and once more with its instance files unflushed (node.fsync =
# false): what is left of the gap to storescp once the node, like storescp, leaves them to
# the page cache.
NODE, UNFLUSHED = "dicom-node", "no-fsync"
NODES = (NODE, UNFLUSHED)


def send(port: int, called_ae: str, files: list[Path]) -> float:
    """storescu all files in one association; return the wall time in seconds."""
    command = ["storescu", "-aet", SENDER_AE, "-aec", called_ae, "--max-pdu", str(STORESCP_MAX_PDU),
               "127.0.0.1", str(port)]
    start = time.perf_counter()
    result = subprocess.run(
        [*command, *map(str, files)], capture_output=True, text=True, timeout=SEND_TIMEOUT_SECONDS,
        env=DCMTK_ENVIRONMENT,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed: {result.stderr.strip()[-2000:]}")
    return seconds


def _wait_until_echo_answers(port: int, called_ae: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    command = ["echoscu", "-aet", SENDER_AE, "-aec", called_ae, "127.0.0.1", str(port)]
    while subprocess.run(command, capture_output=True).returncode != 0:
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"storescp did not answer C-ECHO in {READY_TIMEOUT_SECONDS} s")
        time.sleep(0.05)


def run_storescp(files: list[Path], output: Path) -> float:
    """Send to dcmtk storescp at its fastest (+B: bit-preserving, each data set written to its
    file as it arrives; 128 KiB PDUs; TCP_NODELAY; no fsync) and return the send time."""
    output.mkdir(parents=True)
    port = free_ports(1)[0]
    command = ["storescp", "--aetitle", STORESCP_AE, "+xa", "+B", "--max-pdu", str(STORESCP_MAX_PDU),
               "-od", str(output), str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENVIRONMENT)
    try:
        _wait_until_echo_answers(port, STORESCP_AE, process)
        seconds = send(port, STORESCP_AE, files)
    finally:
        process.terminate()
        process.wait(timeout=30)
    received = [p for p in output.iterdir() if p.is_file()]
    if len(received) != len(files):
        raise RuntimeError(f"storescp stored {len(received)} of {len(files)} files")
    return seconds


def run_node(files: list[Path], data_dir: Path, *, warm_up: list[Path] = (),
             storing_ms: list[float] | None = None, fsync: bool = True) -> float:
    """Send to this node's SCP (real store and queue, node.fsync as `fsync`); return the
    send time of `files`, sent after `warm_up` (untimed, on its own association).
    `storing_ms` gets the mean time the node took to store each of `files` once it had its
    data set whole (its dicom_node_instance_store_seconds): the checks, the fsyncs and the
    job table's commit, while the sender waits for the answer."""
    from dicom_node import metrics
    from dicom_node.config import parse_config
    from dicom_node.queue import Queue
    from dicom_node.receive import start_scp
    from dicom_node.store import InstanceStore

    config = parse_config(
        {
            "node": {
                "ae_title": NODE_AE,
                "host": "127.0.0.1",
                "port": 0,
                "data_dir": str(data_dir),
                "fsync": fsync,
            },
            "security": {"allow_any_caller": True},
        },
        base_dir=data_dir,
    )
    store = InstanceStore(config.node.data_dir, fsync=config.node.fsync)
    queue = Queue(config.database_url)
    queue.migrate()
    server = start_scp(config, queue=queue, store=store)
    try:
        if warm_up:
            send(server.server_address[1], NODE_AE, warm_up)
        timed_before = metrics.count_and_sum(metrics.get().instance_store)
        seconds = send(server.server_address[1], NODE_AE, files)
        timed_after = metrics.count_and_sum(metrics.get().instance_store)
    finally:
        server.shutdown()
        queue.close()
    stored_files = list(store.instances_dir.rglob("*.dcm"))
    if len(stored_files) != len(files) + len(warm_up):
        raise RuntimeError(f"the node stored {len(stored_files)} of {len(files) + len(warm_up)} files")
    count, total = (after - before for after, before in zip(timed_after, timed_before))
    if count != len(files):
        raise RuntimeError(f"the node timed storing {count:.0f} of {len(files)} files")
    if storing_ms is not None:
        storing_ms.append(1000 * total / count)
    return seconds


DISK_CHUNK_BYTES = 128 * 1024  # what a 128 KiB PDU brings


def run_disk(files: list[Path], output: Path) -> float:
    """Write the files' bytes under `output` with the node's own writer and store, with no
    network: a SpoolFile fed chunks of a PDU's size (writeback every 128 KiB, free space checked),
    then InstanceStore.persist_instance (fsync, link into place, fsync of the folder); return
    the seconds it took. The files are read into memory first, untimed."""
    from dicom_node.receive.spool import SpoolFile, StorageLimits
    from dicom_node.store import InstanceStore

    contents = [path.read_bytes() for path in files]
    store = InstanceStore(output, fsync=True)
    limits = StorageLimits(max_dataset_bytes=max(map(len, contents)), keep_free_bytes=0)
    start = time.perf_counter()
    for index, content in enumerate(contents):
        spool = SpoolFile(limits, store, header=b"")  # the files carry their own header
        with memoryview(content) as view:
            for offset in range(0, len(content), DISK_CHUNK_BYTES):
                spool.write(view[offset:offset + DISK_CHUNK_BYTES])
        spool.close()
        if spool.refusal is not None:
            raise RuntimeError(f"disk run: {spool.refusal.reason}")
        store.persist_instance(Path(spool.name), study_uid="2.25.1", series_uid="2.25.2",
                               sop_instance_uid=f"2.25.{index + 3}")
    return time.perf_counter() - start


def _tool_version(tool: str) -> str:
    result = subprocess.run([tool, "--version"], capture_output=True, text=True)
    first = next((line for line in result.stdout.splitlines() if line.strip()), "?")
    return first.strip("$ ").removeprefix("dcmtk: ")  # "$dcmtk: storescu v3.6.7 ... $"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_ingest", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--count", type=int, default=8,
                        help="images per run, or per sender with --senders (default 8)")
    parser.add_argument("--rows", type=int, default=3328)
    parser.add_argument("--cols", type=int, default=2560)
    parser.add_argument("--repeat", type=int, default=5, help="runs per receiver, interleaved (default 5)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".bench"),
        help="folder for images and received files (default .bench); both receivers write here",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument(
        "--senders", type=int, default=1,
        help="more than 1: that many concurrent senders against storescp --fork, 1 and 2 "
        "receiver processes (default 1: the single-association comparison)",
    )
    parser.add_argument("--json", type=Path, help="with --senders: also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.count, args.repeat, args.rows, args.cols, args.senders) < 1:
        parser.error("--count, --repeat, --rows, --cols and --senders must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"bench_ingest: {tool} (dcmtk) is not on PATH", file=sys.stderr)
            return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # Absolute: the receivers resolve a relative data_dir against their config file.
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=args.work_dir)).resolve()
    try:
        total = args.count * args.senders
        print(f"generating {total} images {args.rows}x{args.cols} (16-bit) in {work}")
        files = make_images(work / "images", count=total, rows=args.rows, columns=args.cols)
        if args.senders > 1:
            from dicom_node.bench import ingest_concurrent

            return ingest_concurrent.run(files, senders=args.senders, repeat=args.repeat, work=work,
                                         json_path=args.json)
        warm_up = make_images(work / "warm-up", count=WARM_UP_INSTANCES, rows=WARM_UP_SIZE[0],
                              columns=WARM_UP_SIZE[1], seed=1)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(
            f"{megabytes / args.count:.1f} MB each, {megabytes:.1f} MB per run; sender "
            f"{_tool_version('storescu')}, one association per run, loopback; "
            f"{os.cpu_count()} CPUs; storescp +B, {STORESCP_MAX_PDU // 1024} KiB PDUs, TCP_NODELAY, no fsync; "
            f"node fsync on, after {WARM_UP_INSTANCES} small instances untimed; {UNFLUSHED}: the node "
            "again with node.fsync = false; disk: the same bytes written and fsynced as the node does, "
            "no network; runs interleaved"
        )
        runs: list[Run] = []
        storing_ms: list[float] = []
        receivers = (("storescp", run_storescp),
                     (NODE, functools.partial(run_node, warm_up=warm_up, storing_ms=storing_ms)),
                     (UNFLUSHED, functools.partial(run_node, warm_up=warm_up, storing_ms=storing_ms, fsync=False)),
                     ("disk", run_disk))
        for repetition in range(1, args.repeat + 1):
            for receiver, receive in receivers:
                target = work / f"{receiver}-{repetition}"
                seconds = receive(files, target)
                run = Run(receiver, repetition, seconds, megabytes)
                runs.append(run)
                storing = f"   storing {storing_ms[-1]:.2f} ms per instance" if receiver in NODES else ""
                print(
                    f"run {repetition} {receiver:>10}: {seconds:7.3f} s "
                    f"{run.mb_per_second:8.1f} MB/s{storing}",
                    flush=True,
                )
                shutil.rmtree(target)
                # Each run starts with nothing left to write: storescp's files are still
                # dirty in the page cache, and removing any receiver's files is a
                # journal transaction; the next run's fsyncs would wait for them.
                os.sync()
        medians = {
            receiver: statistics.median(r.mb_per_second for r in runs if r.receiver == receiver)
            for receiver, _ in receivers
        }

        def against_storescp(receiver: str) -> str:
            return f"median {medians[receiver]:.1f} MB/s ({medians[receiver] / medians['storescp']:.2f}x storescp)"

        print(f"disk: the same bytes written and fsynced, no network: {against_storescp('disk')}")
        print(
            f"{UNFLUSHED}: the node with node.fsync = false (never in service: its answers outrun the disk), "
            f"instance files left in the page cache as storescp's are: {against_storescp(UNFLUSHED)}"
        )
        # Each round's own ratio (its two runs follow each other): how much the machine moved.
        per_round = [
            node.mb_per_second / scp.mb_per_second
            for scp, node in zip(
                (r for r in runs if r.receiver == "storescp"), (r for r in runs if r.receiver == NODE)
            )
        ]
        print("ratio in each round: " + ", ".join(f"{value:.2f}x" for value in per_round))
        ratio = medians[NODE] / medians["storescp"]
        print(
            f"median storescp {medians['storescp']:.1f} MB/s, dicom-node "
            f"{medians[NODE]:.1f} MB/s, ratio {ratio:.2f}x (target >= 0.80x)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from dicom_node.log import configure_logging

    configure_logging("warning", "console")  # the node's per-instance lines would drown the figures
    sys.exit(main())
