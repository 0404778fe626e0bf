"""Association requests whose presentation contexts were proposed before: decoded and
negotiated once, not on every association.

An A-ASSOCIATE-RQ proposes presentation contexts (PS3.8 9.3.2.2), and a sender proposes
the same ones on every association it opens. dcmtk's storescu proposes by default every
storage SOP class it knows: 128 contexts. pynetdicom decodes each into objects, validating
every UID with regular expressions on the way, then matches each against the server's
contexts, and encodes an answer item for each: 5.5 ms of CPU (2.0 decoding, 1.4 making the
A-ASSOCIATE primitive, 1.1 matching, 1.1 encoding the A-ASSOCIATE-AC), on every
association, before the answer could go; dcmtk's storescp answers at once. From reading the
request to sending the answer took 8.5 ms (median of 20 storescu associations); with the
cache, 0.7 ms.

`ProposalCache` keeps the last few proposals, keyed by the exact bytes of their
presentation context items, as pynetdicom decoded them (PDU items and primitives), with
what their matching against the server's contexts gave and the answer's encoded items. A request that proposes the same
bytes gets the same objects. Nothing changes these objects once made: the acceptor's
negotiation reads the proposed contexts and builds new ones for its answer, which the
association then only reads (as with the server's own contexts: server.SharedContexts).
Proposals never seen are decoded by pynetdicom, which refuses malformed items as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from pynetdicom import acse, evt, fsm
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_items import (
    PDU_ITEM_TYPES,
    ApplicationContextItem,
    PresentationContextItemAC,
    PresentationContextItemRQ,
    UserInformationItem,
)
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

PRESENTATION_CONTEXT_RQ_ITEM = 0x20  # PS3.8 9.3.2.2
A_ASSOCIATE_RQ_PDU = 0x01  # PS3.8 9.3.2
A_ASSOCIATE_AC_PDU = 0x02  # PS3.8 9.3.3
# Proposals kept: one or two per sending application. A peer that sends a new proposal
# every time only turns entries over, each decoded as pynetdicom would anyway. Their
# decoded objects take about 20 times their encoded bytes (190 KiB for storescu's 9.4 KiB),
# so the bytes kept are bounded too: a few MiB at most, whatever peers send.
MAX_PROPOSALS = 16
MAX_PROPOSAL_BYTES = 256 * 1024  # of all proposals kept, encoded
# Distinct outcomes kept per proposal: one per set of server contexts and proposed roles.
MAX_NEGOTIATIONS = 4

_original_negotiate_as_acceptor = acse.negotiate_as_acceptor
_original_send_acceptance = fsm.ACTIONS["AE-7"]


@dataclass(eq=False)
class Proposal:
    """One proposal's presentation contexts as pynetdicom decodes them, and the outcomes
    of their negotiation."""

    items: tuple[PresentationContextItemRQ, ...]  # the PDU items
    contexts: tuple[PresentationContext, ...]  # the same, as the A-ASSOCIATE primitive holds them
    negotiated: dict = field(default_factory=dict)  # see ProposedContexts.negotiate


class ProposalCache:
    """The proposals last seen (at most MAX_PROPOSALS, MAX_PROPOSAL_BYTES in all), by the
    bytes of their presentation context items. Shared by the server's association threads."""

    def __init__(self, max_proposals: int = MAX_PROPOSALS, max_bytes: int = MAX_PROPOSAL_BYTES) -> None:
        self._max_proposals, self._max_bytes = max_proposals, max_bytes
        self._proposals: OrderedDict[tuple[bytes, ...], Proposal] = OrderedDict()
        self._bytes = 0  # of the proposals kept, encoded
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._proposals)

    def proposal(self, encoded_items: tuple[bytes, ...]) -> Proposal:
        """The proposal of these encoded items; raises as pynetdicom does on malformed ones."""
        with self._lock:
            proposal = self._proposals.get(encoded_items)
            if proposal is not None:
                self._proposals.move_to_end(encoded_items)
                return proposal
        items = tuple(map(_decoded_context_item, encoded_items))
        proposal = Proposal(items, tuple(item.to_primitive() for item in items))
        size = sum(map(len, encoded_items))
        with self._lock:
            if size <= self._max_bytes and encoded_items not in self._proposals:
                self._proposals[encoded_items] = proposal
                self._bytes += size
                while len(self._proposals) > self._max_proposals or self._bytes > self._max_bytes:
                    dropped, _ = self._proposals.popitem(last=False)
                    self._bytes -= sum(map(len, dropped))
        return proposal


