"""Attacks on a running node's Storage SCP, and what they cost it: memory, slots, time.

Each attack is sent from raw sockets (dicom_node.bench.pdus), as a hostile peer would:

- ``claimed_associate_rq``: an A-ASSOCIATE-RQ whose header claims 400 MiB, then the bytes;
- ``command_fragments``: inside an accepted association, 256 MiB of command fragments
  that never end (no "last fragment" bit);
- ``deflate_bomb``: a C-STORE on a Deflated Explicit VR context whose ~0.5 MB of deflate
  stream inflates to 500 MiB of zeros;
- ``silent_connections``: 50 TCP connections that never send anything, from 50 loopback
  addresses, then the time a configured PACS waits to associate and get a C-ECHO answer;
- ``slow_drip``: an association that sends one tiny PDU every few seconds;
- ``new_proposals``: 300 associations, each proposing 128 presentation contexts never
  proposed before (about 45 KiB of A-ASSOCIATE-RQ each, 45 times what the node keeps of
  a proposal; see dicom_node.receive.proposals), then released.

While an attack runs, the node's resident memory (VmRSS of its main process, the SCP) is
sampled every few milliseconds; the growth is the peak minus the value just before.

    python -m dicom_node.bench.hostile             # starts its own `dicom-node serve`

The tests in tests/receive/test_hostile.py run the same attacks against a running node
and assert the bounds; this prints the figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.bench import pdus

MIB = 1024 * 1024
MG = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
CONTEXTS = [(1, MG, [EXPLICIT_LITTLE]), (3, MG, [DEFLATED]), (5, VERIFICATION, [IMPLICIT_LITTLE])]
CHUNK = MIB


def rss_bytes(pid: int) -> int:
    """The process's resident set size now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class PeakRss:
    """Samples a process's VmRSS in a thread while in the ``with`` block; ``growth`` after."""

    def __init__(self, pid: int, interval: float = 0.002):
        self.pid, self.interval = pid, interval
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)  # the node may still be releasing (or allocating) after the last byte
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before


@dataclass
class Outcome:
    """What an attack achieved against the node."""

    attack: str
    sent_bytes: int = 0
    closed_by_node: bool = False  # the node ended the connection before the attack was done
    status: int | None = None  # a DIMSE status, when one came back
    seconds: float = 0.0
    rss_growth: int | None = None
    details: dict = field(default_factory=dict)


def _associate(client: pdus.RawClient, *, called: str, calling: str) -> None:
    client.send(pdus.associate_rq(called=called, calling=calling, contexts=CONTEXTS))
    reply = client.read_reply()
    if reply.pdu_types != [pdus.ASSOCIATE_AC]:
        raise RuntimeError(f"the node did not accept the association: {reply}")


def _flood(client: pdus.RawClient, piece: bytes, total: int) -> tuple[int, bool]:
    """Send `piece` until `total` bytes are sent or the node closes, then see whether the
    node hung up; (bytes sent, closed by node)."""
    sent = 0
    while sent < total:
        chunk = piece[: total - sent]
        if not client.send(chunk):
            return sent, True
        sent += len(chunk)
    return sent, _closed_after(client)


def _closed_after(client: pdus.RawClient) -> bool:
    """True if the node has closed (or aborted) the connection by now."""
    reply = client.read_reply(until=(pdus.ABORT,))
    return reply.closed or pdus.ABORT in reply.pdu_types


def claimed_associate_rq(port: int, *, claimed: int = 400 * MIB, called: str = "DICOM_NODE") -> Outcome:
    """A-ASSOCIATE-RQ header claiming `claimed` bytes, then that many bytes of zeros."""
    outcome = Outcome("claimed A-ASSOCIATE-RQ")
    client = pdus.RawClient(port, timeout=10)
    start = time.monotonic()
    try:
        client.send(struct.pack(">BBL", pdus.ASSOCIATE_RQ, 0, claimed))
        outcome.sent_bytes, outcome.closed_by_node = _flood(client, bytes(CHUNK), claimed)
    finally:
        client.close()
    outcome.seconds = time.monotonic() - start
    return outcome


