"""`retailbus broker users` against a real RabbitMQ: one untagged user per component,
each service runs as its own user, and the broker refuses what is not its own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import amqp
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from demo.legacy_erp.schema import DEMO_ON_HAND, create_schema, engine_for, seed_demo_data
from routing import broker_user, stock_cache
from services.broker import credentials, users as broker_users
from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connection_params
from services.broker.node import ManagedBroker
from services.broker.setup import free_ports
from services.cli import main
from bus.settings import load_config, retailbus_settings
from tests.integration.support import legacy_sale, nameko_run, queue_state, stop, wait_for, write_config
from tests.integration.test_erp_posting import sale_event
from tests.integration.test_up import headers_for, healthy, post

pytestmark = pytest.mark.integration

SERVICES = {"erp": {"module": "services.erp"}, "files": {"module": "services.files"},
            "route_guard": {"module": "routing.guard"}, "dlq": {"module": "services.dlq"},
            "journal": {"module": "services.journal"}, "reconcile": {"module": "services.reconcile"}}
SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")


@pytest.fixture
def provisioned(broker, tmp_path, monkeypatch):
    """A config on the session broker with every shipped service and two stores, its users
    created by the CLI; yields (config path, {component name: Component}, CLI output)."""
    monkeypatch.delenv("RETAILBUS_AMQP_URI", raising=False)
    config = write_config(
        tmp_path, broker={"home": str(broker.home), "port": broker.port, "dist_port": broker.dist_port,
                          "management_port": broker.management_port},
        services=SERVICES, stores=[{"id": "S001"}, {"id": "S002", "http": "127.0.0.1:8102"}])
    copy_shipped_config(config)
    result = CliRunner().invoke(main, ["broker", "users", "--config", str(config)])
    assert result.exit_code == 0, result.output
    loaded = load_config(config)
    found = broker_users.components(retailbus_settings(loaded, config), loaded)
    return config, {c.name: c for c in found}, result.output


def copy_shipped_config(config: Path) -> None:
    """filedrops.yaml and the rest beside the test's bus.yaml: services read them at setup."""
    for shipped in (Path(__file__).parents[2] / "config").glob("*.yaml"):
        if not config.with_name(shipped.name).exists():
            shutil.copy(shipped, config.with_name(shipped.name))


def delete_queues_since(broker, before: set[str]) -> None:
    conn = amqp.Connection(**connection_params(broker.uri(), 5))
    conn.connect()
    try:
        ch = conn.channel()
        for queue in {q["name"] for q in broker.queues()} - before:
            ch.queue_delete(queue)
    finally:
        conn.collect()


def uri_of(broker, component) -> str:
    return credentials.component_uri(broker.uri(), component)


def refused(uri: str, action) -> str:
    """The broker's refusal of `action(channel)` (it closes the channel with ACCESS_REFUSED)."""
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        with pytest.raises(amqp.exceptions.AccessRefused) as info:
            action(conn.channel())
        return str(info.value)
    finally:
        conn.collect()


@pytest.mark.timeout(300)
def test_every_component_gets_its_own_untagged_user_and_no_password_is_printed(broker, provisioned):
    config, found, output = provisioned
    expected = {"erp", "files", "route_guard", "dlq", "journal", "reconcile",
                "store-agent-S001", "store-S001", "store-agent-S002", "store-S002"}
    assert set(found) == expected
    rows = {r["user"]: r for r in json.loads(broker.rabbitmqctl("-q", "list_users", "--formatter", "json"))}
    for c in found.values():
        assert rows[c.user]["tags"] in ([], ""), f"{c.user} has tags {rows[c.user]['tags']}"
        assert oct(c.credentials.stat().st_mode & 0o777) == "0o600"
        password = json.loads(c.credentials.read_text())["password"]
        assert password not in output
        assert f"user {c.user}" in output
    assert all(not r["tags"] for r in rows.values()), "no user of the bus is an administrator"
    perms = json.loads(broker.rabbitmqctl("-q", "list_permissions", "-p", broker.vhost, "--formatter", "json"))
    erp = next(p for p in perms if p["user"] == "svc-erp")
    assert "rpc\\-erp" in erp["read"] and "rpc\\-files" not in erp["read"]
    assert next(p for p in perms if p["user"] == "store-S001")["read"] == "^$"

    shown = CliRunner().invoke(main, ["broker", "users", "--config", str(config), "--show"])
    assert shown.exit_code == 0, shown.output
    password = json.loads(found["erp"].credentials.read_text())["password"]  # kept, not re-keyed
    assert f"svc-erp:{password}@" in shown.output


