"""Proposals seen before: decoded and negotiated once, with pynetdicom's own results.

The reference is pynetdicom itself: every object the cache hands out must encode to the
bytes pynetdicom's own decoding, negotiation and A-ASSOCIATE-AC encode to, for a real
storescu request (128 contexts) and for one with SCP/SCU role selection.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.sop_class import CTImageStorage, DigitalMammographyXRayImageStorageForPresentation

from dicom_node.config import parse_config
from dicom_node.receive.proposals import (
    MAX_PROPOSALS,
    Acceptance,
    ProposalCache,
    ProposalRQ,
    ProposedContexts,
)
from dicom_node.receive.server import SharedContexts, build_ae
from tests.integration.node_process import open_to_any_caller
from tests.receive.helpers import NODE_AE, make_encoded, stored_files, storescu

MG = DigitalMammographyXRayImageStorageForPresentation


@pytest.fixture(scope="module")
def storescu_request(tmp_path_factory) -> bytes:
    """The A-ASSOCIATE-RQ dcmtk's storescu sends by default (every storage class it knows)."""
    folder = tmp_path_factory.mktemp("storescu-request")
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def take_one_request() -> None:
        connection, _ = listener.accept()
        with connection, connection.makefile("rb") as stream:
            header = stream.read(6)
            received.append(header + stream.read(struct.unpack(">L", header[2:])[0]))

    reader = threading.Thread(target=take_one_request)
    reader.start()
    storescu(listener.getsockname()[1], make_encoded(folder, "explicit-little"))  # fails: no answer
    reader.join(timeout=30)
    listener.close()
    assert received and received[0][0] == 0x01
    return received[0]


