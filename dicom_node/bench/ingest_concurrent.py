"""Ingest with several senders at once: aggregate MB/s and instances/s of 1 and 2 receivers.

`bench_ingest --senders N` (N > 1): N dcmtk storescu processes, each with its own images
over its own association, all started together, send to

- dcmtk ``storescp --fork`` (one child process per association: without it storescp
  takes one association at a time), for reference;
- one `dicom-node serve` receiver process (``workers.count = 0``);
- two such receivers sharing the port (``node.reuse_port = true``: the kernel spreads
  the connections over them), so that ingest uses two cores.

A receiver without workers needs a job table it can share (README "Scaling out"): a
throwaway PostgreSQL server is started (dicom_node.bench.postgres), with a fresh database
and data_dir for each run. The receivers run as deployed: fsync on, JSON logs at info (to
a file), `study.stable_seconds` long enough that no study is scheduled during a run.
A run's time is from the first sender's start to the last sender's exit (each exits
after its last C-STORE response); figures are the median over ``--repeat`` interleaved
rounds. The kernel picks the receiver of each connection by a hash of its addresses and
ports, so with few associations the split varies from run to run (4+4 or 8+0 instances);
each run prints it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from dicom_node.bench.processes import (
    NodeProcess,
    Started,
    echo_answers,
    free_ports,
    storescu,
    wait_for,
    write_toml,
)

NODE_AE = "DICOM_NODE"
STORESCP_AE = "STORESCP"
RECEIVERS = ("storescp --fork", "dicom-node x1", "dicom-node x2")


@dataclass(frozen=True)
class ConcurrentRun:
    receiver: str
    repetition: int
    senders: int
    instances: int
    megabytes: float
    seconds: float
    per_receiver: tuple[int, ...] = ()  # instances each receiver process stored

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.seconds


def send_together(port: int, called_ae: str, batches: list[list[Path]]) -> float:
    """One storescu per batch, all at once; the seconds from the first start to the last exit."""
    results = [None] * len(batches)

    def send(index: int) -> None:
        results[index] = storescu(port, called_ae, batches[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(batches)} senders to {called_ae} failed: {failed[0].output_tail}")
    return max(r.finished for r in results) - min(r.started for r in results)


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def run_storescp(batches: list[list[Path]], folder: Path) -> tuple[float, tuple[int, ...]]:
    output = folder / "received"
    output.mkdir(parents=True)
    (port,) = free_ports(1)
    process = Started("storescp", ["storescp", "--fork", "--aetitle", STORESCP_AE, "+xa", "-od", output, port],
                      folder / "storescp.log")
    try:
        wait_for(lambda: process.check_running() or echo_answers(port, STORESCP_AE), 30, description="storescp to answer")
        seconds = send_together(port, STORESCP_AE, batches)
    finally:
        process.stop()
    expected = sum(map(len, batches))
    if _count_files(output) != expected:
        raise RuntimeError(f"storescp stored {_count_files(output)} of {expected} files")
    return seconds, ()


def run_receivers(batches: list[list[Path]], folder: Path, *, receivers: int,
                  database_url: str) -> tuple[float, tuple[int, ...]]:
    """Send to `receivers` processes on one port; the seconds, and the instances each stored."""
    (port,) = free_ports(1)
    folder.mkdir(parents=True)
    data = folder / "data"
    config = write_toml(folder / "receiver.toml", {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "data_dir": str(data), "fsync": True,
                 "reuse_port": True},
        "security": {"allow_any_caller": True},
        "queue": {"url": database_url},
        "workers": {"count": 0},
        "study": {"stable_seconds": 3600},  # nothing is scheduled while the senders send
        "retention": {"enabled": False},
    })
    with ExitStack() as stack:
        nodes = []
        for index in range(receivers):
            node = NodeProcess(config, folder / f"receiver-{index + 1}.log")
            stack.callback(node.stop)
            nodes.append(node)
        for node in nodes:
            node.wait_ready()
        seconds = send_together(port, NODE_AE, batches)
        shares = tuple(len(node.events("instance_stored")) for node in nodes)
        for node in nodes:
            if node.stop() != 0:
                raise RuntimeError(f"{node.name} did not exit 0 on SIGTERM: {node.log_tail()}")
    expected = sum(map(len, batches))
    if _count_files(data / "instances") != expected:
        raise RuntimeError(f"the receivers stored {_count_files(data / 'instances')} of {expected} files")
    return seconds, shares


def run(files: list[Path], *, senders: int, repeat: int, work: Path, json_path: Path | None) -> int:
    from dicom_node.bench.postgres import PostgresServer, postgres_bin_dir

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        print("bench_ingest: --senders needs the PostgreSQL server (Debian: postgresql)")
        return 2
    per_sender = len(files) // senders
    batches = [files[i * per_sender:(i + 1) * per_sender] for i in range(senders)]
    megabytes = sum(p.stat().st_size for batch in batches for p in batch) / 1e6
    instances = sum(map(len, batches))
    print(f"{senders} senders at once, {per_sender} images each ({instances} images, {megabytes:.1f} MB per run), "
          f"one association each; receivers: {', '.join(RECEIVERS)} (workers.count = 0, node.reuse_port, "
          f"PostgreSQL job table, fsync on); {os.cpu_count()} CPUs", flush=True)
    runs: list[ConcurrentRun] = []
    with ExitStack() as stack:
        server = PostgresServer(bin_dir)
        stack.callback(server.stop)
        server.start()
        for repetition in range(1, repeat + 1):
            for receiver in RECEIVERS:
                folder = work / f"{receiver.replace(' ', '_')}-{repetition}"
                try:
                    if receiver.startswith("storescp"):
                        seconds, shares = run_storescp(batches, folder)
                    else:
                        database = server.create_database()
                        seconds, shares = run_receivers(batches, folder, receivers=int(receiver[-1]),
                                                database_url=server.url(database))
                        server.drop_database(database)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                result = ConcurrentRun(receiver, repetition, senders, instances, megabytes, seconds, shares)
                runs.append(result)
                print(f"run {repetition} {receiver:>16}: {seconds:7.3f} s {result.mb_per_second:8.1f} MB/s "
                      f"{result.instances_per_second:7.1f} instances/s"
                      + (f" (per receiver: {'+'.join(map(str, shares))})" if len(shares) > 1 else ""), flush=True)
    summary = {
        receiver: {
            "mb_per_second": round(statistics.median(r.mb_per_second for r in runs if r.receiver == receiver), 2),
            "instances_per_second": round(
                statistics.median(r.instances_per_second for r in runs if r.receiver == receiver), 2),
        }
        for receiver in RECEIVERS
    }
    print(f"median over {repeat} round(s), {senders} senders:")
    for receiver, figures in summary.items():
        print(f"  {receiver:>16}: {figures['mb_per_second']:8.1f} MB/s {figures['instances_per_second']:7.1f} "
              f"instances/s")
    one, two = summary["dicom-node x1"]["mb_per_second"], summary["dicom-node x2"]["mb_per_second"]
    print(f"  2 receivers / 1 receiver: {two / one:.2f}x; 1 receiver / storescp: "
          f"{one / summary['storescp --fork']['mb_per_second']:.2f}x")
    if json_path:
        document = {"senders": senders, "images_per_sender": per_sender, "megabytes_per_run": round(megabytes, 3),
                    "runs": [{**asdict(r), "mb_per_second": round(r.mb_per_second, 2),
                              "instances_per_second": round(r.instances_per_second, 2)} for r in runs],
                    "median": summary}
        json_path.write_text(json.dumps(document, indent=1) + "\n")
    return 0