@pytest.mark.timeout(300)
def test_erp_runs_as_its_own_user_and_posts_a_sale_from_a_store_user(broker, provisioned, tmp_path, request):
    config, found, _ = provisioned
    before = {q["name"] for q in broker.queues()}
    request.addfinalizer(lambda: delete_queues_since(broker, before))  # e.g. rpc-erp: others test "no erp"
    engine = engine_for(load_config(config)["LEGACY_DB_URI"])
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    erp_uri = uri_of(broker, found["erp"])
    process = nameko_run(config, "services.erp", tmp_path / "erp.log", RETAILBUS_AMQP_URI=erp_uri)
    try:
        assert wait_for(lambda: queue_state(broker.uri(), SALES_QUEUE)[1] == 1, timeout=90), \
            (tmp_path / "erp.log").read_text()[-3000:]
        # RPC with no configure on nameko-rpc on either side: the store agent's stock question
        answer = stock_cache.ask_erp(uri_of(broker, found["store-agent-S001"]), "S001", "100001", timeout=30)
        assert answer["on_hand"] == DEMO_ON_HAND
        store_uri = broker_user.store_uri(broker.uri(), found["store-S001"].credentials)
        publisher = ConfirmingPublisher(store_uri)
        event = sale_event("LP-0001")
        publisher.publish(event_message(event, "store_agent.events", user_id="store-S001"))
        publisher.close()

        def posted():
            with engine.connect() as conn:
                return conn.execute(text('SELECT count(*) FROM "SLS_HDR" WHERE "POS_TXN_ID" = :t'),
                                    {"t": "LP-0001"}).scalar() == 1
        assert wait_for(posted, timeout=60), (tmp_path / "erp.log").read_text()[-3000:]
        assert "ACCESS_REFUSED" not in (tmp_path / "erp.log").read_text()
    finally:
        stop(process)
        engine.dispose()


@pytest.mark.timeout(300)
def test_a_component_cannot_touch_what_is_not_its_own(broker, provisioned, request):
    _, found, _ = provisioned
    before = {q["name"] for q in broker.queues()}
    request.addfinalizer(lambda: delete_queues_since(broker, before))
    admin = amqp.Connection(**connection_params(broker.uri(), 5))
    admin.connect()
    try:
        ch = admin.channel()
        topology.declare_handler_queues(ch, "store_agent.events", "pos.sale.v1", SALES_QUEUE, [1],
                                        single_active=True)  # as erp declares it (ordered)
        topology.declare_exchange(ch, "retailbus.routes", "fanout")
        ch.queue_declare("routes.S002", durable=True, auto_delete=False)
    finally:
        admin.collect()
    files, erp, agent = (uri_of(broker, found[n]) for n in ("files", "erp", "store-agent-S001"))

    assert SALES_QUEUE in refused(files, lambda ch: ch.basic_get(SALES_QUEUE))  # another service's queue
    assert SALES_QUEUE in refused(files, lambda ch: ch.queue_purge(SALES_QUEUE))
    assert SALES_QUEUE in refused(files, lambda ch: ch.queue_delete(SALES_QUEUE))
    assert "routes.S002" in refused(agent, lambda ch: ch.basic_consume("routes.S002", callback=print))
    # the setup step binds: erp may neither bind nor unbind its queue, nor delete an exchange others use
    assert SALES_QUEUE in refused(erp, lambda ch: ch.queue_bind(SALES_QUEUE, "store_agent.events", "pos.#"))
    assert SALES_QUEUE in refused(erp, lambda ch: ch.queue_unbind(SALES_QUEUE, "store_agent.events", "pos.sale.v1"))
    for exchange in ("store_agent.events", "erp.events", "journal.events", "retailbus.failed", "nameko-rpc"):
        assert exchange in refused(erp, lambda ch: ch.exchange_delete(exchange))
    # nor may an RPC caller delete the RPC exchange (the setup step declared it)
    assert "nameko-rpc" in refused(agent, lambda ch: ch.exchange_delete("nameko-rpc"))
    assert SALES_QUEUE in refused(erp, lambda ch: ch.queue_delete(SALES_QUEUE))
    # and may not publish to another service's exchange
    assert "files.events" in refused(erp, lambda ch: ch.basic_publish_confirm(
        amqp.Message(b"{}"), "files.events", "event.batch.v1", timeout=5))
    # a store's feed user cannot publish sales: only the store's own publishing user may
    assert "store_agent.events" in refused(agent, lambda ch: ch.basic_publish_confirm(
        amqp.Message(b"{}"), "store_agent.events", "pos.sale.v1", timeout=5))


