"""TLS settings: incomplete sections and unusable files stop the node naming the key."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.tls import (
    check_tls,
    client_context,
    scp_context,
    scu_tls_args,
    server_context,
)
from tests.tls.conftest import tls_section


def config_with(tmp_path: Path, tls: dict, destinations: list[dict] = ()):
    return parse_config(
        {"security": {"tls": tls}, "destinations": list(destinations)}, base_dir=tmp_path
    )


@pytest.mark.parametrize(
    "tls, message",
    [
        ({"enabled": True}, "enabled = true needs certificate and private_key"),
        ({"certificate": "a.crt"}, "certificate and private_key must be set together"),
        ({"require_client_certificate": True, "ca_certificates": "ca.crt"}, "needs enabled = true"),
        (
            {"enabled": True, "certificate": "a.crt", "private_key": "a.key", "require_client_certificate": True},
            "needs ca_certificates",
        ),
        ({"minimum_version": "1.1"}, "security.tls.minimum_version"),
        ({"enable": True}, "security.tls.enable: unknown key"),
    ],
)
def test_incomplete_tls_sections_are_config_errors(tmp_path, tls, message):
    with pytest.raises(ConfigError) as error:
        config_with(tmp_path, tls)
    assert "security.tls" in str(error.value)
    assert message in str(error.value)


def test_relative_tls_paths_resolve_against_the_config_folder(tmp_path):
    config = config_with(tmp_path, {"enabled": True, "certificate": "tls/node.crt", "private_key": "tls/node.key"})
    assert config.security.tls.certificate == (tmp_path / "tls" / "node.crt").resolve()
    assert config.security.tls.private_key == (tmp_path / "tls" / "node.key").resolve()


def test_a_complete_tls_config_loads_and_sets_tls_1_2_minimum(tmp_path, pki):
    config = config_with(tmp_path, tls_section(pki))
    check_tls(config)
    context = scp_context(config)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    relaxed = server_context(config_with(tmp_path, tls_section(pki, require_client_certificate=False)).security.tls)
    assert relaxed.verify_mode == ssl.CERT_NONE
    strict = server_context(config_with(tmp_path, tls_section(pki, minimum_version="1.3")).security.tls)
    assert strict.minimum_version == ssl.TLSVersion.TLSv1_3


def test_without_tls_the_scp_has_no_context(tmp_path):
    assert scp_context(config_with(tmp_path, {})) is None


@pytest.mark.parametrize(
    "key, make_bad",
    [
        ("certificate", lambda pki, tmp: tmp / "missing.crt"),
        ("private_key", lambda pki, tmp: tmp / "missing.key"),
        ("ca_certificates", lambda pki, tmp: tmp / "missing-ca.crt"),
        ("certificate", lambda pki, tmp: _write(tmp / "garbage.crt", "not a certificate\n")),
        ("private_key", lambda pki, tmp: pki.client.private_key),  # does not match the certificate
        ("private_key", lambda pki, tmp: pki.encrypted_key),
        ("ca_certificates", lambda pki, tmp: _write(tmp / "empty-ca.crt", "")),
        ("certificate", lambda pki, tmp: tmp),  # a folder
    ],
)
def test_unusable_tls_files_are_config_errors_naming_the_key(tmp_path, pki, key, make_bad):
    config = config_with(tmp_path, tls_section(pki, **{key: str(make_bad(pki, tmp_path))}))
    with pytest.raises(ConfigError) as error:
        check_tls(config)
    assert str(error.value).startswith(f"security.tls.{key}: ")


def test_encrypted_keys_are_refused_without_prompting(tmp_path, pki):
    config = config_with(tmp_path, tls_section(pki, private_key=str(pki.encrypted_key)))
    with pytest.raises(ConfigError, match="security.tls.private_key: the key is encrypted"):
        check_tls(config)


def test_tls_destinations_are_checked_at_startup_too(tmp_path, pki):
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 2762, "tls": True}
    config = config_with(tmp_path, {"ca_certificates": str(tmp_path / "nope.crt")}, [destination])
    with pytest.raises(ConfigError, match="security.tls.ca_certificates: .*nope.crt is not a file"):
        check_tls(config)
    # The same destination without TLS needs no TLS file.
    check_tls(config_with(tmp_path, {"ca_certificates": str(tmp_path / "nope.crt")}, [{**destination, "tls": False}]))


def test_scu_tls_args_verify_the_server_by_host_or_tls_server_name(tmp_path, pki):
    base = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 2762}
    config = config_with(
        tmp_path,
        {"certificate": str(pki.client.certificate), "private_key": str(pki.client.private_key),
         "ca_certificates": str(pki.ca)},
        [
            {**base, "tls": True},
            {**base, "name": "named", "tls": True, "tls_server_name": "pacs.example"},
            {**base, "name": "plain"},
        ],
    )  # fmt: skip
    tls = config.security.tls
    context, server_name = scu_tls_args(config.destination("pacs"), tls)
    assert server_name == "10.0.0.5"
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert scu_tls_args(config.destination("named"), tls)[1] == "pacs.example"
    assert scu_tls_args(config.destination("plain"), tls) is None
    assert client_context(tls).minimum_version == ssl.TLSVersion.TLSv1_2


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
