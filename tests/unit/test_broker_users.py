"""What `retailbus broker users` derives from service classes, and the TLS settings
(no broker here: the permissions are checked against a real RabbitMQ in
tests/integration/test_broker_users.py)."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner
from nameko.rpc import rpc

from routing import broker_user
from services.broker import credentials, users as broker_users
from services.broker.setup import render_config
from bus.consumer import reliable_handler
from bus.extensions import EventPublisher
from bus.publisher import AMQP_SSL_ENV, connection_params
from services.cli import main
from bus.settings import TlsSettings, retailbus_settings

pytestmark = pytest.mark.unit

CONFIG = {"AMQP_URI": "amqp://u:p@127.0.0.1:5682/retailbus", "RETAILBUS": {"root": "/tmp/rb"}}


class Pricing:
    name = "pricing"
    events = EventPublisher()

    @reliable_handler("store_agent", "pos.sale.v1")
    def on_sale(self, sale, event):
        pass

    @rpc
    def price(self, sku):
        return 1


def matches(regex: str, name: str) -> bool:
    return re.fullmatch(regex, name) is not None


def test_a_service_may_use_its_own_queues_and_exchange_and_delete_nothing_others_use():
    access, unknown = broker_users.derive(Pricing, CONFIG)
    configure, write, read = access.permissions()
    queue = "evt-store_agent-pos.sale.v1--pricing.on_sale"
    assert unknown == []
    # no configure on any exchange or handler queue (exchange.delete, queue.delete): the
    # setup step declares them, nameko's RPC exchange too; nameko declares its RPC queue itself
    for name in (queue, queue + ".retry.1000ms", queue + ".dlq", "pricing.events", "store_agent.events",
                 "retailbus.failed", "amq.default", "nameko-rpc"):
        assert not matches(configure, name), name
    assert matches(configure, "rpc-pricing") and ("exchange", "nameko-rpc", "topic") in access.declares
    assert matches(read, queue) and matches(read, "rpc-pricing")
    assert matches(write, "pricing.events") and matches(write, "retailbus.failed")
    assert not matches(write, "amq.default"), "the default exchange reaches every queue"
    for other in ("evt-store_agent-pos.sale.v1--erp.on_pos_sale", "rpc-erp", "erp.events", queue + "x"):
        assert not matches(configure, other) and not matches(read, other), other
    assert not matches(write, "store_agent.events") and not matches(write, "erp.events")
    topics = access.topic_permissions()
    failed_write, _ = topics["retailbus.failed"]  # failures go to its own retry queues and DLQ only
    assert matches(failed_write, queue + ".retry.1000ms") and matches(failed_write, queue + ".dlq")
    assert not matches(failed_write, queue) and not matches(failed_write, "evt-x--erp.on_pos_sale.dlq")
    assert "store_agent.events" not in topics  # it binds nothing itself
    assert ("handler", "store_agent.events", "topic", "pos.sale.v1", queue, (1.0, 5.0, 30.0), False) \
        in access.declares
    tw, tr = topics["nameko-rpc"]
    assert matches(tr, "pricing.*") and not matches(tr, "erp.*")
    assert matches(tw, "5f0c2a8e-64a6-4c2b-9d4e-0e7f3d1c2b1a") and not matches(tw, "erp.stock_level")


def test_overrides_add_to_what_is_derived_and_store_users_only_publish_pos():
    config = {**CONFIG, "RETAILBUS": {
        "root": "/tmp/rb", "services": {"pricing": {"module": "tests.unit.test_broker_users"}},
        "stores": [{"id": "S001"}], "broker": {"access": {"pricing": {"read": ["^extra$"]}}}}}
    settings = retailbus_settings(config)
    found = {c.name: c for c in broker_users.components(settings, config)}
    assert set(found) == {"pricing", "store-agent-S001", "store-S001"}
    assert matches(found["pricing"].access.permissions()[2], "extra")
    assert found["pricing"].user == "svc-pricing" and found["store-agent-S001"].user == "agent-S001"
    _, stock_read = found["store-agent-S001"].access.topic_permissions()["erp.events"]
    assert matches(stock_read, "erp.stock_changes.v1") and not matches(stock_read, "customer.updated.v1")
    agent_rpc, _ = found["store-agent-S001"].access.topic_permissions()["nameko-rpc"]
    assert matches(agent_rpc, "erp.stock_level") and matches(agent_rpc, "erp.shadow_compare")
    assert not matches(agent_rpc, "erp.post_sale"), "a store host must not post sales over RPC"
    agent_configure = found["store-agent-S001"].access.permissions()[0]
    assert matches(agent_configure, "rpc.reply-standalone_rpc_proxy-5f0c2a8e-64a6-4c2b-9d4e-0e7f3d1c2b1a")
    assert not matches(agent_configure, "nameko-rpc")
    assert not matches(found["store-agent-S001"].access.permissions()[1], "amq.default")
    store = found["store-S001"].access
    assert store.permissions() == ("^$", r"^(?:store_agent\.events)$", "^$")
    (exchange, (tw, tr)), = store.topic_permissions().items()
    assert exchange == "store_agent.events" and tr == "^$"
    assert matches(tw, "pos.sale.v1") and not matches(tw, "erp.stock_changed.v1")


def test_definitions_carry_salted_hashes_and_no_tags():
    c = broker_users.Component("erp", "svc-erp", Path("/nonexistent"), broker_users.Access(read={"q"}))
    defs = credentials.definitions([c], "retailbus", {"svc-erp": "s3cret"})
    user = defs["users"][0]
    assert user["tags"] == [] and "s3cret" not in json.dumps(defs)
    raw = base64.b64decode(user["password_hash"])
    assert raw[4:] == hashlib.sha256(raw[:4] + b"s3cret").digest()
    assert defs["permissions"] == [{"user": "svc-erp", "vhost": "retailbus", "configure": "^$",
                                    "write": "^$", "read": "^(?:q)$"}]


def test_up_uses_a_components_own_user_only_once_provisioned(tmp_path):
    settings = retailbus_settings({"RETAILBUS": {"root": str(tmp_path)}})
    bus = "amqp://retailbus:pw@127.0.0.1:5682/retailbus;amqp://retailbus:pw@127.0.0.1:5683/retailbus"
    assert credentials.own_uri(settings, bus, "erp") is None
    user, path = broker_users.identity(settings, "erp")
    credentials.save_password(path, user, "p/w")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert credentials.own_uri(settings, bus, "erp") == (
        "amqp://svc-erp:p%2Fw@127.0.0.1:5682/retailbus;amqp://svc-erp:p%2Fw@127.0.0.1:5683/retailbus")


def test_a_store_agent_logs_in_as_its_store_user_on_every_node_of_a_cluster(tmp_path):
    """Finding 4 of issue 17: on failover the forwarder must still be `store-S001`, and
    no node of the URI it is handed may carry the admin user or password."""
    admin = "amqp://retailbus:ADMINPW@127.0.0.11:5682/retailbus"
    bus = ";".join([admin, "amqp://retailbus:ADMINPW@127.0.0.12:5683/retailbus",
                    "amqps://retailbus:ADMINPW@[::1]:5684/retailbus"])
    path = tmp_path / "broker_user.json"
    path.write_text(json.dumps({"user": "store-S001", "password": "p@ss/w:rd"}))
    nodes = broker_user.store_uri(bus, path).split(";")
    assert nodes == ["amqp://store-S001:p%40ss%2Fw%3Ard@127.0.0.11:5682/retailbus",
                     "amqp://store-S001:p%40ss%2Fw%3Ard@127.0.0.12:5683/retailbus",
                     "amqps://store-S001:p%40ss%2Fw%3Ard@[::1]:5684/retailbus"]
    for node in nodes:  # what the forwarder's failover connects with, node by node
        params = connection_params(node, 5)
        assert (params["userid"], params["password"]) == ("store-S001", "p@ss/w:rd")
    assert "ADMINPW" not in broker_user.store_uri(bus, path) and "retailbus:" not in broker_user.store_uri(bus, path)


def test_dry_run_prints_permissions_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bus.yaml"
    config.write_text(json.dumps({"RETAILBUS": {"root": str(tmp_path), "services": {
        "pricing": {"module": "tests.unit.test_broker_users"}}}}))
    result = CliRunner().invoke(main, ["broker", "users", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "pricing: user svc-pricing" in result.output and "rpc\\-pricing" in result.output
    assert not (tmp_path / "var").exists()


def test_amqps_verifies_the_broker_with_the_configured_ca(monkeypatch):
    monkeypatch.setenv(AMQP_SSL_ENV, "{ca_certs: /etc/retailbus/ca.pem}")
    params = connection_params("amqps://u:p@broker.example.com:5671/retailbus", 5)
    assert params["ssl"] == {"ca_certs": "/etc/retailbus/ca.pem", "cert_reqs": ssl.CERT_REQUIRED,
                             "server_hostname": "broker.example.com"}
    assert connection_params("amqp://u:p@broker.example.com:5672/retailbus", 5)["ssl"] is False


def test_the_managed_node_gets_an_amqps_listener_when_configured():
    tls = TlsSettings(port=5692, certfile="/pki/server.pem", keyfile="/pki/server.key", cacertfile="/pki/ca.pem")
    text = render_config(5682, 15682, "retailbus", tls=tls)
    assert "listeners.ssl.default = 127.0.0.1:5692" in text
    assert "ssl_options.certfile = /pki/server.pem" in text and "ssl_options.verify = verify_peer" in text
    assert "listeners.ssl" not in render_config(5682, 15682, "retailbus")