def request_with_roles() -> bytes:
    """An A-ASSOCIATE-RQ proposing MG and CT, with SCP/SCU role selection for MG."""
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title, primitive.called_ae_title = "ROLES_SCU", NODE_AE
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    contexts = [build_context(MG, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                build_context(CTImageStorage, [ImplicitVRLittleEndian])]
    for context_id, context in zip((1, 3), contexts):
        context.context_id = context_id
    primitive.presentation_context_definition_list = contexts
    maximum_length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    maximum_length.maximum_length_received = 16384
    implementation.implementation_class_uid = "1.2.3.4"
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = MG, True, False
    primitive.user_information = [maximum_length, implementation, role]
    return A_ASSOCIATE_RQ(primitive).encode()


@pytest.fixture(scope="module")
def server_contexts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ae")
    config = parse_config(open_to_any_caller(
        {"node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(folder / "data")}}
    ), base_dir=folder)
    return SharedContexts(build_ae(config).supported_contexts)


def pynetdicom_decode(raw: bytes) -> A_ASSOCIATE_RQ:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    return pdu


def cached_decode(raw: bytes, cache: ProposalCache) -> ProposalRQ:
    pdu = ProposalRQ(cache)
    pdu.decode(raw)
    return pdu


def roles_of(primitive: A_ASSOCIATE) -> dict:
    return {uid: (item.scu_role, item.scp_role) for uid, item in
            ((item.sop_class_uid, item) for item in primitive.user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation))}


def acceptance_primitive(request: A_ASSOCIATE, results: list) -> A_ASSOCIATE:
    """The A-ASSOCIATE (accept) primitive as ACSE.send_accept makes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = request.application_context_name
    primitive.calling_ae_title, primitive.called_ae_title = request.calling_ae_title, request.called_ae_title
    primitive.result, primitive.result_source = 0x00, 0x01
    accepted = sorted((cx for cx in results if cx.result == 0x00), key=lambda cx: cx.context_id)
    primitive.presentation_context_definition_results_list = accepted + [cx for cx in results if cx.result != 0x00]
    maximum_length = MaximumLengthNotification()
    maximum_length.maximum_length_received = 131072
    primitive.user_information = [maximum_length]
    return primitive


def outcome(results: list, roles: list) -> list:
    return [(cx.context_id, cx.abstract_syntax, cx.transfer_syntax, cx.result, cx.as_scu, cx.as_scp)
            for cx in results] + [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles]


@pytest.mark.parametrize("request_name", ["storescu", "roles"])
def test_a_cached_proposal_decodes_negotiates_and_answers_as_pynetdicom_does(
    request_name, storescu_request, server_contexts
):
    raw = storescu_request if request_name == "storescu" else request_with_roles()
    cache = ProposalCache()
    their_pdu = pynetdicom_decode(raw)
    theirs = their_pdu.to_primitive()
    for _ in range(2):  # the second decode is the cache's
        pdu = cached_decode(raw, cache)
        assert pdu.encode() == their_pdu.encode()  # (dcmtk sets a reserved byte pynetdicom does not)
        ours = pdu.to_primitive()
        # The whole request, re-encoded from each primitive: contexts, user information, titles.
        assert A_ASSOCIATE_RQ(ours).encode() == A_ASSOCIATE_RQ(theirs).encode()
        proposed = ours.presentation_context_definition_list
        assert isinstance(proposed, ProposedContexts)
        roles = roles_of(ours)
        expected = negotiate_as_acceptor(theirs.presentation_context_definition_list, list(server_contexts), roles)
        results, roles_reply = proposed.negotiate(list(server_contexts), roles)
        assert outcome(results, roles_reply) == outcome(*expected)
        assert any(cx.result == 0x00 for cx in results)  # MG is accepted
        answer = acceptance_primitive(ours, results)
        encoded = proposed.negotiation.answer(answer.presentation_context_definition_results_list)
        assert encoded is not None
        assert Acceptance(answer, encoded).encode() == A_ASSOCIATE_AC(answer).encode()
    assert len(cache) == 1
    assert len(proposed.proposal.negotiated) == 1
    if request_name == "roles":  # proposed, and part of the key
        assert roles == {MG: (True, False)}


def test_the_same_proposal_gives_the_same_objects_and_others_their_own(storescu_request, server_contexts):
    cache = ProposalCache()
    first, again = (cached_decode(storescu_request, cache) for _ in range(2))
    assert again.proposal is first.proposal
    assert all(a is b for a, b in zip(first.to_primitive().presentation_context_definition_list,
                                      again.to_primitive().presentation_context_definition_list))
    first_results, _ = first.to_primitive().presentation_context_definition_list.negotiate(list(server_contexts), {})
    again_results, _ = again.to_primitive().presentation_context_definition_list.negotiate(list(server_contexts), {})
    assert all(a is b for a, b in zip(first_results, again_results))
    other = cached_decode(request_with_roles(), cache)
    assert other.proposal is not first.proposal
    assert len(cache) == 2


def test_an_answer_with_other_contexts_is_pynetdicom_s(storescu_request, server_contexts):
    """Contexts that are not this negotiation's (another order, one missing) get no cached items."""
    proposed = cached_decode(storescu_request, ProposalCache()).to_primitive().presentation_context_definition_list
    results, _ = proposed.negotiate(list(server_contexts), {})
    assert proposed.negotiation.answer(results[1:]) is None
    assert proposed.negotiation.answer(results) is not None
    assert proposed.negotiation.answer(list(reversed(results))) is None


def distinct_requests(count: int) -> list[bytes]:
    requests = []
    for number in range(count):
        primitive = pynetdicom_decode(request_with_roles()).to_primitive()
        contexts = primitive.presentation_context_definition_list
        contexts[0].context_id = 1 + 2 * number  # a distinct proposal each time
        primitive.presentation_context_definition_list = contexts
        requests.append(A_ASSOCIATE_RQ(primitive).encode())
    return requests


def test_the_cache_keeps_a_bounded_number_of_proposals():
    cache = ProposalCache()
    for request in distinct_requests(MAX_PROPOSALS + 5):
        cached_decode(request, cache)
    assert len(cache) == MAX_PROPOSALS


def proposal_bytes(raw: bytes) -> int:
    """The bytes of a request's presentation context items (PS3.8 9.3.2.2)."""
    offset, total = 74, 0
    while offset < len(raw):
        length = 4 + struct.unpack(">H", raw[offset + 2:offset + 4])[0]
        total += length if raw[offset] == 0x20 else 0
        offset += length
    return total


def test_the_cache_keeps_a_bounded_number_of_bytes(storescu_request):
    small = distinct_requests(2)
    cache = ProposalCache(max_bytes=proposal_bytes(storescu_request) + proposal_bytes(small[0]))
    storescu_proposal = cached_decode(storescu_request, cache).proposal
    cached_decode(small[0], cache)
    assert len(cache) == 2
    assert cached_decode(storescu_request, cache).proposal is storescu_proposal
    cached_decode(small[1], cache)  # over the budget: the least recently used goes
    assert len(cache) == 2
    assert cached_decode(storescu_request, cache).proposal is storescu_proposal
    too_small = ProposalCache(max_bytes=proposal_bytes(storescu_request) - 1)
    first = cached_decode(storescu_request, too_small).proposal
    assert len(too_small) == 0
    assert cached_decode(storescu_request, too_small).proposal is not first  # decoded again


def test_a_malformed_context_item_raises_as_in_pynetdicom_and_is_not_kept(storescu_request):
    # The first presentation context item (after the 74-byte header and the application
    # context item) claims more bytes than its sub-items hold.
    raw = bytearray(storescu_request)
    offset = 74 + 4 + struct.unpack(">H", raw[76:78])[0]
    assert raw[offset] == 0x20
    abstract_syntax_length = offset + 8 + 2
    raw[abstract_syntax_length:abstract_syntax_length + 2] = struct.pack(">H", 0xFFF0)
    with pytest.raises(Exception) as theirs:
        pynetdicom_decode(bytes(raw))
    cache = ProposalCache()
    with pytest.raises(type(theirs.value)):
        cached_decode(bytes(raw), cache)
    assert len(cache) == 0


def test_storescu_associations_reuse_one_proposal(node, tmp_path):
    """Real associations: storescu's blanket proposal twice, then only what it needs (-R)."""
    first = make_encoded(tmp_path / "a", "explicit-little")
    second = make_encoded(tmp_path / "b", "explicit-little")
    assert storescu(node.port, first).returncode == 0
    assert storescu(node.port, second).returncode == 0
    assert len(node.server.proposals) == 1
    (proposal,) = node.server.proposals._proposals.values()
    (negotiation,) = proposal.negotiated.values()
    assert negotiation.answer_encoded  # the A-ASSOCIATE-AC went as an Acceptance
    third = make_encoded(tmp_path / "c", "explicit-little")
    assert storescu(node.port, third, options=("-R",)).returncode == 0
    assert len(node.server.proposals) == 2
    assert len(stored_files(node.data_dir)) == 3
