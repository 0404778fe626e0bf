"""A hostile network against a running `dicom-node serve`: what a peer can make it hold.

Each attack of dicom_node.bench.hostile is sent from raw sockets to a real node process,
whose resident memory is sampled meanwhile. The node must cut each attack at the bound
that applies, log it with the peer's address, and keep serving a configured PACS:

- a PDU is refused at its header when longer than its type allows (64 KiB for an
  A-ASSOCIATE-RQ, the announced maximum for P-DATA-TF), and must arrive within the
  network timeout;
- a command set over 64 KiB, or data set bytes before their command, end the association;
- a deflated data set is inflated on disk, a megabyte at a time, up to
  node.max_dataset_megabytes; a larger data set is discarded as it arrives (0xA700);
- silent connections (from many addresses) cannot take the PACS's place: a new connection
  replaces the oldest one without an association; one address has at most
  security.max_connections_per_address connections;
- an association ends after node.max_association_seconds, however it drips;
- the proposals kept for reuse (dicom_node.receive.proposals) stay within their bound when
  every association proposes contexts never seen.
"""

from __future__ import annotations

import json
import struct
import time

import pytest

from dicom_node.bench import hostile, pdus
from tests.integration.node_process import NodeProcess, write_config
from tests.integration.process import temp_files_left, wait_for
from tests.receive.helpers import NODE_AE

MIB = 1024 * 1024
# The target for each attack: the node's resident memory grows by less than this.
RSS_GROWTH_LIMIT = 50 * MIB
NETWORK_TIMEOUT_SECONDS = 4.0
MAX_ASSOCIATION_SECONDS = 8.0
MAX_DATASET_MEGABYTES = 256
MAX_CONNECTIONS = 40
PER_ADDRESS = 8
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    boxes = folder / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": []}))
    config = write_config(folder / "node.toml", {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(folder / "data"),
                 "network_timeout_seconds": NETWORK_TIMEOUT_SECONDS,
                 "max_association_seconds": MAX_ASSOCIATION_SECONDS,
                 "max_dataset_megabytes": MAX_DATASET_MEGABYTES, "max_connections": MAX_CONNECTIONS,
                 "min_free_megabytes": 64},
        "security": {"max_connections_per_address": PER_ADDRESS},
        "study": {"stable_seconds": 3600},  # nothing to analyse here
        "workers": {"count": 1, "device": "cpu"},
        "detector": {"architecture": "fixed_boxes", "weights": str(boxes)},
    })  # fmt: skip
    process = NodeProcess(config).start()
    process.data_dir = folder / "data"
    try:
        yield process
    finally:
        status = process.stop()
        print(f"--- node log ({len(process.lines)} lines)\n{process.output()}")
        assert status == 0


def attacked(node, attack) -> hostile.Outcome:
    """Run `attack` with the node's memory sampled; the outcome carries the RSS growth."""
    hostile.time_to_echo(node.port)  # the node is up and idle
    with hostile.PeakRss(node.process.pid) as rss:
        outcome = attack()
    outcome.rss_growth = rss.growth
    return outcome


def logged(node, event: str, **fields) -> dict:
    """The first `event` logged with these field values (waits a little for the line)."""

    def find():
        return next((e for e in node.events(event) if all(e.get(k) == v for k, v in fields.items())), None)

    return wait_for(find, 10, description=f"{event} {fields} in the node log")


def test_an_associate_rq_claiming_400_mib_is_refused_at_its_header(node):
    outcome = attacked(node, lambda: hostile.claimed_associate_rq(node.port, claimed=400 * MIB))
    assert outcome.closed_by_node
    assert outcome.sent_bytes < 32 * MIB  # what socket buffers took before the node hung up
    assert outcome.rss_growth < RSS_GROWTH_LIMIT, f"RSS grew by {outcome.rss_growth / MIB:.0f} MiB"
    event = logged(node, "pdu_too_long", pdu_type=1, length=400 * MIB)
    assert event["peer"] == "127.0.0.1" and event["limit"] == 64 * 1024


def test_256_mib_of_command_fragments_end_the_association(node):
    outcome = attacked(node, lambda: hostile.command_fragments(node.port, total=256 * MIB))
    assert outcome.closed_by_node
    assert outcome.sent_bytes < 32 * MIB
    assert outcome.rss_growth < RSS_GROWTH_LIMIT, f"RSS grew by {outcome.rss_growth / MIB:.0f} MiB"
    event = logged(node, "dimse_command_too_long", calling_ae="HOSTILE")
    assert event["peer"] == "127.0.0.1"


