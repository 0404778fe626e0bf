"""Fuzzing the Storage SCP of a real `dicom-node serve` with malformed PDUs and datasets.

A seeded mutator (tests/receive/fuzz_pdus.py) sends 1500 hostile inputs over raw
sockets: truncated and unknown PDUs, wrong and huge lengths, bogus
A-ASSOCIATE-RQ items, garbage after a valid association, and, through valid
associations, truncated datasets, wrong element lengths, huge declared lengths,
deep sequences, a transfer syntax that does not match the bytes, C-STOREs cut off
by an abort, and patient data in odd places (private tags, nested sequences, a
"UID" that contains the patient's name).

The node must: answer with a failure status, a rejection or an abort, and never die
(it still answers C-ECHO and stores a good image afterwards); store nothing that does
not parse with its UIDs (dcmtk's dcmdump and pydicom both read every stored file);
leave no file in tmp/ or the system temp dir; drop a peer that stalls mid-PDU within
node.network_timeout_seconds; keep its memory bounded; never log patient data.

What the fuzzer found is pinned down by the fast regression tests at the end, which
run against the in-process SCP.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom.status import Status

from dicom_node.config import load_config
from dicom_node.queue.ops import Queue
from tests import synthetic
from tests.integration.node_process import NodeProcess, write_config
from tests.integration.process import temp_files_left, wait_for
from tests.receive import fuzz_pdus as raw
from tests.receive.helpers import NODE_AE, association

# Seeded, so a failure replays exactly; FUZZ_SEED / FUZZ_CASES explore further locally.
SEED = int(os.environ.get("FUZZ_SEED", 20261126))
CASES = int(os.environ.get("FUZZ_CASES", 1500))
NETWORK_TIMEOUT_SECONDS = 2.0
# What a client waits for an answer; the node answers at once or after its own timeouts.
READ_TIMEOUT_SECONDS = NETWORK_TIMEOUT_SECONDS + 3
RSS_GROWTH_LIMIT_BYTES = 64 * 1024 * 1024
STALLING_PEERS = 6
MG = DigitalMammographyXRayImageStorageForPresentation
CONTEXTS = [(1, MG, [ExplicitVRLittleEndian]), (3, MG, [ImplicitVRLittleEndian]), (5, MG, [JPEG2000Lossless]),
            (7, "1.2.840.10008.1.1", [ImplicitVRLittleEndian])]
CONTEXT_SYNTAX = {1: ExplicitVRLittleEndian, 3: ImplicitVRLittleEndian, 5: JPEG2000Lossless}
PHI_VALUES = (synthetic.FAKE_PATIENT_NAME, synthetic.FAKE_PATIENT_ID, synthetic.FAKE_ACCESSION,
              synthetic.FAKE_BIRTH_DATE)
SUCCESS = Status.SUCCESS


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def rss_bytes(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


@pytest.fixture
def fuzz_node(tmp_path, monkeypatch):
    """A real `dicom-node serve` with short network timeouts; its system temp dir is watched."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": []}))
    config = write_config(tmp_path / "node.toml", {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data"),
                 "network_timeout_seconds": NETWORK_TIMEOUT_SECONDS, "max_associations": 32},
        "security": {"max_associations_per_caller": 32, "max_connections_per_address": 32},
        "study": {"stable_seconds": 1},
        "workers": {"count": 1, "device": "cpu"},
        "detector": {"architecture": "fixed_boxes", "weights": str(boxes)},
    })
    node = NodeProcess(config).start()
    node.data_dir = tmp_path / "data"
    node.system_tmp = system_tmp
    node.database_url = load_config(config).database_url
    try:
        yield node
    finally:
        try:
            status = node.stop()
        finally:
            print(f"--- node log ({len(node.lines)} lines)\n{node.output()}")
        assert status == 0, "dicom-node did not exit 0 on SIGTERM"


# --------------------------------------------------------------------------- datasets


