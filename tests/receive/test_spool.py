"""A data set's bytes go from the socket into the file that becomes the instance.

Real SCP, real SQLite, raw PDUs over loopback: however a sender cuts its data set into
PDUs, PDVs and TCP segments, the stored file holds exactly the bytes sent, after our File
Meta; a data set cut off inside a fragment leaves nothing behind. `SpoolFile` on a real
file keeps free space above the watermark and turns a failed write into Out of Resources.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.dsutils import split_dataset

from dicom_node.bench import hostile, pdus
from dicom_node.receive import limits
from dicom_node.receive.spool import (
    OUT_OF_RESOURCES,
    SPACE_CHECK_BYTES,
    SpoolFile,
    StorageLimits,
    part10_header,
)
from dicom_node.store import InstanceStore
from tests import synthetic
from tests.integration.process import temp_files_left, wait_for
from tests.receive.helpers import NODE_AE, stored_files

MIB = 1024 * 1024
CALLING_AE = "RAW_SENDER"


def data_set_bytes(ds) -> bytes:
    return pdus.encode(ds, implicit=False)  # Explicit VR Little Endian, context 1


def c_store_command(ds) -> bytes:
    return pdus.c_store_rq(message_id=1, sop_class_uid=hostile.MG, sop_instance_uid=ds.SOPInstanceUID)


def associated(port: int) -> pdus.RawClient:
    client = pdus.RawClient(port, timeout=30)
    client.send(pdus.associate_rq(called=NODE_AE, calling=CALLING_AE, contexts=hostile.CONTEXTS))
    assert client.read_reply().pdu_types == [pdus.ASSOCIATE_AC]
    return client


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` cut at the given sizes, the rest as one last piece."""
    out, start = [], 0
    for size in sizes:
        out.append(data[start:start + size])
        start += size
    return [*out, data[start:]]


@pytest.fixture
def streamed(monkeypatch):
    """How many fragments went straight from the socket to a spool (a spy on the real path)."""
    counted = {"fragments": 0}
    stream = limits.PduReader.stream

    def counting(reader, *args, **kwargs):
        counted["fragments"] += 1
        return stream(reader, *args, **kwargs)

    monkeypatch.setattr(limits.PduReader, "stream", counting)
    return counted


def test_fragments_however_cut_are_stored_byte_for_byte(node, streamed):
    ds = synthetic.mammogram(rows=1024, columns=768, seed=3)  # 1.5 MiB of pixels
    data = data_set_bytes(ds)
    # PDV payloads of every kind of size: 1 byte, odd, a TCP segment, the 1 MiB maximum.
    first, one, odd, mid, large, rest = pieces(data, [1000, 1, 7, 65536, MIB - 6])
    client = associated(node.port)
    try:
        # The command and the first data fragment in one PDU.
        client.send(pdus.p_data([(1, pdus.COMMAND_LAST, c_store_command(ds)), (1, pdus.DATASET_FRAGMENT, first)]))
        for fragment in (one, odd, mid, large):
            client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, fragment)]))
        # Two fragments in one PDU, then the rest sent a few bytes at a time across PDU
        # and PDV headers, as TCP may deliver it.
        half = len(rest) // 2
        client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, rest[:100]), (1, pdus.DATASET_FRAGMENT, rest[100:half])]))
        tail = pdus.p_data([(1, pdus.DATASET_FRAGMENT, rest[half:-10])]) + pdus.p_data([(1, pdus.DATASET_LAST, rest[-10:])])
        for piece in pieces(tail, [3, 5, 4, 1000]):
            client.send(piece)
            time.sleep(0.01)
        assert client.read_reply().status == 0x0000
    finally:
        client.close()
    (stored,) = stored_files(node.data_dir)
    meta, offset = split_dataset(stored)
    assert stored.read_bytes()[offset:] == data
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.SendingApplicationEntityTitle == CALLING_AE
    assert meta.SourceApplicationEntityTitle == meta.ReceivingApplicationEntityTitle == NODE_AE
    assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    assert streamed["fragments"] >= 4  # the single-fragment PDUs took the direct path
    assert temp_files_left(node.data_dir) == []


@pytest.fixture
def batched(monkeypatch):
    """How many PDUs went to a spool together from the reader's buffer (a spy on the real path)."""
    counted = {"writes": 0, "pdus": 0}
    write_pieces = SpoolFile.write_pieces

    def counting(spool, pieces, count):
        if len(pieces) > 1:
            counted["writes"] += 1
            counted["pdus"] += len(pieces)
        return write_pieces(spool, pieces, count)

    monkeypatch.setattr(SpoolFile, "write_pieces", counting)
    return counted