def test_a_deflate_bomb_is_inflated_on_disk_and_capped(node):
    within = attacked(node, lambda: hostile.deflate_bomb(node.port, inflated=200 * MIB))
    assert within.status == 0x0000  # 200 MiB of zeros is a (silly) valid image under the cap
    assert within.rss_growth < RSS_GROWTH_LIMIT, f"RSS grew by {within.rss_growth / MIB:.0f} MiB"
    stored = sorted((node.data_dir / "instances").rglob("*.dcm"))
    assert len(stored) == 1 and stored[0].stat().st_size < 2 * MIB  # kept deflated, as sent

    over = attacked(node, lambda: hostile.deflate_bomb(node.port, inflated=(MAX_DATASET_MEGABYTES + 64) * MIB))
    assert over.status == 0xA700
    assert over.rss_growth < RSS_GROWTH_LIMIT, f"RSS grew by {over.rss_growth / MIB:.0f} MiB"
    assert len(sorted((node.data_dir / "instances").rglob("*.dcm"))) == 1
    assert temp_files_left(node.data_dir) == []
    assert "max_dataset_megabytes" in logged(node, "instance_refused", status="0xA700")["reason"]


def test_a_data_set_over_the_size_cap_is_discarded_as_it_arrives(node):
    uid = "2.25.77"
    client = pdus.RawClient(node.port, timeout=30)
    try:
        client.send(pdus.associate_rq(called=NODE_AE, calling="HOSTILE", contexts=hostile.CONTEXTS))
        assert client.read_reply().pdu_types == [pdus.ASSOCIATE_AC]
        client.send(pdus.p_data([(1, pdus.COMMAND_LAST, pdus.c_store_rq(
            message_id=1, sop_class_uid=hostile.MG, sop_instance_uid=uid))]))
        chunk = pdus.p_data([(1, pdus.DATASET_FRAGMENT, bytes(512 * 1024))])
        for _ in range(2 * (MAX_DATASET_MEGABYTES + 16)):
            assert client.send(chunk)
        spooled = [p.stat().st_size for p in temp_files_left(node.data_dir)]
        assert all(size <= MAX_DATASET_MEGABYTES * MIB for size in spooled)
        client.send(pdus.p_data([(1, pdus.DATASET_LAST, b"")]))
        assert client.read_reply().status == 0xA700
    finally:
        client.close()
    event = logged(node, "data_set_discarded")
    assert "node.max_dataset_megabytes" in event["reason"]
    wait_for(lambda: not temp_files_left(node.data_dir), 10, description="no temp file left under tmp/")


def test_a_p_data_pdu_longer_than_announced_is_refused_at_its_header(node):
    client = pdus.RawClient(node.port, timeout=10)
    try:
        client.send(pdus.associate_rq(called=NODE_AE, calling="HOSTILE", contexts=hostile.CONTEXTS))
        assert client.read_reply().pdu_types == [pdus.ASSOCIATE_AC]
        client.send(struct.pack(">BBL", pdus.P_DATA_TF, 0, 2 * MIB))  # we announced 1 MiB
        reply = client.read_reply(until=(pdus.ABORT,))
        assert pdus.ABORT in reply.pdu_types or reply.closed
    finally:
        client.close()
    assert logged(node, "pdu_too_long", pdu_type=4, length=2 * MIB)["limit"] == MIB


@pytest.mark.parametrize("command_sent", [0, 20], ids=["no command", "half a command"])
def test_data_set_bytes_before_their_command_end_the_association(node, command_sent):
    command = pdus.c_store_rq(message_id=1, sop_class_uid=hostile.MG, sop_instance_uid="2.25.5")
    client = pdus.RawClient(node.port, timeout=10)
    try:
        client.send(pdus.associate_rq(called=NODE_AE, calling=f"BEFORE{command_sent}", contexts=hostile.CONTEXTS))
        assert client.read_reply().pdu_types == [pdus.ASSOCIATE_AC]
        if command_sent:
            client.send(pdus.p_data([(1, pdus.COMMAND_FRAGMENT, command[:command_sent])]))
        client.send(pdus.p_data([(1, pdus.DATASET_FRAGMENT, bytes(1000))]))
        reply = client.read_reply(until=(pdus.ABORT,))
        assert pdus.ABORT in reply.pdu_types or reply.closed
    finally:
        client.close()
    assert logged(node, "dimse_data_before_command", calling_ae=f"BEFORE{command_sent}")["peer"] == "127.0.0.1"


@pytest.mark.parametrize("part", ["command", "data set"])
def test_a_message_on_a_context_never_accepted_ends_the_association_with_its_reason(node, part):
    # PS3.8 9.3.5.1: each PDV names an accepted presentation context (odd numbers, from
    # the A-ASSOCIATE-AC); pynetdicom itself failed on any other with a KeyError.
    command = pdus.c_store_rq(message_id=1, sop_class_uid=hostile.MG, sop_instance_uid="2.25.7")
    calling = "NOCONTEXT" if part == "command" else "NOCONTEXTDATA"
    client = pdus.RawClient(node.port, timeout=10)
    try:
        client.send(pdus.associate_rq(called=NODE_AE, calling=calling, contexts=hostile.CONTEXTS))
        assert client.read_reply().pdu_types == [pdus.ASSOCIATE_AC]
        if part == "command":
            client.send(pdus.p_data([(99, pdus.COMMAND_LAST, command)]))
        else:
            client.send(pdus.p_data([(1, pdus.COMMAND_LAST, command)]))
            client.send(pdus.p_data([(99, pdus.DATASET_LAST, bytes(1000))]))
        reply = client.read_reply(until=(pdus.ABORT,))
        assert pdus.ABORT in reply.pdu_types or reply.closed
    finally:
        client.close()
    assert logged(node, "pdv_context_not_accepted", calling_ae=calling)["context_id"] == 99
    wait_for(lambda: not temp_files_left(node.data_dir), 10, description="no spool left")