@pytest.mark.timeout(420)
def test_up_runs_every_component_as_its_own_user(tmp_path, monkeypatch):
    """`retailbus broker users`, then `retailbus up`: a sale flows from the till to the ERP
    and every connection on the broker belongs to a component's own user."""
    monkeypatch.delenv("RETAILBUS_AMQP_URI", raising=False)
    mq, dist, mgmt, agent_port, erp_port = free_ports(5)
    config = write_config(
        tmp_path, broker={"home": "var/broker", "port": mq, "dist_port": dist, "management_port": mgmt},
        retry={"delays": [0.5, 1]}, services=SERVICES,
        stores=[{"id": "S001", "http": f"127.0.0.1:{agent_port}"}], agent={"auth_required": False},
        legacy_erp={"http": f"127.0.0.1:{erp_port}"})
    copy_shipped_config(config)
    broker = ManagedBroker(tmp_path / "var" / "broker", port=mq, dist_port=dist, management_port=mgmt)
    up, log = None, tmp_path / "up.log"
    try:
        for args in (["broker", "start"], ["broker", "users"]):
            result = CliRunner().invoke(main, [*args, "--config", str(config)])
            assert result.exit_code == 0, result.output
        up = subprocess.Popen([str(Path(sys.executable).with_name("retailbus")), "up", "--config", str(config)],
                              env=dict(os.environ), cwd=tmp_path, stdout=log.open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
        agent = f"http://127.0.0.1:{agent_port}"
        assert wait_for(lambda: healthy(f"{agent}/healthz") or up.poll() is not None, timeout=180), \
            log.read_text()[-3000:]
        assert up.poll() is None, log.read_text()[-3000:]
        assert post(f"{agent}/erp/sales", legacy_sale("OWN-0001"))["STATUS"] == "OK"
        assert wait_for(lambda: headers_for(tmp_path / "var" / "legacy_erp.db", "OWN-0001"), timeout=60), \
            log.read_text()[-3000:]

        def connected_users():
            rows = json.loads(broker.rabbitmqctl("-q", "list_connections", "user", "--formatter", "json") or "[]")
            return {r["user"] for r in rows}
        # dlq samples and route_guard broadcasts on short connections of their own
        consumers = {"svc-erp", "svc-files", "svc-journal", "svc-reconcile", "agent-S001", "store-S001"}
        assert wait_for(lambda: connected_users() >= consumers, timeout=60), connected_users()
        own = {f"svc-{name}" for name in SERVICES} | {"agent-S001", "store-S001"}
        assert connected_users() <= own, "a component still connects as the bus's own user"
        assert "ACCESS_REFUSED" not in log.read_text()
    finally:
        if up is not None:
            stop(up, timeout=120)
        broker.stop()