def small_mammogram(**kwargs) -> Dataset:
    """A 32 x 24 MG image with the fake patient identifiers (a few kB on the wire)."""
    ds = synthetic.mammogram(rows=32, columns=24, **kwargs)
    del ds.file_meta
    return ds


def with_deep_sequence(data: bytes, depth: int, *, implicit: bool) -> bytes:
    """Insert, before Pixel Data, a Content Sequence nested `depth` levels deep (undefined
    lengths, PS3.5 7.5.2), with the patient's name at the bottom.

    Built as bytes: pydicom itself cannot encode, or even print, a dataset this deep.
    """
    sq = b"\x40\x00\x30\xa7" + (b"" if implicit else b"SQ\x00\x00") + b"\xff\xff\xff\xff"
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end, sequence_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    name = synthetic.FAKE_PATIENT_NAME.encode()
    name_element = b"\x10\x00\x10\x00" + (len(name).to_bytes(4, "little") if implicit
                                          else b"PN" + len(name).to_bytes(2, "little")) + name
    nested = (sq + item_start) * depth + name_element + (item_end + sequence_end) * depth
    at = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data: the last element
    return data[:at] + nested + data[at:]


def with_phi_in_odd_places() -> Dataset:
    """Valid, storable: patient data in a private tag and in a nested sequence."""
    ds = small_mammogram()
    block = ds.private_block(0x0011, "FUZZ TEST", create=True)
    block.add_new(0x01, "LO", synthetic.FAKE_PATIENT_NAME)
    block.add_new(0x02, "LO", synthetic.FAKE_ACCESSION)
    other = Dataset()
    other.PatientID = synthetic.FAKE_PATIENT_ID
    other.IssuerOfPatientID = synthetic.FAKE_PATIENT_NAME
    ds.OtherPatientIDsSequence = Sequence([other])
    return ds


def phi_in_uid(keyword: str) -> Dataset:
    """A "UID" that holds the patient's name (and is thus no UID): must be refused."""
    ds = small_mammogram()
    delattr(ds, keyword)  # an element keeps the validation mode it was made with
    with pydicom.config.disable_value_validation():  # pydicom would warn here, quoting it
        setattr(ds, keyword, f"1.2.840.{synthetic.FAKE_PATIENT_NAME}")
    return ds


def set_element_length(data: bytes, tag: tuple[int, int], length: int, *, implicit: bool) -> bytes:
    """Rewrite the declared length of the first `tag` element in an encoded dataset."""
    marker = int.to_bytes(tag[0], 2, "little") + int.to_bytes(tag[1], 2, "little")
    at = data.index(marker)
    if implicit:
        return data[: at + 4] + length.to_bytes(4, "little") + data[at + 8 :]
    vr = data[at + 4 : at + 6]
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
        return data[: at + 8] + length.to_bytes(4, "little") + data[at + 12 :]
    return data[: at + 6] + min(length, 0xFFFF).to_bytes(2, "little") + data[at + 8 :]


# --------------------------------------------------------------------------- the cases