def test_requests_piling_up_unanswered_end_the_association(node):
    """No asynchronous operations are negotiated (PS3.7 D.3.3.3): one request at a time."""
    client = pdus.RawClient(node.port, timeout=10)
    try:
        client.send(pdus.associate_rq(called=NODE_AE, calling="PIPELINE", contexts=hostile.CONTEXTS))
        assert client.read_reply().pdu_types == [pdus.ASSOCIATE_AC]
        client.send(b"".join(pdus.p_data([(5, pdus.COMMAND_LAST, pdus.c_echo_rq(message_id=i))])
                             for i in range(1, 201)))
        answered = 0
        while (reply := client.read_reply()).status is not None:
            answered += 1
        assert pdus.ABORT in reply.pdu_types or reply.closed
        assert answered < 200
    finally:
        client.close()
    assert logged(node, "dimse_too_many_requests", calling_ae="PIPELINE")["limit"] == 4


def test_a_pdu_dripping_in_is_cut_at_the_network_timeout(node):
    client = pdus.RawClient(node.port, timeout=1.0)
    started = time.monotonic()
    try:
        client.send(struct.pack(">BBL", pdus.ASSOCIATE_RQ, 0, 1000))
        closed = False
        while time.monotonic() - started < 3 * NETWORK_TIMEOUT_SECONDS:
            if not client.send(b"\x00"):  # one byte a second: each recv() sees data in time
                closed = True
                break
            try:
                client.sock.recv(16)  # b"": closed; else an A-ABORT: either way, hung up
                closed = True
                break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    finally:
        client.close()
    assert closed, "the node kept reading a PDU that dripped in for three network timeouts"
    assert time.monotonic() - started < NETWORK_TIMEOUT_SECONDS + 3
    assert logged(node, "pdu_too_slow", pdu_type=1)["peer"] == "127.0.0.1"


def test_fifty_silent_connections_do_not_keep_the_pacs_out(node):
    outcome = hostile.silent_connections(node.port, count=50)
    assert "pacs_failed" not in outcome.details, outcome.details
    assert outcome.seconds < 5.0, f"the PACS waited {outcome.seconds:.2f} s"  # the target: 1 s (bench)
    # 50 silent connections with room for 40 connections: the oldest silent ones made room.
    assert outcome.details["silent_still_open"] <= MAX_CONNECTIONS
    assert logged(node, "connection_evicted")["peer"].startswith("127.0.")


def test_one_address_has_at_most_its_share_of_connections(node):
    connections = hostile.open_silent_connections(node.port, PER_ADDRESS + 1, spread_addresses=False)
    try:
        time.sleep(0.5)
        still_open = [sock for sock in connections if hostile._still_open(sock)]
        assert len(still_open) == PER_ADDRESS
        event = logged(node, "connection_refused", peer="127.0.0.1")
        assert "security.max_connections_per_address" in event["reason"]
    finally:
        for sock in connections:
            sock.close()
    # Those connections gone, the address may associate again.
    wait_for(lambda: _echo_ok(node), 15, description="C-ECHO from 127.0.0.1 after the silent ones closed")


def _echo_ok(node) -> bool:
    try:
        hostile.time_to_echo(node.port, timeout=5)
        return True
    except (RuntimeError, OSError):
        return False


def test_a_slow_drip_is_cut_at_the_association_time_limit(node):
    outcome = hostile.slow_drip(node.port, every=1.0, give_up_after=3 * MAX_ASSOCIATION_SECONDS)
    assert outcome.closed_by_node, "the node kept a dripping association open"
    assert outcome.seconds < MAX_ASSOCIATION_SECONDS + 5
    event = logged(node, "association_time_limit", calling_ae="HOSTILE")
    assert event["peer"] == "127.0.0.1"


def test_a_new_proposal_on_every_association_keeps_memory_bounded(node):
    outcome = attacked(node, lambda: hostile.new_proposals(node.port, count=300))
    assert outcome.details["accepted"] == 300  # every one answered, none of them known
    assert outcome.sent_bytes > 300 * 40 * 1024
    assert outcome.rss_growth < RSS_GROWTH_LIMIT, f"RSS grew by {outcome.rss_growth / MIB:.0f} MiB"


def test_the_node_still_stores_after_every_attack(node):
    """Last in this module: the node that took all of the above answers a PACS normally."""
    assert hostile.time_to_echo(node.port) < 5
    assert node.process.poll() is None
    assert not [line for line in node.lines if "Traceback" in line]