def test_whole_fragments_arriving_together_are_stored_byte_for_byte(node, batched):
    ds = synthetic.mammogram(rows=512, columns=512, seed=7)
    data = data_set_bytes(ds)
    # 700 whole PDUs of 300 bytes in one send (more than one writev takes), then 64 KiB
    # ones with the last fragment behind them.
    small = [data[i:i + 300] for i in range(0, 210_000, 300)]
    large = [data[i:i + 65536] for i in range(210_000, len(data) - 5000, 65536)]
    last_start = 210_000 + 65536 * len(large)
    client = associated(node.port)
    try:
        client.send(pdus.p_data([(1, pdus.COMMAND_LAST, c_store_command(ds))]))
        client.send(b"".join(pdus.p_data([(1, pdus.DATASET_FRAGMENT, piece)]) for piece in small))
        client.send(b"".join(pdus.p_data([(1, pdus.DATASET_FRAGMENT, piece)]) for piece in large)
                    + pdus.p_data([(1, pdus.DATASET_LAST, data[last_start:])]))
        assert client.read_reply().status == 0x0000
    finally:
        client.close()
    (stored,) = stored_files(node.data_dir)
    _, offset = split_dataset(stored)
    assert stored.read_bytes()[offset:] == data
    assert batched["writes"] >= 2 and batched["pdus"] >= 100  # the buffered PDUs went together


def test_a_fragment_arriving_in_pieces_is_written_once_whole(node, monkeypatch):
    """The fragment's first half waits in the reader's buffer for its second, and the whole
    fragment goes to the spool in one write (with the next PDU if it was already there)."""
    writes = []
    write_pieces = SpoolFile.write_pieces

    def recording(spool, pieces, count):
        writes.append((len(pieces), count))
        return write_pieces(spool, pieces, count)

    monkeypatch.setattr(SpoolFile, "write_pieces", recording)
    ds = synthetic.mammogram(rows=512, columns=512, seed=8)
    data = data_set_bytes(ds)
    first, second, last = data[:100_000], data[100_000:160_000], data[160_000:]
    pdu = pdus.p_data([(1, pdus.DATASET_FRAGMENT, first)])
    client = associated(node.port)
    try:
        client.send(pdus.p_data([(1, pdus.COMMAND_LAST, c_store_command(ds))]))
        client.send(pdu[:50_000])
        time.sleep(0.2)  # the node has read the first half and waits for the rest
        client.send(pdu[50_000:] + pdus.p_data([(1, pdus.DATASET_FRAGMENT, second)]))
        time.sleep(0.2)
        client.send(pdus.p_data([(1, pdus.DATASET_LAST, last)]))
        assert client.read_reply().status == 0x0000
    finally:
        client.close()
    (stored,) = stored_files(node.data_dir)
    assert stored.read_bytes()[split_dataset(stored)[1]:] == data
    assert all(count != 50_000 - 12 for _, count in writes), "the first half was written on its own"
    assert any(count in (len(first), len(first) + len(second)) for _, count in writes), writes


@pytest.mark.parametrize("cut_after", [6, 12, 5000], ids=["PDU header", "PDV header", "inside the fragment"])
def test_a_data_set_cut_off_in_a_streamed_fragment_leaves_nothing(node, streamed, cut_after):
    ds = synthetic.mammogram(rows=512, columns=512, seed=4)
    data = data_set_bytes(ds)
    client = associated(node.port)
    try:
        client.send(pdus.p_data([(1, pdus.COMMAND_LAST, c_store_command(ds))]))
        client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, data[:200_000])]))
        client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, data[200_000:300_000])])[:cut_after])
    finally:
        client.close()
    # Until the node has read what was sent: before it made the spool there is none to find.
    wait_for(lambda: streamed["fragments"] >= 1 and not temp_files_left(node.data_dir), 10,
             description="a fragment streamed, then the spool removed")
    assert stored_files(node.data_dir) == []
    assert node.queue.stats()["instances"]["total"] == 0
    assert streamed["fragments"] >= 1


# --------------------------------------------------------------------------- SpoolFile


def spool_file(store: InstanceStore, limits_: StorageLimits) -> SpoolFile:
    """A SpoolFile under the store's tmp/, as DimseGuard makes it."""
    header = part10_header(sop_class_uid=hostile.MG, sop_instance_uid="2.25.1",
                           transfer_syntax=hostile.EXPLICIT_LITTLE, calling_ae="A", called_ae="B")
    return SpoolFile(limits_, store, header=header)


def test_the_spool_starts_with_our_header_and_keeps_every_byte(tmp_path):
    store = InstanceStore(tmp_path / "data")
    spool = spool_file(store, StorageLimits(max_dataset_bytes=64 * MIB, keep_free_bytes=0))
    chunks = [os.urandom(size) for size in (1, 300_000, 5 * MIB, 17)]
    for chunk in chunks:
        spool.write(memoryview(chunk))
    spool.close()
    content = open(spool.name, "rb").read()
    meta, offset = split_dataset(spool.name)
    assert content[offset:] == b"".join(chunks)
    assert content[:132] == b"\x00" * 128 + b"DICM"
    assert meta.SendingApplicationEntityTitle == "A" and meta.ReceivingApplicationEntityTitle == "B"
    assert spool.refusal is None and spool.size == len(content)