def command_fragments(
    port: int, *, total: int = 256 * MIB, fragment: int = 512 * 1024, called: str = "DICOM_NODE",
    calling: str = "HOSTILE",
) -> Outcome:
    """In an accepted association, command fragments (never the last one) adding up to `total`."""
    outcome = Outcome("command fragments")
    client = pdus.RawClient(port, timeout=10)
    start = time.monotonic()
    try:
        _associate(client, called=called, calling=calling)
        pdu = pdus.p_data([(5, pdus.COMMAND_FRAGMENT, bytes(fragment))])
        outcome.sent_bytes, outcome.closed_by_node = _flood(client, pdu, total // fragment * len(pdu))
    finally:
        client.close()
    outcome.seconds = time.monotonic() - start
    return outcome


def deflate_bomb_stream(inflated: int, *, sop_instance_uid: str) -> bytes:
    """A deflated (PS3.5 A.5: raw deflate) Explicit VR Little Endian MG dataset whose Pixel
    Data holds `inflated` bytes of zeros; returns the compressed bytes (about inflated/1000)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = MG
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = sop_instance_uid + ".1"
    ds.SeriesInstanceUID = sop_instance_uid + ".2"
    ds.Modality = "MG"
    ds.Rows, ds.Columns = 16384, max(1, inflated // (2 * 16384))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    head = pdus.encode(ds, implicit=False)
    pixel_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, inflated)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(head + pixel_header)]
    zeros = bytes(CHUNK)
    for _ in range(inflated // CHUNK):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.compress(bytes(inflated % CHUNK)))
    parts.append(compressor.flush())
    return b"".join(parts)


def deflate_bomb(
    port: int, *, inflated: int = 500 * MIB, called: str = "DICOM_NODE", calling: str = "HOSTILE",
) -> Outcome:
    """One C-STORE of a deflate bomb on the Deflated context; the status it gets."""
    uid = f"2.25.{int.from_bytes(os.urandom(12), 'big')}"
    data = deflate_bomb_stream(inflated, sop_instance_uid=uid)
    outcome = Outcome("deflate bomb", details={"compressed_bytes": len(data), "inflated_bytes": inflated})
    client = pdus.RawClient(port, timeout=120)
    start = time.monotonic()
    try:
        _associate(client, called=called, calling=calling)
        command = pdus.c_store_rq(message_id=1, sop_class_uid=MG, sop_instance_uid=uid)
        client.send(pdus.p_data([(3, pdus.COMMAND_LAST, command)]))
        pieces = [data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
        for index, piece in enumerate(pieces):
            control = pdus.DATASET_LAST if index == len(pieces) - 1 else pdus.DATASET_FRAGMENT
            if not client.send(pdus.p_data([(3, control, piece)])):
                outcome.closed_by_node = True
                break
            outcome.sent_bytes += len(piece)
        reply = client.read_reply()
        outcome.status = reply.status
        outcome.closed_by_node = outcome.closed_by_node or reply.closed
        if reply.status is not None and not reply.closed:
            client.send(pdus.release_rq())
            client.read_reply()
    finally:
        client.close()
    outcome.seconds = time.monotonic() - start
    return outcome


def open_silent_connections(port: int, count: int, *, spread_addresses: bool = True) -> list[socket.socket]:
    """`count` TCP connections that send nothing, from 127.0.0.2, .3, ... when `spread_addresses`
    (every 127/8 address is this host's loopback), so a per-address limit does not stop them."""
    connections = []
    for index in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if spread_addresses:
            sock.bind((f"127.0.{index // 250}.{index % 250 + 2}", 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        connections.append(sock)
    return connections


def time_to_echo(port: int, *, called: str = "DICOM_NODE", calling: str = "PACS", timeout: float = 60) -> float:
    """Seconds from connect to a C-ECHO answered, as a configured PACS would see it."""
    start = time.monotonic()
    client = pdus.RawClient(port, timeout=timeout)
    try:
        _associate(client, called=called, calling=calling)
        client.send(pdus.p_data([(5, pdus.COMMAND_LAST, pdus.c_echo_rq(message_id=1))]))
        reply = client.read_reply()
        if reply.status != 0:
            raise RuntimeError(f"C-ECHO got {reply}")
        elapsed = time.monotonic() - start
        client.send(pdus.release_rq())
        client.read_reply()
        return elapsed
    finally:
        client.close()


def silent_connections(port: int, *, count: int = 50, called: str = "DICOM_NODE", calling: str = "PACS") -> Outcome:
    """`count` silent connections stay open while a configured PACS associates and echoes."""
    outcome = Outcome(f"{count} silent connections")
    connections = open_silent_connections(port, count)
    try:
        time.sleep(0.5)  # let the node take every one of them from its backlog
        try:
            outcome.seconds = time_to_echo(port, called=called, calling=calling)
        except (RuntimeError, OSError) as error:  # the attack worked: the PACS was turned away
            outcome.details["pacs_failed"] = str(error)
        outcome.details["silent_still_open"] = sum(1 for sock in connections if _still_open(sock))
    finally:
        for sock in connections:
            sock.close()
    return outcome


def new_proposals(
    port: int, *, count: int = 300, called: str = "DICOM_NODE", calling: str = "HOSTILE"
) -> Outcome:
    """`count` associations proposing 128 contexts each, all never proposed before (made-up
    abstract syntaxes, 12 transfer syntaxes each), released once accepted."""
    outcome = Outcome(f"{count} new proposals")
    start = time.monotonic()
    accepted = 0
    transfer_syntaxes = [f"1.2.826.0.1.3680043.10.1.{number}" for number in range(12)]
    for association in range(count):
        contexts = [(context_id, f"1.2.826.0.1.3680043.10.2.{association}.{context_id}", transfer_syntaxes)
                    for context_id in range(1, 256, 2)]
        request = pdus.associate_rq(called=called, calling=calling, contexts=contexts)
        outcome.sent_bytes += len(request)
        client = pdus.RawClient(port, timeout=10)
        try:
            client.send(request)
            if client.read_reply().pdu_types == [pdus.ASSOCIATE_AC]:
                accepted += 1
                client.send(pdus.release_rq())
                client.read_reply()
        finally:
            client.close()
    outcome.details["accepted"] = accepted
    outcome.seconds = time.monotonic() - start
    return outcome


def _still_open(sock: socket.socket) -> bool:
    """False if the node has closed this connection (a zero-byte read or a reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def slow_drip(
    port: int, *, every: float = 2.0, give_up_after: float = 60.0, called: str = "DICOM_NODE",
    calling: str = "HOSTILE",
) -> Outcome:
    """A C-STORE whose data set arrives one byte every `every` seconds; when does the node hang up?"""
    outcome = Outcome("slow drip")
    client = pdus.RawClient(port, timeout=every)
    start = time.monotonic()
    try:
        _associate(client, called=called, calling=calling)
        command = pdus.c_store_rq(message_id=1, sop_class_uid=MG, sop_instance_uid="2.25.1")
        client.send(pdus.p_data([(1, pdus.COMMAND_LAST, command)]))
        while time.monotonic() - start < give_up_after:
            if not client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, b"\x08")])):
                outcome.closed_by_node = True
                break
            outcome.sent_bytes += 1
            try:
                if client.read_pdu() is None:
                    outcome.closed_by_node = True
                    break
                outcome.closed_by_node = True  # an A-ABORT
                break
            except TimeoutError:
                continue
    finally:
        client.close()
    outcome.seconds = time.monotonic() - start
    return outcome


# --------------------------------------------------------------------------- the benchmark


def _measure(pid: int, attack: Callable[[], Outcome]) -> Outcome:
    with PeakRss(pid) as rss:
        outcome = attack()
    outcome.rss_growth = rss.growth
    return outcome


ATTACKS = {
    "associate_rq": lambda port, called, calling: claimed_associate_rq(port, called=called),
    "command_fragments": lambda port, called, calling: command_fragments(port, called=called, calling=calling),
    "deflate_bomb": lambda port, called, calling: deflate_bomb(port, called=called, calling=calling),
    "silent_connections": lambda port, called, calling: silent_connections(port, called=called, calling=calling),
    "new_proposals": lambda port, called, calling: new_proposals(port, called=called, calling=calling),
}


def _print_header() -> None:
    print(f"{'attack':28} {'sent MiB':>9} {'closed':>7} {'status':>7} {'seconds':>8} {'RSS +MiB':>9}  details")


def _print(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        status = "-" if o.status is None else f"0x{o.status:04X}"
        growth = "-" if o.rss_growth is None else f"{o.rss_growth / MIB:.1f}"
        print(f"{o.attack:28} {o.sent_bytes / MIB:9.1f} {str(o.closed_by_node):>7} {status:>7} "
              f"{o.seconds:8.2f} {growth:>9}  {o.details or ''}")


def main(argv: list[str] | None = None) -> int:
    import json
    import subprocess
    import sys
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--node-log", type=Path, help="write the node's log (JSON lines) to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as folder:
        config = Path(folder) / "node.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = 0\ndata_dir = "{folder}/data"\n'
            '[security]\nallowed_callers = [{ ae_title = "PACS", host = "127.0.0.0/8" }, '
            '{ ae_title = "HOSTILE", host = "127.0.0.0/8" }]\n'
            '[detector]\narchitecture = "retinanet_r18_fpn"\nweights = "demo"\n'
            '[workers]\ncount = 1\ndevice = "cpu"\n'
        )
        node = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            port = None
            for line in node.stderr:
                event = json.loads(line) if line.startswith("{") else {}
                if event.get("event") == "node_ready":
                    port = int(event["port"])
                    break
            if port is None:
                raise SystemExit("the node did not start")
            log = open(args.node_log, "w") if args.node_log else None  # noqa: SIM115 - closed with the node
            threading.Thread(target=lambda: [log and log.write(line) for line in node.stderr], daemon=True).start()
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}: node pid {node.pid}, RSS {rss_bytes(node.pid) / MIB:.0f} MiB")
                _print_header()
                for attack in ATTACKS.values():
                    _print([_measure(node.pid, lambda: attack(port, "DICOM_NODE", "HOSTILE"))])
        finally:
            node.terminate()
            node.wait(120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