def _decoded_context_item(encoded: bytes) -> PresentationContextItemRQ:
    item = PresentationContextItemRQ()
    item.decode(encoded)
    return item


def _answer_item(context: PresentationContext) -> PresentationContextItemAC:
    item = PresentationContextItemAC()
    item.from_primitive(context)
    return item


@dataclass(eq=False)
class Negotiation:
    """What negotiate_as_acceptor gave for a proposal, and the A-ASSOCIATE-AC items that
    answer it (made when first sent)."""

    result_contexts: tuple[PresentationContext, ...]
    roles_reply: tuple
    server_contexts: tuple[PresentationContext, ...]  # kept alive: their identities are the key
    # The contexts in the order of the first AC's items, and those items encoded: one pair,
    # set in one assignment, so that associations answering at once each read a whole one.
    _sent: tuple[tuple[PresentationContext, ...], bytes] | None = field(default=None, init=False)

    @property
    def answer_encoded(self) -> bytes:
        """The answer's presentation context items, encoded (empty until first sent)."""
        return self._sent[1] if self._sent is not None else b""

    def answer(self, results: list[PresentationContext]) -> bytes | None:
        """The encoded presentation context items of an A-ASSOCIATE-AC that answers with
        `results`, if they are this negotiation's contexts (the same objects, in order)."""
        sent = self._sent
        if sent is None:
            if {id(cx) for cx in results} != {id(cx) for cx in self.result_contexts}:
                return None
            sent = self._sent = (tuple(results), b"".join(_answer_item(context).encode() for context in results))
        contexts, encoded = sent
        if len(results) != len(contexts) or any(given is not known for given, known in zip(results, contexts)):
            return None
        return encoded


class ProposedContexts(list):
    """An A-ASSOCIATE primitive's proposed contexts, with the `Proposal` they came from and,
    once negotiated, the `Negotiation`.

    The list is the association's own; the contexts in it are the proposal's."""

    def __init__(self, proposal: Proposal) -> None:
        super().__init__(proposal.contexts)
        self.proposal = proposal
        self.negotiation: Negotiation | None = None

    def negotiate(self, server_contexts: list[PresentationContext], roles: dict | None):
        """pynetdicom's negotiate_as_acceptor, once per proposal, server contexts and roles.

        The server's contexts are the same objects for every association (SharedContexts),
        so their identities name them; the outcome keeps them alive, so no identity is
        reused while it is kept.
        """
        roles = roles or {}
        key = (tuple(map(id, server_contexts)), tuple(sorted(roles.items())))
        negotiated = self.proposal.negotiated
        negotiation = negotiated.get(key)
        if negotiation is None:
            result_contexts, roles_reply = _original_negotiate_as_acceptor(self, server_contexts, roles)
            negotiation = Negotiation(tuple(result_contexts), tuple(roles_reply), tuple(server_contexts))
            if len(negotiated) >= MAX_NEGOTIATIONS:
                negotiated.clear()
            negotiated[key] = negotiation
        self.negotiation = negotiation
        return list(negotiation.result_contexts), list(negotiation.roles_reply)


def _negotiate_as_acceptor(rq_contexts, ac_contexts, roles=None):
    if isinstance(rq_contexts, ProposedContexts):
        return rq_contexts.negotiate(ac_contexts, roles)
    return _original_negotiate_as_acceptor(rq_contexts, ac_contexts, roles)


class Acceptance(A_ASSOCIATE_AC):
    """An A-ASSOCIATE-AC whose presentation context items were encoded before, for the
    same negotiation: the bytes pynetdicom's own PDU would encode to (tested)."""

    def __init__(self, primitive: A_ASSOCIATE, answer_encoded: bytes) -> None:
        self._answer_encoded = answer_encoded
        super().__init__(primitive)

    def from_primitive(self, primitive: A_ASSOCIATE) -> None:
        # A_ASSOCIATE_AC.from_primitive without an item per presentation context.
        self.reserved_aet = primitive.called_ae_title
        self.reserved_aec = primitive.calling_ae_title
        application_context = ApplicationContextItem()
        application_context.application_context_name = primitive.application_context_name
        user_information = UserInformationItem()
        user_information.from_primitive(primitive.user_information)
        self.variable_items = [application_context, user_information]

    @property
    def pdu_type(self) -> int:
        return A_ASSOCIATE_AC_PDU  # pynetdicom looks it up by class

    @property
    def pdu_length(self) -> int:
        return super().pdu_length + len(self._answer_encoded)

    def _wrap_encode_items(self, items: list) -> bytes:
        application_context, user_information = items
        # PS3.8 9.3.3: the application context item, the presentation context items, then
        # the user information item.
        return application_context.encode() + self._answer_encoded + user_information.encode()


