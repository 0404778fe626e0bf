"""check_association_request: who may associate, and the A-ASSOCIATE-RJ fields for the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.receive.access import (
    AssociateDiagnostic,
    AssociateResult,
    AssociateSource,
    check_association_request,
)
from tests.integration.node_process import open_to_any_caller


def config(*, open_by_default: bool = True, **sections):
    base = {"node": {"ae_title": "NODE", "max_associations": 4}}
    data = base | sections
    return parse_config(open_to_any_caller(data) if open_by_default else data, base_dir=Path("."))


def check(cfg, *, calling="PACS", called="NODE", peer="10.0.0.5", total=1, from_caller=1):
    return check_association_request(
        cfg,
        calling_ae=calling,
        called_ae=called,
        peer=peer,
        active_total=total,
        active_from_caller=from_caller,
    )


def test_anyone_may_associate_only_when_allow_any_caller_is_set():
    assert check(config(security={"allow_any_caller": True}), calling="ANYONE") is None
    rejection = check(config(open_by_default=False), calling="ANYONE")
    assert rejection.diagnostic == AssociateDiagnostic.CALLING_AE_TITLE_NOT_RECOGNIZED


@pytest.mark.parametrize(
    "security, message",
    [
        ({}, "security.allowed_callers: empty, so nobody may send"),
        ({"allow_any_caller": True, "allowed_callers": [{"ae_title": "PACS"}]},
         "security.allow_any_caller: true, but security.allowed_callers lists callers"),
    ],
)
def test_the_scp_will_not_start_without_a_stated_access_policy(security, message, tmp_path):
    from dicom_node.receive import start_scp

    cfg = config(open_by_default=False, security=security,
                 node={"ae_title": "NODE", "port": 0, "data_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as error:
        start_scp(cfg, queue=None, store=None)
    assert str(error.value).startswith(message)


def test_open_access_and_callers_without_a_host_are_logged_as_warnings(log_output):
    from dicom_node.receive.access import check_access_config

    check_access_config(config(security={"allow_any_caller": True}))
    check_access_config(config(security={"allowed_callers": [{"ae_title": "PACS"}, {"ae_title": "MG", "host": "10.0.0.0/24"}]}))
    events = [json.loads(line) for line in log_output().splitlines()]
    assert [e["event"] for e in events] == ["any_caller_allowed", "allowed_caller_without_host"]
    assert events[1]["allowed_ae"] == "PACS"


def test_wrong_called_ae_title():
    rejection = check(config(), called="OTHER")
    assert (rejection.result, rejection.source, rejection.diagnostic) == (
        AssociateResult.REJECTED_PERMANENT,
        AssociateSource.SERVICE_USER,
        AssociateDiagnostic.CALLED_AE_TITLE_NOT_RECOGNIZED,
    )
    assert "OTHER" in rejection.reason


def test_called_ae_title_not_required():
    assert check(config(security={"require_called_ae_title": False}), called="OTHER") is None


@pytest.mark.parametrize(
    "callers, calling, peer, allowed",
    [
        ([{"ae_title": "PACS"}], "PACS", "10.0.0.5", True),
        ([{"ae_title": "PACS"}], "MODALITY", "10.0.0.5", False),
        ([{"ae_title": "PACS", "host": "10.0.0.5"}], "PACS", "10.0.0.5", True),
        ([{"ae_title": "PACS", "host": "10.0.0.5"}], "PACS", "10.0.0.6", False),
        ([{"ae_title": "PACS", "host": "10.0.0.0/24"}], "PACS", "10.0.0.200", True),
        ([{"ae_title": "PACS", "host": "10.0.0.0/24"}], "PACS", "10.0.1.1", False),
        ([{"ae_title": "PACS", "host": "10.0.0.5"}], "PACS", "::ffff:10.0.0.5", True),
        ([{"ae_title": "PACS", "host": "localhost"}], "PACS", "127.0.0.1", True),
        ([{"ae_title": "A", "host": "10.0.0.9"}, {"ae_title": "PACS"}], "PACS", "10.0.0.5", True),
    ],
)
def test_allowed_callers(callers, calling, peer, allowed):
    rejection = check(config(security={"allowed_callers": callers}), calling=calling, peer=peer)
    if allowed:
        assert rejection is None
    else:
        assert rejection.diagnostic == AssociateDiagnostic.CALLING_AE_TITLE_NOT_RECOGNIZED
        assert rejection.result == AssociateResult.REJECTED_PERMANENT
        assert calling in rejection.reason and peer in rejection.reason


def test_association_limits_are_transient_rejections():
    cfg = config(security={"max_associations_per_caller": 2})
    assert check(cfg, total=4, from_caller=2) is None
    for rejection in (check(cfg, total=5, from_caller=1), check(cfg, total=3, from_caller=3)):
        assert (rejection.result, rejection.source, rejection.diagnostic) == (
            AssociateResult.REJECTED_TRANSIENT,
            AssociateSource.SERVICE_PROVIDER_PRESENTATION,
            AssociateDiagnostic.LOCAL_LIMIT_EXCEEDED,
        )


def test_build_ae_offers_mammography_classes_in_every_syntax():
    from pynetdicom import _config
    from pynetdicom.sop_class import Verification

    from dicom_node.receive.server import (
        MAX_PDU_BYTES,
        STORAGE_SOP_CLASSES,
        TRANSFER_SYNTAXES,
        build_ae,
    )

    ae = build_ae(config())
    offered = {cx.abstract_syntax: set(cx.transfer_syntax) for cx in ae.supported_contexts}
    assert set(offered) == {Verification, *STORAGE_SOP_CLASSES}
    for sop_class in STORAGE_SOP_CLASSES:
        assert offered[sop_class] == set(TRANSFER_SYNTAXES)
    assert len(ae.supported_contexts) <= 128  # pynetdicom's limit
    assert ae.maximum_pdu_size == MAX_PDU_BYTES
    # Twice node.max_connections: ours count associations (handle_requested) and connections
    # (ConnectionTable); pynetdicom's also counts the threads of connections closed to make room.
    assert ae.maximum_associations == 2 * 64
    assert _config.STORE_RECV_CHUNKED_DATASET is False  # the node spools data sets itself (receive.spool)
