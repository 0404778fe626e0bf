"""node.reuse_port: several receiver processes listen on one port (SO_REUSEPORT)."""

from __future__ import annotations

import pytest

from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.queue import Queue
from dicom_node.receive import start_scp
from dicom_node.store import InstanceStore
from tests.integration.dcmtk import echoscu
from tests.integration.node_process import open_to_any_caller
from tests.receive.conftest import NODE_AE


def test_two_receivers_share_a_port_with_reuse_port_and_each_one_answers(tmp_path, make_node):
    config = parse_config(open_to_any_caller({"node": {
        "ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "first"), "reuse_port": True,
    }}), base_dir=tmp_path)
    queue = Queue(config.database_url)
    queue.migrate()
    first = start_scp(config, queue=queue, store=InstanceStore(config.node.data_dir))
    try:
        port = first.server_address[1]
        second = make_node(node={"port": port, "reuse_port": True})
        assert second.server.server_address[1] == port
    finally:
        first.shutdown()  # the port stays open: the second listener answers alone
        queue.close()
    answered = echoscu(port, NODE_AE)
    assert answered.ok, answered.output


def test_without_reuse_port_a_second_receiver_on_the_port_is_a_config_error(make_node):
    port = make_node().server.server_address[1]
    with pytest.raises(ConfigError, match=f"node.host/node.port: cannot listen on 127.0.0.1:{port}"):
        make_node(node={"port": port})