def test_the_spool_never_writes_under_the_watermark(tmp_path):
    store = InstanceStore(tmp_path / "data")
    room = 3 * MIB  # what may be written above the watermark
    spool = spool_file(store, StorageLimits(max_dataset_bytes=1 << 40, keep_free_bytes=store.free_bytes() - room))
    written = 0
    while spool.refusal is None:
        spool.write(bytes(256 * 1024))
        written += 256 * 1024
        assert written < 2 * room, "the spool went on writing past the watermark"
    assert spool.refusal.status == OUT_OF_RESOURCES and "disk space low" in spool.refusal.reason
    # Each reading of free space leaves room for the bytes written until the next one.
    assert written <= room - SPACE_CHECK_BYTES + 256 * 1024
    assert not os.path.exists(spool.name)
    spool.write(b"dropped")  # later fragments are dropped, not written
    assert not os.path.exists(spool.name)


def test_a_spool_that_cannot_be_made_refuses_the_data_set_and_drops_its_bytes(tmp_path):
    store = InstanceStore(tmp_path / "data")
    store.tmp_dir.rmdir()  # removed under the running node (or made unwritable)
    spool = spool_file(store, StorageLimits(max_dataset_bytes=64 * MIB, keep_free_bytes=0))
    assert spool.refusal.status == OUT_OF_RESOURCES
    assert spool.refusal.reason == "cannot create the spool file (No such file or directory)"
    spool.write(b"dropped")
    spool.close()
    assert spool.name == "" and not store.tmp_dir.exists()


def test_the_spool_is_readable_by_the_node_s_user_only(tmp_path):
    store = InstanceStore(tmp_path / "data")
    spool = spool_file(store, StorageLimits(max_dataset_bytes=64 * MIB, keep_free_bytes=0))
    assert Path(spool.name).parent == store.tmp_dir
    assert os.stat(spool.name).st_mode & 0o777 == 0o600  # patient data
    spool.close()
    spool.close()  # pynetdicom and the end of an association may both close it
    spool.write(b"late")  # a fragment after a hang-up closed it: dropped, no error
    assert os.path.getsize(spool.name) == spool.data_set_offset


def test_a_spool_dropped_unclosed_releases_its_descriptor(tmp_path):
    import gc
    import warnings

    store = InstanceStore(tmp_path / "data")
    spool = spool_file(store, StorageLimits(max_dataset_bytes=64 * MIB, keep_free_bytes=0))
    descriptor = spool._fd
    assert os.path.samefile(f"/proc/self/fd/{descriptor}", spool.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the unclosed file is the point here
        del spool
        gc.collect()
    assert not os.path.exists(f"/proc/self/fd/{descriptor}") or not os.path.samefile(
        f"/proc/self/fd/{descriptor}", next(store.tmp_dir.glob("*.dcm")))


def test_a_failed_write_refuses_the_data_set(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path / "data")
    spool = spool_file(store, StorageLimits(max_dataset_bytes=64 * MIB, keep_free_bytes=0))

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full)
    monkeypatch.setattr(os, "writev", disk_full)
    spool.write(b"x" * 1000)  # raises nothing: the data set is refused instead
    monkeypatch.undo()
    assert spool.refusal.status == OUT_OF_RESOURCES
    assert spool.refusal.reason == "cannot write the data set (No space left on device)"
    assert not os.path.exists(spool.name)


def test_a_sender_that_stalls_inside_a_streamed_data_set_is_cut_at_the_network_timeout(make_node, streamed,
                                                                                         log_output):
    node = make_node(node={"network_timeout_seconds": 2})
    ds = synthetic.mammogram(rows=512, columns=512, seed=6)
    data = data_set_bytes(ds)
    client = associated(node.port)
    try:
        client.send(pdus.p_data([(1, pdus.COMMAND_LAST, c_store_command(ds))]))
        client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, data[:200_000])]))
        client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, data[200_000:300_000])])[:5000])  # then silence
        started = time.monotonic()
        reply = client.read_reply(until=(pdus.ABORT,))
        waited = time.monotonic() - started
    finally:
        client.close()
    assert pdus.ABORT in reply.pdu_types or reply.closed, "the node kept waiting for the rest of the fragment"
    assert waited < 20, f"cut after {waited:.1f} s, the network timeout is 2 s"
    wait_for(lambda: not temp_files_left(node.data_dir), 10, description="the spool to be removed")
    assert stored_files(node.data_dir) == [] and streamed["fragments"] >= 1
    events = [json.loads(line) for line in log_output().splitlines() if line.startswith("{")]
    (slow,) = [e for e in events if e["event"] == "pdu_too_slow"]
    assert slow["pdu_type"] == 4 and slow["peer"] == "127.0.0.1"
