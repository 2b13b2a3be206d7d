"""Store S002's real broker credentials try every way to post a sale for store S001
(issue 17, finding 1): each is refused by the broker or parked in the sales DLQ
with a clear error and counted, and nothing is posted for S001 in the legacy ERP.

The users are created by `retailbus broker users` on the session broker; the erp
runs as its own user `svc-erp` in a real process.
"""
from __future__ import annotations

import json
import urllib.request

import amqp
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing import broker_user
from routing.legacy_payload import sale_from_legacy
from bus import topology
from bus.broker_uri import with_user
from bus.constants import H_STORE, H_USER
from bus.publisher import connection_params
from services.broker.setup import free_ports
from services.cli import main
from bus.settings import load_config
from tests.integration.support import legacy_sale, nameko_run, queue_state, stop, wait_for
from tests.integration.test_broker_users import SALES_QUEUE, delete_queues_since, provisioned  # noqa: F401

pytestmark = pytest.mark.chaos

EXCHANGE = "store_agent.events"
DLQ = topology.dead_letter_queue(SALES_QUEUE)


def sale(txn_id: str, store: str) -> CloudEvent:
    return CloudEvent.new("pos.sale.v1", f"store/{store}/pos/07", sale_from_legacy(legacy_sale(txn_id, store=store)),
                          subject=txn_id, idempotencykey=f"pos.sale.v1:{store}:{txn_id}")


class As:
    """A raw py-amqp connection as one user: every attempt on a channel of its own."""

    def __init__(self, uri: str):
        self.conn = amqp.Connection(**connection_params(uri, 5), confirm_publish=True)
        self.conn.connect()

    def publish(self, event: CloudEvent, exchange: str, key: str | None = None, **props) -> str | None:
        """None when the broker took the message, else its refusal."""
        channel = self.conn.channel()
        try:
            channel.basic_publish(amqp.Message(event.to_json(), delivery_mode=2, message_id=event.id,
                                               content_type="application/cloudevents+json", **props),
                                  exchange, key or event.type, mandatory=True, confirm_timeout=10)
            return None
        except (amqp.exceptions.AccessRefused, amqp.exceptions.PreconditionFailed, amqp.exceptions.NotFound) as exc:
            return str(exc)
        finally:
            if channel.is_open:
                channel.close()

    def close(self):
        self.conn.collect()


def metric(port: int, name: str) -> dict[str, float]:
    """label text -> value of `name` on a metrics endpoint."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split("{", 1)[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
            for line in body.splitlines() if line.startswith(name + "{")}


@pytest.mark.timeout(300)
def test_a_store_cannot_post_for_another_store_by_any_route(broker, provisioned, tmp_path, request):  # noqa: F811
    config, found, _ = provisioned
    before = {q["name"] for q in broker.queues()}
    request.addfinalizer(lambda: delete_queues_since(broker, before))
    engine = engine_for(load_config(config)["LEGACY_DB_URI"])
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    request.addfinalizer(engine.dispose)
    [port] = free_ports(1)
    log = tmp_path / "erp.log"
    erp = nameko_run(config, "services.erp", log, RETAILBUS_AMQP_URI=with_user(
        broker.uri(), "svc-erp", json.loads(found["erp"].credentials.read_text())["password"]),
        RETAILBUS_METRICS_PORT=str(port))
    request.addfinalizer(lambda: stop(erp))
    assert wait_for(lambda: queue_state(broker.uri(), SALES_QUEUE)[1] == 1, timeout=90), log.read_text()[-3000:]

    s002 = As(broker_user.store_uri(broker.uri(), found["store-S002"].credentials))
    request.addfinalizer(s002.close)
    agent = As(with_user(broker.uri(), "agent-S002",
                                     json.loads(found["store-agent-S002"].credentials.read_text())["password"]))
    request.addfinalizer(agent.close)

    # refused by the broker
    refused = {
        "user_id of S001": s002.publish(sale("ID-01", "S001"), EXCHANGE, user_id="store-S001"),
        "default exchange to the erp queue": s002.publish(sale("ID-02", "S001"), "", SALES_QUEUE,
                                                          user_id="store-S002"),
        "a key not a store's": s002.publish(sale("ID-03", "S001"), EXCHANGE, "erp.sale_posted.v1",
                                            user_id="store-S002"),
        "another exchange": s002.publish(sale("ID-04", "S001"), "erp.events", "pos.sale.v1", user_id="store-S002"),
        "the retry ladder": s002.publish(sale("ID-05", "S001"), topology.FAILED_EXCHANGE,
                                         topology.retry_queue(SALES_QUEUE, 1), user_id="store-S002"),
        "agent: default exchange": agent.publish(sale("ID-06", "S001"), "", SALES_QUEUE),
        "agent: the sales exchange": agent.publish(sale("ID-07", "S001"), EXCHANGE),
        "agent: the retry ladder": agent.publish(sale("ID-08", "S001"), topology.FAILED_EXCHANGE,
                                                 topology.retry_queue(SALES_QUEUE, 1)),
        "agent: erp.post_sale over RPC": agent.publish(sale("ID-09", "S001"), "nameko-rpc", "erp.post_sale"),
    }
    assert {what: why for what, why in refused.items() if why is None} == {}, "the broker took these"

    # taken by the broker (the store may publish sales), parked by the erp
    parked = {
        "ID-11": s002.publish(sale("ID-11", "S001"), EXCHANGE, user_id="store-S002"),
        "ID-12": s002.publish(sale("ID-12", "S001"), EXCHANGE, user_id="store-S002",
                              application_headers={H_STORE: "S001", H_USER: "store-S001"}),
        "ID-13": s002.publish(sale("ID-13", "S002"), EXCHANGE, user_id="store-S002",
                              application_headers={H_STORE: "S001"}),
        "ID-14": s002.publish(sale("ID-14", "S001"), EXCHANGE),  # no user_id: the broker checks nothing
    }
    assert parked == dict.fromkeys(parked), parked
    # the store's own sale still posts: only what is not its own is refused
    assert s002.publish(sale("ID-20", "S002"), EXCHANGE, user_id="store-S002") is None

    def posted(store: str) -> int:
        with engine.connect() as conn:
            return conn.execute(text('SELECT count(*) FROM "SLS_HDR" WHERE "STORE_NO" = :s AND "POS_TXN_ID" '
                                     "LIKE 'ID-%'"), {"s": store}).scalar()
    assert wait_for(lambda: posted("S002") == 1, timeout=60), log.read_text()[-3000:]
    assert wait_for(lambda: queue_state(broker.uri(), DLQ)[0] == len(parked), timeout=60), \
        (queue_state(broker.uri(), DLQ), log.read_text()[-3000:])
    assert posted("S001") == 0
    assert queue_state(broker.uri(), SALES_QUEUE)[0] == 0

    rejected = metric(port, "retailbus_rejected_messages_total")
    assert sum(v for labels, v in rejected.items() if 'reason="foreign_store"' in labels) == 3, rejected
    assert sum(v for labels, v in rejected.items() if 'reason="no_sender"' in labels) == 1, rejected

    shown = CliRunner().invoke(main, ["dlq", "list", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("StoreIdentityError") == len(parked), shown.output
    assert "sender store-S002 may only send for store S002" in shown.output
