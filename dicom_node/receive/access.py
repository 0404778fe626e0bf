"""Who may associate: called and calling AE titles, the caller's host, association limits.

Decided in EVT_REQUESTED, before any presentation context is negotiated; a refusal is an
A-ASSOCIATE-RJ with the PS3.8 9.3.4 fields that say why, and a log line with the peer.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from dataclasses import dataclass
from enum import IntEnum

import structlog
from pynetdicom import evt

from dicom_node.config import CallerConfig, Config
from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger("dicom_node.receive")

_association_ids = itertools.count(1)


class AssociateResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 9.3.4)."""

    REJECTED_PERMANENT = 0x01
    REJECTED_TRANSIENT = 0x02


class AssociateSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_PRESENTATION = 0x03


class AssociateDiagnostic(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. (PS3.8 9.3.4), for the sources above."""

    NO_REASON_GIVEN = 0x01  # source: service user
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03  # source: service user
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07  # source: service user
    LOCAL_LIMIT_EXCEEDED = 0x02  # source: service provider (presentation)


@dataclass(frozen=True)
class Rejection:
    """Why an association request is refused, and the A-ASSOCIATE-RJ fields saying so."""

    reason: str
    result: AssociateResult
    source: AssociateSource
    diagnostic: AssociateDiagnostic


def check_access_config(config: Config, *, warn: bool = True) -> None:
    """Refuse to serve without a stated access policy; warn about the open ones.

    Raises ConfigError naming the key when security.allowed_callers is empty and
    security.allow_any_caller is not set (or both are set, which contradicts itself).
    """
    security = config.security
    if security.allowed_callers and security.allow_any_caller:
        raise ConfigError(
            "security.allow_any_caller: true, but security.allowed_callers lists callers; "
            "remove one of the two"
        )
    if not security.allowed_callers and not security.allow_any_caller:
        raise ConfigError(
            "security.allowed_callers: empty, so nobody may send; list the callers "
            "([{ ae_title = \"PACS\", host = \"10.0.0.2\" }]) or set security.allow_any_caller = true"
        )
    if not warn:
        return
    if security.allow_any_caller:
        log.warning("any_caller_allowed", hint="set security.allowed_callers for production")
    for caller in security.allowed_callers:
        if caller.host is None:
            log.warning("allowed_caller_without_host", allowed_ae=caller.ae_title,
                        hint="an AE title alone is easy to forge; name its host")


def _caller_host_matches(allowed: str, peer: str) -> bool:
    """``allowed`` is an IP address, a network (CIDR) or a host name."""
    try:
        peer_ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(peer_ip, ipaddress.IPv6Address) and peer_ip.ipv4_mapped:
        peer_ip = peer_ip.ipv4_mapped
    try:
        return peer_ip in ipaddress.ip_network(allowed, strict=False)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(allowed, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return any(ipaddress.ip_address(info[4][0]) == peer_ip for info in infos)


def _caller_allowed(config: Config, *, calling_ae: str, peer: str) -> bool:
    if config.security.allow_any_caller:
        return True
    return any(
        caller.ae_title == calling_ae
        and (caller.host is None or _caller_host_matches(caller.host, peer))
        for caller in config.security.allowed_callers
    )


def check_association_request(
    config: Config,
    *,
    calling_ae: str,
    called_ae: str,
    peer: str,
    active_total: int,
    active_from_caller: int,
) -> Rejection | None:
    """Decide whether an association request is accepted; ``None`` means yes.

    ``active_total`` and ``active_from_caller`` count the association being
    requested as well.
    """
    security = config.security
    if security.require_called_ae_title and called_ae != config.node.ae_title:
        return Rejection(
            f"called AE title {called_ae!r} is not {config.node.ae_title!r}",
            AssociateResult.REJECTED_PERMANENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.CALLED_AE_TITLE_NOT_RECOGNIZED,
        )
    if not _caller_allowed(config, calling_ae=calling_ae, peer=peer):
        return Rejection(
            f"calling AE title {calling_ae!r} from {peer} is not in security.allowed_callers",
            AssociateResult.REJECTED_PERMANENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.CALLING_AE_TITLE_NOT_RECOGNIZED,
        )
    if active_total > config.node.max_associations:
        return Rejection(
            f"node.max_associations ({config.node.max_associations}) reached",
            AssociateResult.REJECTED_TRANSIENT,
            AssociateSource.SERVICE_PROVIDER_PRESENTATION,
            AssociateDiagnostic.LOCAL_LIMIT_EXCEEDED,
        )
    if active_from_caller > security.max_associations_per_caller:
        return Rejection(
            f"security.max_associations_per_caller ({security.max_associations_per_caller}) "
            f"reached for {calling_ae!r}",
            AssociateResult.REJECTED_TRANSIENT,
            AssociateSource.SERVICE_PROVIDER_PRESENTATION,
            AssociateDiagnostic.LOCAL_LIMIT_EXCEEDED,
        )
    return None


def calling_ae_of(association) -> str | None:
    primitive = association.requestor.primitive
    return primitive.calling_ae_title if primitive is not None else None


def handle_requested(event: evt.Event, config: Config) -> None:
    """EVT_REQUESTED: access control, before any presentation context is negotiated."""
    association = event.assoc
    request = association.requestor.primitive
    calling_ae = request.calling_ae_title
    peer = association.requestor.address
    # Association threads run handlers in their own context: bind once, log everywhere.
    structlog.contextvars.bind_contextvars(
        assoc_id=f"a{next(_association_ids)}", calling_ae=calling_ae, peer=peer
    )
    try:
        acceptors = [a for a in association.ae.active_associations if a.is_acceptor]
        rejection = check_association_request(
            config,
            calling_ae=calling_ae,
            called_ae=request.called_ae_title,
            peer=peer,
            active_total=len(acceptors),
            active_from_caller=sum(1 for a in acceptors if calling_ae_of(a) == calling_ae),
        )
    except Exception as error:  # fail closed: pynetdicom would accept after a handler error
        rejection = Rejection(
            f"access check failed ({type(error).__name__}: {error})",
            AssociateResult.REJECTED_TRANSIENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.NO_REASON_GIVEN,
        )
    if rejection is None:
        return
    log.warning(
        "association_rejected", reason=rejection.reason, called_ae=request.called_ae_title
    )
    association.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
    # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ
    # is out and the peer has closed the connection, then end the association.
    association.kill()
