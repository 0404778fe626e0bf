"""DICOM over TLS (PS3.15 Annex B): the SSL contexts of the SCP and the SCU.

Profile: PS3.15 B.9/B.10 (BCP 195 TLS Secure Transport Connection Profiles, RFC 9325):
TLS 1.2 or later (``security.tls.minimum_version``), Python's default cipher list (ECDHE
with AES-GCM or ChaCha20 first; no RC4, 3DES, NULL or export suites), certificates
verified against ``security.tls.ca_certificates``. The older Basic/AES profiles
(TLS 1.0, PS3.15 B.1/B.3) are retired and refused.

- The SCP presents ``certificate`` and, with ``require_client_certificate``, accepts only
  clients whose certificate is signed by ``ca_certificates``.
- The SCU connects with TLS to destinations marked ``tls = true``, verifies the server's
  certificate (CA and host name) and presents ``certificate`` when one is configured.

Every file is loaded once at startup (`check_tls`), so a missing or bad file stops the
node with a ConfigError naming the key, instead of failing the first association.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.config import Config, DestinationConfig, TLSConfig
from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger("dicom_node.tls")

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
KEY = "security.tls"


class _ClientSocket(ssl.SSLSocket):
    """Keeps why TLS failed: pynetdicom only reports that it could not connect or was aborted."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (OSError, ValueError) as error:
            self.context.tls_errors.append(error)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # With TLS 1.3 the server checks our certificate after our side of the
        # handshake is done: its refusal arrives as an alert on the first read.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as error:
            self.context.tls_errors.append(error)
            raise


class ClientContext(ssl.SSLContext):
    """A client context that records its TLS failures in ``tls_errors``."""

    sslsocket_class = _ClientSocket

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT):
        self.tls_errors: list[Exception] = []


def _encrypted_key(*_args) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal (and hang under systemd).
    raise ConfigError(
        f"{KEY}.private_key: the key is encrypted; give the node an unencrypted key "
        "readable only by its user"
    )


def _require_file(path: Path, key: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{KEY}.{key}: {path} is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ConfigError(f"{KEY}.{key}: cannot read {path} ({error.strerror})") from None


def _load_chain(context: ssl.SSLContext, tls: TLSConfig) -> None:
    _require_file(tls.certificate, "certificate")
    _require_file(tls.private_key, "private_key")
    try:
        context.load_cert_chain(tls.certificate, tls.private_key, password=_encrypted_key)
    except ssl.SSLError as error:
        # OpenSSL does not say which file it could not use: try the certificate alone.
        try:
            ssl.create_default_context(cafile=str(tls.certificate))
        except ssl.SSLError:
            raise ConfigError(
                f"{KEY}.certificate: {tls.certificate} is not a PEM certificate ({describe_error(error)})"
            ) from None
        raise ConfigError(
            f"{KEY}.private_key: cannot use {tls.private_key} with {KEY}.certificate "
            f"({describe_error(error)})"
        ) from None


def _load_ca(context: ssl.SSLContext, tls: TLSConfig) -> None:
    _require_file(tls.ca_certificates, "ca_certificates")
    try:
        context.load_verify_locations(cafile=tls.ca_certificates)
    except ssl.SSLError as error:
        raise ConfigError(
            f"{KEY}.ca_certificates: {tls.ca_certificates} holds no usable PEM certificate "
            f"({describe_error(error)})"
        ) from None


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The SCP's context; raise ConfigError naming the key whose file is missing or bad."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.minimum_version]
    _load_chain(context, tls)
    if tls.require_client_certificate:
        # PS3.15 B.9: both peers authenticate with X.509 certificates.
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, tls)
    return context


def client_context(tls: TLSConfig) -> ClientContext:
    """The SCU's context: verifies the server (CA and host name), presents our certificate."""
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = TLS_VERSIONS[tls.minimum_version]
    if tls.ca_certificates is not None:
        _load_ca(context, tls)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None:
        _load_chain(context, tls)
    return context


def scp_context(config: Config) -> ssl.SSLContext | None:
    """The SCP's context when ``security.tls.enabled``, else None (plain TCP)."""
    return server_context(config.security.tls) if config.security.tls.enabled else None


def scu_tls_args(
    destination: DestinationConfig, tls: TLSConfig | None
) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` for `destination`: None unless ``tls = true``."""
    if not destination.tls:
        return None
    context = client_context(tls or TLSConfig())
    return context, destination.tls_server_name or destination.host


def check_tls(config: Config) -> None:
    """Load every TLS file the config names; raise ConfigError naming the first bad key."""
    scp_context(config)
    for destination in config.destinations:
        if destination.tls:
            scu_tls_args(destination, config.security.tls)


def describe_error(error: BaseException) -> str:
    """A short reason for a TLS failure, for logs and delivery errors."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    if isinstance(error, TimeoutError):
        return "no handshake within the network timeout"
    return f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"


def _subject_common_name(certificate: dict | None) -> str | None:
    for rdn in (certificate or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


def server_handshake(sock: ssl.SSLSocket, *, timeout: float | None, peer: str) -> bool:
    """Complete the TLS handshake of an accepted connection; log and return False on failure.

    Runs in the association's own thread, under `timeout`, so that a client that
    connects and says nothing cannot hold up the accept loop.
    """
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        sock.do_handshake()
        sock.settimeout(previous)
    except (OSError, ValueError) as error:
        log.warning("tls_handshake_failed", peer=peer, reason=describe_error(error))
        return False
    log.info(
        "tls_established",
        peer=peer,
        version=sock.version(),
        cipher=(sock.cipher() or ("?",))[0],
        client_certificate=_subject_common_name(sock.getpeercert()),
    )
    return True