def _send_acceptance(dul) -> str:
    """fsm.AE_7 (PS3.8 9.2.2, AE-7: send the A-ASSOCIATE-AC PDU), as an Acceptance when
    the association negotiated a proposal seen before."""
    primitive = dul.to_provider_queue.get(False)
    proposed = getattr(getattr(dul.assoc.requestor, "primitive", None), "presentation_context_definition_list", None)
    negotiation = getattr(proposed, "negotiation", None)
    answer = negotiation.answer(primitive.presentation_context_definition_results_list) if negotiation else None
    dul._send(A_ASSOCIATE_AC(primitive) if answer is None else Acceptance(primitive, answer))
    return _original_send_acceptance[2]  # the next state: Sta6, established


def remember_negotiations() -> None:
    """Have pynetdicom reuse what it made for a proposal seen before: its acceptor
    negotiation (ACSE._negotiate_as_acceptor calls the module's negotiate_as_acceptor)
    and the A-ASSOCIATE-AC it sends (the state machine's action AE-7). Associations the
    node did not decode (another AE in the process, a requestor) get pynetdicom's own.
    Idempotent."""
    acse.negotiate_as_acceptor = _negotiate_as_acceptor
    description, _, next_state = _original_send_acceptance
    fsm.ACTIONS["AE-7"] = (description, _send_acceptance, next_state)


class ProposalRQ(A_ASSOCIATE_RQ):
    """A received A-ASSOCIATE-RQ whose presentation contexts come from a ProposalCache.

    The PDU is the one pynetdicom would decode (the same items, in order); its primitive
    carries the proposal's contexts in a ProposedContexts."""

    def __init__(self, proposals: ProposalCache) -> None:
        super().__init__()
        self._proposals = proposals
        self.proposal: Proposal | None = None

    @property
    def pdu_type(self) -> int:
        return A_ASSOCIATE_RQ_PDU  # pynetdicom looks it up by class

    def _wrap_generate_items(self, bytestream: bytes) -> list:
        items: list = []
        context_positions, encoded_contexts = [], []
        for item_type, encoded in self._generate_items(bytestream):
            if item_type == PRESENTATION_CONTEXT_RQ_ITEM:
                context_positions.append(len(items))
                encoded_contexts.append(encoded)
                items.append(None)
                continue
            item = PDU_ITEM_TYPES[item_type]()
            item.decode(encoded)
            items.append(item)
        self.proposal = self._proposals.proposal(tuple(encoded_contexts))
        for position, item in zip(context_positions, self.proposal.items):
            items[position] = item
        return items

    def to_primitive(self) -> A_ASSOCIATE:
        # A_ASSOCIATE_RQ.to_primitive, with the proposal's contexts in place of a new
        # primitive made of each item.
        primitive = A_ASSOCIATE()
        primitive.calling_ae_title = self.calling_ae_title
        primitive.called_ae_title = self.called_ae_title
        primitive.application_context_name = self.application_context_name
        for item in self.variable_items:
            if isinstance(item, UserInformationItem):
                primitive.user_information = item.to_primitive()
        # The setter copies the list into a plain one; the negotiation must see this one.
        primitive._presentation_context_definition_list = ProposedContexts(self.proposal)
        return primitive


def decode_pdu_with_proposals(dul: DULServiceProvider, proposals: ProposalCache, bytestream) -> tuple:
    """DULServiceProvider._decode_pdu (its events included), decoding an A-ASSOCIATE-RQ
    as a ProposalRQ; every other PDU is pynetdicom's."""
    if bytestream[0] != A_ASSOCIATE_RQ_PDU:
        return DULServiceProvider._decode_pdu(dul, bytestream)
    data = bytes(bytestream)
    evt.trigger(dul.assoc, evt.EVT_DATA_RECV, {"data": data})
    pdu = ProposalRQ(proposals)
    pdu.decode(data)
    evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
    return pdu, "Evt6"
