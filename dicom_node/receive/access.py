"""Who may associate: called and calling AE titles, the caller's host, association limits.

Decided in EVT_REQUESTED, before any presentation context is negotiated; a refusal is an
A-ASSOCIATE-RJ with the PS3.8 9.3.4 fields that say why, and a log line with the peer.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import threading
import time
from dataclasses import dataclass
from enum import IntEnum

import structlog
from pynetdicom import evt

from dicom_node import metrics
from dicom_node.config import Config
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


def handle_requested(event: evt.Event, config: Config, connections: ConnectionTable) -> None:
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
        rejection = connections.request(
            association,
            calling_ae=calling_ae,
            decide=lambda active_total, active_from_caller: check_association_request(
                config,
                calling_ae=calling_ae,
                called_ae=request.called_ae_title,
                peer=peer,
                active_total=active_total,
                active_from_caller=active_from_caller,
            ),
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
    metrics.get().associations_refused.labels(reason=rejection.diagnostic.name).inc()
    association.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
    # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ
    # is out and the peer has closed the connection, then end the association.
    association.kill()


# --------------------------------------------------------------------------- connections


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection; `calling_ae` is set once its association was accepted."""

    sock: socket.socket
    peer: str
    accepted_at: float  # time.monotonic()
    association: object | None = None  # the pynetdicom Association serving it
    calling_ae: str | None = None
    closed: bool = False  # closed by us (evicted, or over a limit); its thread is ending


ABORT_GRACE_SECONDS = 2.0


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class ConnectionTable:
    """Open connections, counted before anything is known of the peer (PS3.8 9.1.1 only
    starts with a TCP connection).

    - At most security.max_connections_per_address from one IP address;
    - at most node.max_connections in all: at the limit, a new connection replaces the
      oldest one that has not had its association accepted (a silent or slow peer), so
      that silent connections can never lock the configured PACS out; when every
      connection is associated, the new one is closed;
    - node.max_associations and security.max_associations_per_caller count only
      connections whose A-ASSOCIATE-RQ was accepted (see `request`).

    Closing is shutting the socket down: the connection's thread sees the end of the
    stream and ends the association. Every close is logged with the peer, at most once per
    peer and reason every LOG_EVERY_SECONDS, with the count of those not logged.
    """

    LOG_EVERY_SECONDS = 10.0

    def __init__(self, *, max_connections: int, max_per_address: int):
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._lock = threading.Lock()
        self._open: dict[int, Connection] = {}  # id(socket) -> connection
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    def admit(self, sock: socket.socket, peer: str) -> Connection | None:
        """Register a new connection, or close-and-log it and return None."""
        with self._lock:
            live = [c for c in self._open.values() if not c.closed]
            if sum(1 for c in live if c.peer == peer) >= self.max_per_address:
                refusal = f"security.max_connections_per_address ({self.max_per_address}) reached"
            elif len(live) >= self.max_connections:
                waiting = [c for c in live if c.calling_ae is None]
                if not waiting:
                    refusal = f"node.max_connections ({self.max_connections}) reached, all associated"
                else:
                    oldest = min(waiting, key=lambda c: c.accepted_at)
                    self._close(oldest, "connection_evicted", reason="node.max_connections reached: "
                                "the oldest connection without an association makes room")
                    refusal = None
            else:
                refusal = None
            if refusal is not None:
                self._log("connection_refused", peer, reason=refusal)
                return None
            connection = Connection(sock, peer, time.monotonic())
            self._open[id(sock)] = connection
            return connection

    def attach(self, sock: socket.socket, association) -> None:
        with self._lock:
            connection = self._open.get(id(sock))
            if connection is not None:
                connection.association = association

    def remove(self, sock: socket.socket, *, request_timeout: float | None = None) -> None:
        """Forget a connection that ended. With `request_timeout`, the connection never sent
        an A-ASSOCIATE-RQ: if it lasted that long, pynetdicom closed it for the silence
        (PS3.8 9.1.4, ARTIM), which is logged like our other closes."""
        with self._lock:
            connection = self._open.pop(id(sock), None)
            if connection is None or connection.closed or request_timeout is None:
                return
            lasted = time.monotonic() - connection.accepted_at
            if lasted >= 0.9 * request_timeout:
                self._log("association_request_timeout", connection.peer,
                          reason=f"no A-ASSOCIATE-RQ within node.network_timeout_seconds ({request_timeout:g})",
                          open_seconds=round(lasted, 1))

    def request(self, association, *, calling_ae: str, decide) -> Rejection | None:
        """Count the accepted associations (all, and from `calling_ae`) plus this one, and
        ask `decide(active_total, active_from_caller)`; record the association if accepted.
        Atomic, so two requests at once cannot both take the last slot."""
        with self._lock:
            associated = [c for c in self._open.values() if c.calling_ae is not None and not c.closed]
            rejection = decide(len(associated) + 1, sum(1 for c in associated if c.calling_ae == calling_ae) + 1)
            if rejection is None:
                for connection in self._open.values():
                    if connection.association is association:
                        connection.calling_ae = calling_ae
            return rejection

    def expire(self, *, max_age_seconds: float) -> None:
        """Close the connections open longer than `max_age_seconds` (node.max_association_seconds)."""
        now = time.monotonic()
        with self._lock:
            for connection in list(self._open.values()):
                if not connection.closed and now - connection.accepted_at > max_age_seconds:
                    self._close(connection, "association_time_limit",
                                reason=f"open longer than node.max_association_seconds ({max_age_seconds:g})")

    def open_count(self) -> int:
        with self._lock:
            return sum(1 for c in self._open.values() if not c.closed)

    def associated_count(self) -> int:
        """Open connections whose association was accepted (what node.max_associations counts)."""
        with self._lock:
            return sum(1 for c in self._open.values() if c.calling_ae is not None and not c.closed)

    def _close(self, connection: Connection, event: str, *, reason: str) -> None:
        connection.closed = True
        association = connection.association
        if association is not None and getattr(association, "is_established", False):
            # PS3.8 9.3.8: tell the peer (A-ABORT, source: service provider); its DUL thread
            # sends it. The connection is shut down shortly after in any case.
            association.acse.send_abort(0x02)
            threading.Timer(ABORT_GRACE_SECONDS, _shutdown, args=(connection.sock,)).start()
        else:
            _shutdown(connection.sock)
        self._log(event, connection.peer, reason=reason, calling_ae=connection.calling_ae,
                  open_seconds=round(time.monotonic() - connection.accepted_at, 1))

    def _log(self, event: str, peer: str, **fields) -> None:
        now = time.monotonic()
        last, suppressed = self._logged.get((event, peer), (float("-inf"), 0))
        if now - last < self.LOG_EVERY_SECONDS:
            self._logged[(event, peer)] = (last, suppressed + 1)
            return
        self._logged[(event, peer)] = (now, 0)
        if len(self._logged) > 10_000:  # many peers: forget the old entries
            self._logged = {k: v for k, v in self._logged.items() if now - v[0] < self.LOG_EVERY_SECONDS}
        log.warning(event, peer=peer, not_logged_since_last=suppressed, **fields)
