"""A cluster URI (`amqp://…;amqp://…`): clients take its nodes in turn, nothing
prints its passwords, and the local cluster's layout follows bus.yaml."""
from __future__ import annotations

import contextlib
import json
import socket

import pytest
from click.testing import CliRunner

from services.broker.node import mask_uri, resolve_amqp_uri
from services.broker.cluster import BrokerCluster, cluster_home
from services.broker.setup import BrokerError
from bus.publisher import cluster_nodes, connect, connection_params
from services.cli.broker import broker
from bus.settings import ConfigError, retailbus_settings

pytestmark = pytest.mark.unit

URI = "amqp://rb:s3cr%2Ft@127.0.0.1:5701/retailbus;amqp://rb:s3cr%2Ft@127.0.0.1:5702/retailbus"


def test_cluster_nodes_split_on_semicolons():
    assert cluster_nodes(URI + ";") == URI.split(";")
    assert cluster_nodes("amqp://h/v") == ["amqp://h/v"]
    with pytest.raises(ValueError):
        cluster_nodes(" ; ")


def test_connection_params_take_the_nodes_in_turn():
    hosts = [connection_params(URI, 1)["host"] for _ in range(4)]
    assert sorted(hosts[:2]) == ["127.0.0.1:5701", "127.0.0.1:5702"]
    assert hosts[2:] == hosts[:2]
    params = connection_params(URI, 1)
    assert (params["userid"], params["password"], params["virtual_host"]) == ("rb", "s3cr/t", "retailbus")


def test_connect_tries_every_node_then_raises_the_last_error():
    """Two nodes that take the TCP connection but never speak AMQP: each must have been
    dialled once (its connection waits in the listen backlog) before connect gives up."""
    servers = [socket.create_server(("127.0.0.1", 0), backlog=4) for _ in range(2)]
    try:
        uri = ";".join(f"amqp://u:p@127.0.0.1:{s.getsockname()[1]}/v" for s in servers)
        with pytest.raises(OSError):
            connect(uri, 1)
        dialled = []
        for server in servers:
            server.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                server.accept()[0].close()
                dialled.append(server.getsockname()[1])
        assert dialled == [s.getsockname()[1] for s in servers]
    finally:
        for server in servers:
            server.close()


def test_every_password_of_a_cluster_uri_is_masked():
    assert mask_uri(URI) == ("amqp://rb:***@127.0.0.1:5701/retailbus;"
                             "amqp://rb:***@127.0.0.1:5702/retailbus")


def test_queue_type_is_validated(tmp_path):
    assert retailbus_settings({}).queue_type == "classic"
    assert retailbus_settings({"RETAILBUS": {"queue_type": "quorum"}}).queue_type == "quorum"
    with pytest.raises(ConfigError, match="queue_type"):
        retailbus_settings({"RETAILBUS": {"queue_type": "mirrored"}})


def provisioned(tmp_path, nodes=3):
    """Settings for a cluster in tmp_path whose nodes have credentials (never started)."""
    settings = retailbus_settings({"RETAILBUS": {
        "root": str(tmp_path), "broker": {"port": 47001, "dist_port": 47101,
                                          "management_port": 47201, "nodes": nodes}}})
    cluster = BrokerCluster.from_settings(settings)
    for node in cluster.nodes:
        node.home.mkdir(parents=True)
        node.layout.credentials.write_text(json.dumps({"user": "retailbus", "password": "pw"}))
    return settings, cluster


def test_cluster_layout_follows_the_broker_settings(tmp_path):
    settings, cluster = provisioned(tmp_path)
    assert cluster.home == tmp_path / "var" / "broker-cluster" == cluster_home(settings)
    assert [(n.port, n.dist_port, n.management_port) for n in cluster.nodes] == [
        (47001, 47101, 47201), (47002, 47102, 47202), (47003, 47103, 47203)]
    assert [n.home.name for n in cluster.nodes] == ["node1", "node2", "node3"]
    assert len({n.node for n in cluster.nodes}) == 3
    assert cluster.uri() == ";".join(f"amqp://retailbus:pw@127.0.0.1:{p}/retailbus"
                                     for p in (47001, 47002, 47003))
    assert not cluster.is_running() and cluster.members() == []


def test_services_use_the_cluster_uri_when_nodes_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("RETAILBUS_AMQP_URI", raising=False)
    settings, cluster = provisioned(tmp_path)
    assert resolve_amqp_uri({"AMQP_URI": ""}, settings) == cluster.uri()


def test_a_cluster_needs_two_nodes(tmp_path):
    with pytest.raises(BrokerError, match="at least 2"):
        BrokerCluster(tmp_path, [(1, 2, 3)])


def test_cli_uri_and_status_of_a_stopped_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("RETAILBUS_AMQP_URI", raising=False)
    settings, cluster = provisioned(tmp_path)
    config = tmp_path / "config" / "bus.yaml"
    config.parent.mkdir()
    config.write_text(f"RETAILBUS:\n  root: {tmp_path}\n  broker: {{port: 47001, dist_port: 47101, "
                      "management_port: 47201}\n")
    runner = CliRunner()
    res = runner.invoke(broker, ["uri", "--config", str(config), "--nodes", "3"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == mask_uri(cluster.uri()) and "pw" not in res.output
    res = runner.invoke(broker, ["status", "--config", str(config), "--nodes", "3"])
    assert res.exit_code == 1
    assert "0 of 3 nodes running" in res.output and res.output.count("not running") == 3
