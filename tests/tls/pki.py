"""Throwaway certificates for the TLS tests, made with the `openssl` command line.

A test CA, a server certificate for localhost/127.0.0.1 (subjectAltName), a client
certificate, and a second CA that the node does not trust, with its own client
certificate. RSA 2048 with SHA-256: what BCP 195 (PS3.15 B.9) expects and what dcmtk's
default profile accepts. Nothing here is valid for more than two days.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class KeyPair:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the trusted CA's certificate
    server: KeyPair  # CN=localhost, SAN DNS:localhost, IP:127.0.0.1; signed by the CA
    client: KeyPair  # CN=TEST MODALITY; signed by the CA
    other_ca: Path  # a CA nobody trusts
    stranger: KeyPair  # a client certificate signed by other_ca
    encrypted_key: Path  # the client's key, encrypted with a passphrase


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes", "-days", DAYS,
        "-keyout", pair.private_key, "-out", pair.certificate, "-subj", f"/CN={name} (dicom-node tests)",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def _issue(folder: Path, name: str, ca: KeyPair, *, common_name: str, extensions: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    request = folder / f"{name}.csr"
    extension_file = folder / f"{name}.ext"
    extension_file.write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-sha256", "-nodes",
        "-keyout", pair.private_key, "-out", request, "-subj", f"/CN={common_name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca.certificate, "-CAkey", ca.private_key,
        "-CAcreateserial", "-sha256", "-days", DAYS, "-out", pair.certificate, "-extfile", extension_file,
    )  # fmt: skip
    return pair


SERVER_EXTENSIONS = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth,clientAuth\n"
    "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
)
CLIENT_EXTENSIONS = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    other_ca = _ca(folder, "other-ca")
    client = _issue(folder, "client", ca, common_name="TEST MODALITY", extensions=CLIENT_EXTENSIONS)
    encrypted = folder / "client-encrypted.key"
    _openssl("pkey", "-in", client.private_key, "-aes256", "-passout", "pass:secret", "-out", encrypted)
    return Pki(
        ca=ca.certificate,
        server=_issue(folder, "server", ca, common_name="localhost", extensions=SERVER_EXTENSIONS),
        client=client,
        other_ca=other_ca.certificate,
        stranger=_issue(folder, "stranger", other_ca, common_name="STRANGER", extensions=CLIENT_EXTENSIONS),
        encrypted_key=encrypted,
    )