class Fuzzer:
    """Runs cases against the node and keeps count of what it answered."""

    def __init__(self, port: int, rng: random.Random):
        self.port = port
        self.rng = rng
        self.outcomes: Counter[str] = Counter()
        self.stored: list[str] = []  # SOP Instance UIDs the node acknowledged
        self.message_id = 0

    def connect(self) -> raw.RawClient:
        return raw.RawClient(self.port, timeout=READ_TIMEOUT_SECONDS)

    def associate(self, client: raw.RawClient) -> None:
        client.send(raw.associate_rq(called=NODE_AE, calling="FUZZER", contexts=CONTEXTS))
        reply = client.read_reply()
        assert reply.pdu_types == [raw.ASSOCIATE_AC], f"a valid A-ASSOCIATE-RQ got {reply}"

    def send_and_hang_up(self, data: bytes, *, associate: bool = False) -> raw.Reply:
        """Send `data`, half-close (the node sees the end of the stream) and read what comes back."""
        client = self.connect()
        try:
            if associate:
                self.associate(client)
            client.send(data)
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return client.read_reply(until=())
        finally:
            client.close()

    def store(self, dataset_bytes: bytes, *, context_id: int, sop_instance_uid: str,
              sop_class_uid: str = MG, fragments: int = 1) -> int | None:
        """One C-STORE with the given (maybe broken) dataset bytes; returns the status."""
        client = self.connect()
        try:
            self.associate(client)
            self.message_id += 1
            command = raw.c_store_rq(message_id=self.message_id, sop_class_uid=sop_class_uid,
                                     sop_instance_uid=sop_instance_uid)
            client.send(raw.p_data([(context_id, raw.COMMAND_LAST, command)]))
            size = max(1, -(-len(dataset_bytes) // fragments))
            chunks = [dataset_bytes[i : i + size] for i in range(0, len(dataset_bytes), size)] or [b""]
            for index, chunk in enumerate(chunks):
                control = raw.DATASET_LAST if index == len(chunks) - 1 else raw.DATASET_FRAGMENT
                client.send(raw.p_data([(context_id, control, chunk)]))
            reply = client.read_reply()
            if reply.status is not None and not reply.closed:
                client.send(raw.release_rq())
                client.read_reply()
            return reply.status
        finally:
            client.close()

    def store_and_abort(self, dataset_bytes: bytes, *, context_id: int, sop_instance_uid: str,
                        hang_up: bool) -> None:
        """Send part of a C-STORE's dataset, then A-ABORT or just close: nothing may remain."""
        client = self.connect()
        try:
            self.associate(client)
            self.message_id += 1
            command = raw.c_store_rq(message_id=self.message_id, sop_class_uid=MG, sop_instance_uid=sop_instance_uid)
            client.send(raw.p_data([(context_id, raw.COMMAND_LAST, command)]))
            cut = self.rng.randrange(len(dataset_bytes))
            client.send(raw.p_data([(context_id, raw.DATASET_FRAGMENT, dataset_bytes[:cut])]))
            if not hang_up:
                client.send(raw.abort_pdu())
        finally:
            client.close()

    # -- case kinds ----------------------------------------------------------------------

    def random_context(self) -> int:
        return self.rng.choice([1, 3])

    def encoded(self, ds: Dataset, context_id: int) -> bytes:
        return raw.encode(ds, implicit=CONTEXT_SYNTAX[context_id] == ImplicitVRLittleEndian)

    def case_associate_rq_mutant(self) -> str:
        rq = raw.associate_rq(called=NODE_AE, calling="FUZZER", contexts=CONTEXTS)
        self.send_and_hang_up(raw.mutate(rq, self.rng))
        return "associate_rq_mutant"

    def case_bogus_associate_items(self) -> str:
        rng = self.rng
        choice = rng.randrange(6)
        contexts = CONTEXTS
        extra = b""
        user_info = None
        if choice == 0:  # unknown item types and sub-items
            extra = raw.item(rng.choice([0x00, 0x11, 0x21, 0x55, 0x99, 0xFF]), rng.randbytes(rng.randint(0, 40)))
        elif choice == 1:  # an item whose declared length runs past the PDU
            extra = raw.item(0x20, rng.randbytes(8), length=rng.choice([0xFFFF, 9, 100]))
        elif choice == 2:  # maximum PDU length 0, 1 or 2**32 - 1
            user_info = raw.item(0x50, raw.item(0x51, rng.choice([0, 1, 0xFFFFFFFF]).to_bytes(4, "big")))
        elif choice == 3:  # 200 presentation contexts, odd and even ids, garbage syntaxes
            contexts = [(i % 256, MG if i % 3 else "1.2.3.garbage", ["1.2.840.10008.1.2.1", "\x00\xff"])
                        for i in range(1, 400, 2)]
        elif choice == 4:  # no user information, or it is empty
            user_info = rng.choice([b"", raw.item(0x50, b"")])
        else:  # sub-items of the wrong kind inside a presentation context
            extra = raw.item(0x20, bytes([9, 0, 0, 0]) + raw.item(0x40, b"1.2") + raw.item(0x30, b""))
        rq = raw.associate_rq(called=NODE_AE, calling="FUZZER", contexts=contexts, user_info=user_info,
                              extra_items=extra)
        reply = self.send_and_hang_up(rq)
        return f"bogus_items:{reply.pdu_types[:1]}"

    def case_garbage(self) -> str:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:
            data = rng.randbytes(rng.randint(0, 3000))
        elif choice == 1:  # unknown PDU type
            body = rng.randbytes(rng.randint(0, 200))
            data = raw.pdu(rng.choice([0, 8, 9, 0x10, 0x80, 0xFF]), body)
        elif choice == 2:  # huge declared length, some bytes, then the end
            data = raw.pdu(rng.choice([1, 4, 7]), rng.randbytes(rng.randint(0, 1 << 16)),
                           length=rng.choice([0x7FFFFFFF, 0xFFFFFFFF, 1 << 28]))
        else:  # a truncated PDU
            data = raw.associate_rq(called=NODE_AE, calling="FUZZER", contexts=CONTEXTS)
            data = data[: rng.randrange(len(data))]
        self.send_and_hang_up(data, associate=False)
        return "garbage"

    def case_garbage_after_association(self) -> str:
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0:
            data = rng.randbytes(rng.randint(1, 2000))
        elif choice == 1:  # a P-DATA-TF with a mutated PDV framing
            command = raw.c_echo_rq(message_id=1)
            data = raw.mutate(raw.p_data([(7, raw.COMMAND_LAST, command)]), rng)
        elif choice == 2:  # a mutated command set
            command = raw.c_store_rq(message_id=1, sop_class_uid=MG, sop_instance_uid=generate_uid())
            data = raw.p_data([(rng.choice([1, 3, 7, 9, 255]), raw.COMMAND_LAST, raw.mutate(command, rng))])
        elif choice == 3:  # a second A-ASSOCIATE-RQ, an A-ASSOCIATE-AC, an unknown PDU type
            data = rng.choice([raw.associate_rq(called=NODE_AE, calling="FUZZER", contexts=CONTEXTS),
                               raw.pdu(raw.ASSOCIATE_AC, rng.randbytes(80)), raw.pdu(0x42, b"")])
        else:  # a data set fragment before any command
            data = raw.p_data([(1, raw.DATASET_LAST, rng.randbytes(rng.randint(0, 500)))])
        self.send_and_hang_up(data, associate=True)
        return "after_association"

    def case_dataset_mutant(self) -> str:
        context_id = self.random_context()
        ds = small_mammogram(seed=self.rng.randrange(1 << 16))
        data = raw.mutate(self.encoded(ds, context_id), self.rng)
        status = self.store(data, context_id=context_id, sop_instance_uid=ds.SOPInstanceUID,
                            fragments=self.rng.choice([1, 1, 2, 5]))
        if status == SUCCESS:
            self.stored.append(ds.SOPInstanceUID)
        return f"dataset_mutant:{'success' if status == SUCCESS else 'refused'}"

    def case_dataset_malformed(self) -> str:
        """Targeted malformations: each must be refused (or the association aborted)."""
        rng = self.rng
        context_id = self.random_context()
        implicit = context_id == 3
        ds = small_mammogram(seed=rng.randrange(1 << 16))
        data = self.encoded(ds, context_id)
        choice = rng.randrange(8)
        if choice == 0:  # truncated inside the identifying elements
            data = data[: data.index(b"\x08\x00\x18\x00") + rng.randint(1, 20)]
        elif choice == 1:  # SOP Instance UID declared longer than the data set
            data = set_element_length(data, (0x0008, 0x0018), rng.choice([0xFFFE, 0xFFFFFFF0, len(data) + 2]),
                                      implicit=implicit)
        elif choice == 2:  # a wrong (odd, too long) length on an element before the UIDs
            data = set_element_length(data, (0x0008, 0x0016), rng.choice([3, 200, 0xFFFF]), implicit=implicit)
        elif choice == 3:  # the other syntax's bytes: context says explicit, bytes are implicit (or back)
            data = raw.encode(ds, implicit=not implicit)
        elif choice == 4:  # a UID with the patient's name in it
            ds = phi_in_uid(rng.choice(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]))
            data = self.encoded(ds, context_id)
        elif choice == 5:  # sequences nested far too deep
            data = with_deep_sequence(data, rng.choice([300, 3000, 30000]), implicit=implicit)
        elif choice == 6:  # undefined length on an element that cannot have one, no delimiter
            data = set_element_length(data, (0x0008, 0x0060), 0xFFFFFFFF, implicit=True)
        else:  # not MG: the modality holds an accession number
            ds.Modality = synthetic.FAKE_ACCESSION
            data = self.encoded(ds, context_id)
        status = self.store(data, context_id=context_id, sop_instance_uid=ds.SOPInstanceUID)
        assert status != SUCCESS, f"malformed data set (kind {choice}) was acknowledged"
        return f"malformed_{choice}"

    def case_phi_in_command(self) -> str:
        """The C-STORE request's own Affected SOP Instance UID carries the patient's name."""
        ds = small_mammogram()
        context_id = self.random_context()
        status = self.store(self.encoded(ds, context_id), context_id=context_id,
                            sop_instance_uid=f"1.2.{synthetic.FAKE_PATIENT_ID}")
        assert status != SUCCESS
        return "phi_in_command"

    def case_phi_in_odd_places(self) -> str:
        """Storable: patient data in a private tag and a nested sequence (never logged)."""
        ds = with_phi_in_odd_places()
        context_id = self.random_context()
        status = self.store(self.encoded(ds, context_id), context_id=context_id, sop_instance_uid=ds.SOPInstanceUID)
        assert status == SUCCESS, f"a valid data set with a private tag got status {status}"
        self.stored.append(ds.SOPInstanceUID)
        return "phi_in_odd_places"

    def case_wrong_syntax_context(self) -> str:
        """Uncompressed pixels on the JPEG 2000 context: the bytes are not what was negotiated."""
        ds = small_mammogram()
        status = self.store(raw.encode(ds, implicit=False), context_id=5, sop_instance_uid=ds.SOPInstanceUID)
        assert status != SUCCESS, "native pixel data on a JPEG 2000 context was acknowledged"
        return "native_on_jpeg2000"

    def case_cut_off_store(self) -> str:
        ds = small_mammogram()
        context_id = self.random_context()
        self.store_and_abort(self.encoded(ds, context_id), context_id=context_id,
                             sop_instance_uid=ds.SOPInstanceUID, hang_up=self.rng.random() < 0.5)
        return "cut_off_store"


@pytest.mark.integration
def test_fuzzed_pdus_and_datasets_never_crash_leak_or_store_garbage(fuzz_node):
    node = fuzz_node
    pid = node.process.pid
    baseline_threads = thread_count(pid)  # no association yet
    rng = random.Random(SEED)
    fuzzer = Fuzzer(node.port, rng)
    # Warm up (first association, first store, lazy imports), then take the memory baseline.
    ds = small_mammogram()
    assert fuzzer.store(raw.encode(ds, implicit=False), context_id=1, sop_instance_uid=ds.SOPInstanceUID) == SUCCESS
    fuzzer.stored.append(ds.SOPInstanceUID)
    baseline_rss = rss_bytes(pid)

    # Peers that stall in the middle of a PDU: each holds an association thread until
    # node.network_timeout_seconds, then the node must drop it.
    stalled = []
    for index in range(STALLING_PEERS):
        client = fuzzer.connect()
        rq = raw.associate_rq(called=NODE_AE, calling="FUZZER", contexts=CONTEXTS)
        if index % 2:
            fuzzer.associate(client)
            rq = raw.p_data([(1, raw.COMMAND_LAST, raw.c_echo_rq(message_id=1))])
        client.send(rq[: len(rq) // 2])
        stalled.append(client)

    kinds: list[tuple[Callable[[], str], int]] = [
        (fuzzer.case_associate_rq_mutant, 25), (fuzzer.case_bogus_associate_items, 8), (fuzzer.case_garbage, 12),
        (fuzzer.case_garbage_after_association, 15), (fuzzer.case_dataset_mutant, 20),
        (fuzzer.case_dataset_malformed, 12), (fuzzer.case_phi_in_command, 2), (fuzzer.case_phi_in_odd_places, 2),
        (fuzzer.case_wrong_syntax_context, 2), (fuzzer.case_cut_off_store, 4),
    ]
    cases, weights = zip(*kinds, strict=True)
    started = time.monotonic()
    for index in range(CASES):
        case = rng.choices(cases, weights)[0]
        fuzzer.outcomes[case()] += 1
        if index % 100 == 0:
            assert node.process.poll() is None, f"the node died at case {index}"
    fuzz_seconds = time.monotonic() - started

    for client in stalled:  # the node hung up on every stalling peer
        assert client.read_reply(until=()).closed
        client.close()
    # Every association thread ends; nothing is left half-written.
    wait_for(lambda: thread_count(pid) <= baseline_threads, 3 * READ_TIMEOUT_SECONDS,
             description=f"the node's threads to return to {baseline_threads}")
    rss_growth = rss_bytes(pid) - baseline_rss
    # tmp/ is also where the worker writes its results before renaming them: wait for it.
    wait_for(lambda: not temp_files_left(node.data_dir), 30, description="no temp file left under tmp/")
    assert list(node.system_tmp.glob("*.dcm")) == []  # spool files go to data_dir/tmp

    # Still alive and serving: C-ECHO, and a good image is stored.
    with association(node.port, [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established and assoc.send_c_echo().Status == SUCCESS
    ds = small_mammogram()
    assert fuzzer.store(raw.encode(ds, implicit=True), context_id=3, sop_instance_uid=ds.SOPInstanceUID) == SUCCESS
    fuzzer.stored.append(ds.SOPInstanceUID)

    # What is stored is what was acknowledged, and all of it parses (dcmtk and pydicom).
    queue = Queue(node.database_url)
    files = sorted((node.data_dir / "instances").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert {f.stem for f in files} == set(fuzzer.stored)
    # dcmdump reads each whole file (an independent parser) and prints one tag of it.
    dump = subprocess.run(["dcmdump", "-q", "+P", "0008,0018", *map(str, files)], capture_output=True,
                          text=True, errors="replace", timeout=120)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr[-3000:]
    for path in files:
        stored = pydicom.dcmread(path)
        for element in stored.iterall():
            element.value  # noqa: B018 - every value, nested ones too, is read and converted
        assert path.parts[-3:] == (stored.StudyInstanceUID, stored.SeriesInstanceUID, f"{stored.SOPInstanceUID}.dcm")
        assert [i.path for i in queue.study_instances(stored.StudyInstanceUID)
                if i.sop_instance_uid == stored.SOPInstanceUID] == [str(path)]

    log = node.output()
    for value in PHI_VALUES:
        assert value not in log, f"PHI value {value!r} reached the node's log"
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    print(f"fuzz: {CASES} cases in {fuzz_seconds:.1f} s (+{STALLING_PEERS} stalling peers), "
          f"{len(fuzzer.stored)} instances stored, RSS {baseline_rss / 2**20:.0f} MiB -> "
          f"{(baseline_rss + rss_growth) / 2**20:.0f} MiB (limit +{RSS_GROWTH_LIMIT_BYTES / 2**20:.0f} MiB), "
          f"threads {baseline_threads}; outcomes {dict(sorted(fuzzer.outcomes.items()))}")
    assert rss_growth < RSS_GROWTH_LIMIT_BYTES


# --------------------------------------------------------------------------- regressions
# Each of these was found by the fuzzer above; they run against the in-process SCP
# (tests/receive/conftest.py) and take a second or two each.


def test_peer_stalling_mid_pdu_is_dropped_after_the_network_timeout(make_node):
    node = make_node(node={"network_timeout_seconds": 1})
    client = raw.RawClient(node.port, timeout=30)
    rq = raw.associate_rq(called=NODE_AE, calling="STALLER", contexts=CONTEXTS)
    client.send(rq[: len(rq) // 2])  # the header announces more than ever comes
    started = time.monotonic()
    reply = client.read_reply(until=())
    client.close()
    assert reply.closed and time.monotonic() - started < 10  # not held until the client gives up


def test_connections_that_never_associate_do_not_use_up_association_slots(make_node):
    """pynetdicom keeps such a connection's thread for the ACSE timeout (here 30 s)."""
    node = make_node(node={"max_associations": 1, "network_timeout_seconds": 30})
    for data in (b"GET / HTTP/1.0\r\n\r\n", b"", raw.pdu(0x42, b"x")):  # probes, scans, garbage
        client = raw.RawClient(node.port, timeout=5)
        client.send(data)
        client.close()

    # Gone once their connections are (well before the 30 s), not holding the one slot.
    # Retried: the server may take a probe's connection from its backlog only now, and
    # that thread holds the slot for a moment (the same ending as the others).
    def echo_in_the_one_slot() -> bool:
        with association(node.port, [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])]) as assoc:
            return assoc.is_established and assoc.send_c_echo().Status == SUCCESS

    wait_for(echo_in_the_one_slot, 10, description="an association in the one slot")
    wait_for(lambda: not node.server.active_associations, 10, description="the probes' threads to end")


def _encoded(ds: Dataset, *, implicit: bool = False) -> bytes:
    return raw.encode(ds, implicit=implicit)


MALFORMED = {
    "truncated": (lambda ds: _encoded(ds)[:-100], 1),
    "implicit bytes on an explicit context": (lambda ds: _encoded(ds, implicit=True), 1),
    "explicit bytes on an implicit context": (lambda ds: _encoded(ds), 3),
    "SOP Instance UID length past the end": (
        lambda ds: set_element_length(_encoded(ds), (0x0008, 0x0018), 0xFFFE, implicit=False), 1),
    "undefined length on a non-sequence": (
        lambda ds: set_element_length(_encoded(ds, implicit=True), (0x0008, 0x0060), 0xFFFFFFFF, implicit=True), 3),
    "sequences nested 33 deep": (lambda ds: with_deep_sequence(_encoded(ds), 33, implicit=False), 1),
    "sequence without its delimiter": (
        lambda ds: with_deep_sequence(_encoded(ds), 2, implicit=False).replace(b"\xfe\xff\xdd\xe0", b"\x10\x00\x20\x00", 1), 1),
    "native pixel data on a JPEG 2000 context": (lambda ds: _encoded(ds), 5),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_data_sets_are_refused_and_nothing_is_stored(node, kind):
    build, context_id = MALFORMED[kind]
    ds = small_mammogram()
    fuzzer = Fuzzer(node.port, random.Random(0))
    assert fuzzer.store(build(ds), context_id=context_id, sop_instance_uid=ds.SOPInstanceUID) == 0xC000
    assert list((node.data_dir / "instances").rglob("*.dcm")) == []
    assert node.queue.study_instances(ds.StudyInstanceUID) == []


def test_sequences_nested_32_deep_are_stored(node):
    ds = small_mammogram()
    data = with_deep_sequence(_encoded(ds), 32, implicit=False)
    assert Fuzzer(node.port, random.Random(0)).store(data, context_id=1, sop_instance_uid=ds.SOPInstanceUID) == SUCCESS


@pytest.mark.parametrize("ending", ["abort", "hang up", "release"])
def test_a_data_set_cut_off_leaves_no_spool_file(node, ending):
    spool_dir = node.store.tmp_dir  # where each C-STORE's data set is spooled
    ds = small_mammogram()
    data = _encoded(ds)
    client = raw.RawClient(node.port, timeout=10)
    Fuzzer(node.port, random.Random(0)).associate(client)
    client.send(raw.p_data([(1, raw.COMMAND_LAST, raw.c_store_rq(
        message_id=1, sop_class_uid=MG, sop_instance_uid=ds.SOPInstanceUID))]))
    client.send(raw.p_data([(1, raw.DATASET_FRAGMENT, data[: len(data) // 2])]))
    wait_for(lambda: list(spool_dir.glob("*.dcm")), 10, description="the data set being spooled")
    if ending != "hang up":
        client.send(raw.abort_pdu() if ending == "abort" else raw.release_rq())
        client.read_reply()
    client.close()
    wait_for(lambda: not node.server.active_associations, 10, description="the association to end")
    assert list(spool_dir.glob("*.dcm")) == []


def test_patient_data_in_odd_places_never_reaches_the_log(node, log_output):
    fuzzer = Fuzzer(node.port, random.Random(0))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID"):  # a "UID" holding the patient's name
        ds = phi_in_uid(keyword)
        status = fuzzer.store(_encoded(ds), context_id=1, sop_instance_uid=ds.SOPInstanceUID)
        assert status == 0xC000
    ds = small_mammogram()  # the request's own Affected SOP Instance UID holds a patient ID
    assert fuzzer.store(_encoded(ds), context_id=1, sop_instance_uid=f"1.2.{synthetic.FAKE_PATIENT_ID}") != SUCCESS
    ds = small_mammogram()
    ds.Modality = synthetic.FAKE_ACCESSION  # not MG, and the refusal must not quote it
    assert fuzzer.store(_encoded(ds), context_id=1, sop_instance_uid=ds.SOPInstanceUID) == 0x0122
    ds = with_phi_in_odd_places()  # valid: stored, and nothing of it logged
    assert fuzzer.store(_encoded(ds), context_id=1, sop_instance_uid=ds.SOPInstanceUID) == SUCCESS
    log = log_output()
    assert "instance_refused" in log and "instance_stored" in log
    for value in PHI_VALUES:
        assert value not in log, f"PHI value {value!r} reached the log"


def test_peers_are_told_a_bounded_maximum_pdu_length(node):
    """pynetdicom holds each received PDU in memory, several times over: PS3.8 D.1 lets the
    node say how large a PDU may be (unlimited, one 128 MiB image cost 513 MiB of memory)."""
    with association(node.port, [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established
        assert 0 < assoc.acceptor.maximum_length <= 1024 * 1024


def test_a_command_without_command_field_ends_the_association_without_a_traceback(node, log_output, monkeypatch):
    """pynetdicom raises AttributeError in its DUL thread on such a command; the node logs
    the error's type and hangs up instead of letting the thread die with a traceback."""
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    client = raw.RawClient(node.port, timeout=10)
    Fuzzer(node.port, random.Random(0)).associate(client)
    command = raw.command_set(AffectedSOPClassUID="1.2.840.10008.1.1", MessageID=1, CommandDataSetType=0x0101)
    client.send(raw.p_data([(1, raw.COMMAND_LAST, command)]))
    assert client.read_reply(until=()).closed
    client.close()
    wait_for(lambda: not node.server.active_associations, 10, description="the association to end")
    assert uncaught == []
    events = [json.loads(line) for line in log_output().splitlines() if line.startswith("{")]
    assert [e["error"] for e in events if e["event"] == "association_protocol_error"] == ["AttributeError"]
    with association(node.port, [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established and assoc.send_c_echo().Status == SUCCESS
