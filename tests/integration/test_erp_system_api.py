"""The erp system API in a container on a real broker, over SQLite and PostgreSQL:
RPCs, the posting transaction with its outbox event, and hostile input through
every RPC and event (stored verbatim or refused clearly; schema and rows intact)."""
from __future__ import annotations


import amqp
import pytest
import sqlalchemy as sa
from nameko.exceptions import RemoteError
from nameko.standalone.rpc import ServiceRpcProxy
from nameko.testing.services import entrypoint_hook

from contracts.envelope import CloudEvent
from demo.legacy_erp import schema
from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, OutgoingMessage, connection_params
from services.erp import posting
from services.erp.outbox import OUTBOX
from services.erp.service import ErpService
from tests.integration.test_change_capture import Subscriber
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

HOSTILE_TXN = "'; DROP TABLE \"SLS_HDR\"; -- \u00e9\U0001F600"
HOSTILE_CARD = "O'Brien\"--;\\"


def sale(txn_id="T-1", **overrides) -> dict:
    body = {"store_id": "S001", "terminal_id": "07", "pos_txn_id": txn_id, "business_day": "2026-11-27",
            "occurred_at": "2026-11-27T10:15:00+00:00", "currency": "EUR",
            "lines": [{"line_no": 1, "sku": "100001", "quantity": 2, "unit_price_minor": 1999,
                       "line_total_minor": 3998}],
            "total_minor": 3998, "tenders": [{"kind": "card", "amount_minor": 3998}]}
    body.update(overrides)
    return body


@pytest.fixture
def erp(container_factory, amqp_uri, legacy_dsn, tmp_path):
    engine = schema.engine_for(legacy_dsn)
    schema.create_schema(engine)
    with engine.begin() as conn:
        schema.seed_demo_data(conn)
    config = {"AMQP_URI": amqp_uri, "LEGACY_DB_URI": legacy_dsn, "max_workers": 16,
              "RETAILBUS": {"root": str(tmp_path), "retry": {"delays": [1]}}}
    posted = Subscriber(amqp_uri, "erp.sale_posted.v1 erp.return_posted.v1", f"test.posted.{tmp_path.name}")
    customers = Subscriber(amqp_uri, "customer.updated.v2", f"test.cust.{tmp_path.name}")
    container = container_factory(ErpService, config)
    container.start()
    try:
        yield container, engine, config, posted, customers
    finally:
        container.stop()
        posted.close()
        customers.close()
        engine.dispose()


def snapshot(engine) -> tuple:
    """Schema and every legacy row we did not mean to touch."""
    with engine.connect() as conn:
        stock = conn.execute(sa.select(schema.STK_LVL).where(schema.STK_LVL.c.SKU != "100001")
                             .order_by(schema.STK_LVL.c.STORE_NO, schema.STK_LVL.c.SKU)).all()
        customers = conn.execute(sa.select(schema.CUST_MST).order_by(schema.CUST_MST.c.CUST_NO)).all()
    inspector = sa.inspect(engine)
    columns = {t: [c["name"] for c in inspector.get_columns(t)] for t in schema.metadata.tables}
    return columns, stock, customers


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


@pytest.mark.timeout(120)
def test_rpcs_post_query_and_refuse_hostile_input(erp):
    container, engine, config, posted, _ = erp
    before = snapshot(engine)
    with ServiceRpcProxy("erp", config, timeout=30) as rpc:
        first = rpc.post_sale(sale(HOSTILE_TXN, loyalty_card=HOSTILE_CARD))
        assert first["duplicate"] is False
        assert rpc.post_sale(sale(HOSTILE_TXN, loyalty_card=HOSTILE_CARD)) == {**first, "duplicate": True}
        status = rpc.sale_status("S001", HOSTILE_TXN)
        assert status["doc_no"] == first["doc_no"] and status["pos_txn_id"] == HOSTILE_TXN  # verbatim

        refused = {
            "SLS_HDR.CUST_NO: 10240 characters": sale("T-2", customer_id="C" * 10240),
            "SLS_LIN.SKU: NUL characters": sale("T-3", lines=[{**sale()["lines"][0], "sku": "100\x00001"}]),
            "pos_txn_id": sale("x" * 10240),  # the contract's own limit, with the field path
        }
        for message, body in refused.items():
            with pytest.raises(RemoteError, match=message.replace(".", r"\.")):
                rpc.post_sale(body)
        with pytest.raises(RemoteError, match="invalid pos.return.v1"):
            rpc.post_return({"store_id": "'; DROP TABLE"})

        level = rpc.stock_level("S001", "100001")
        assert level["on_hand"] == schema.DEMO_ON_HAND - 2 and level["as_of"].endswith("+00:00")
        assert rpc.stock_level("S001';--", "100001") is None
        with pytest.raises(RemoteError, match="STK_LVL.SKU: 10240 characters"):
            rpc.stock_level("S001", "9" * 10240)
        with pytest.raises(RemoteError, match="NUL characters"):
            rpc.stock_level("S001", "1\x00")
        assert rpc.customer_account("' OR 1=1 --") is None
        assert rpc.customer_account("C00004")["email"] is None
        assert rpc.sale_status("S001", "x" * 40) is None

    assert snapshot(engine) == before
    h = schema.SLS_HDR.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(h.POS_TXN_ID, h.LOYALTY_CARD)).all()
    assert rows == [(HOSTILE_TXN, HOSTILE_CARD)]
    assert wait_for(lambda: (posted.drain(), posted.events)[1], timeout=15)
    [event] = posted.events  # one event for the one posting, relayed from the outbox
    assert event["idempotencykey"] == f"erp.sale_posted.v1:{first['doc_no']}"
    assert event["data"]["pos_txn_id"] == HOSTILE_TXN and event["data"]["loyalty_card"] == HOSTILE_CARD


@pytest.mark.timeout(120)
def test_a_worker_failing_halfway_leaves_no_rows_and_no_event(erp, monkeypatch):
    container, engine, _, posted, _ = erp
    real = posting.run_together

    def post_then_fail(conn, statements):  # every row and the event written, then the worker dies
        real(conn, statements)
        raise RuntimeError("posting died half-way")

    monkeypatch.setattr(posting, "run_together", post_then_fail)
    incoming = CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale("T-9"),
                              idempotencykey="pos.sale.v1:S001:T-9")
    with entrypoint_hook(container, "on_pos_sale") as post:
        [failed] = post([(incoming.payload(), incoming)])
    assert isinstance(failed, RuntimeError) and "half-way" in str(failed)
    assert count(engine, schema.SLS_HDR) == count(engine, schema.SLS_LIN) == count(engine, schema.GL_PST) == 0
    assert count(engine, OUTBOX) == 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(schema.STK_LVL.c.ON_HAND).where(
            schema.STK_LVL.c.STORE_NO == "S001", schema.STK_LVL.c.SKU == "100001")).scalar() == schema.DEMO_ON_HAND

    monkeypatch.setattr(posting, "run_together", real)  # the retry posts it, with its event
    with entrypoint_hook(container, "on_pos_sale") as post:
        assert post([(incoming.payload(), incoming)]) == ["S00000001"]
    assert wait_for(lambda: (posted.drain(), posted.events)[1], timeout=15)
    assert [e["correlationid"] for e in posted.events] == [incoming.correlationid]


@pytest.mark.timeout(120)
def test_hostile_events_are_parked_and_legacy_writes_are_emitted_verbatim(erp, amqp_uri):
    container, engine, _, posted, customers = erp
    before = snapshot(engine)
    queue = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")
    exchange = topology.events_exchange("store_agent")
    purge = amqp.Connection(**connection_params(amqp_uri, 5))
    purge.connect()
    try:  # the parking queue is shared by the tests of this session
        purge.channel().queue_purge(topology.dead_letter_queue(queue))
    except amqp.exceptions.NotFound:
        pass
    finally:
        purge.collect()
    publisher = ConfirmingPublisher(amqp_uri)
    too_long = CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale("T-5", loyalty_card="L" * 10240),
                              idempotencykey="pos.sale.v1:S001:T-5")
    not_utf8 = OutgoingMessage(exchange=exchange, routing_key="pos.sale.v1",
                               body=b'{"id": "\xff\xfe", "data": "\xc3\x28"}', message_id="bad-bytes")
    assert publisher.publish_many([event_message(too_long, exchange), not_utf8]) == [None, None]
    publisher.close()

    conn = amqp.Connection(**connection_params(amqp_uri, 5))
    conn.connect()
    try:
        parked = []
        def park_depth():
            return conn.channel().queue_declare(topology.dead_letter_queue(queue), passive=True).message_count
        assert wait_for(lambda: park_depth() == 2, timeout=30), park_depth()
        ch = conn.channel()
        while (m := ch.basic_get(topology.dead_letter_queue(queue), no_ack=True)) is not None:
            parked.append(m.properties["application_headers"]["x-retailbus-error"])
    finally:
        conn.collect()
    assert any("SLS_HDR.LOYALTY_CARD: 10240 characters" in e for e in parked), parked
    assert count(engine, schema.SLS_HDR) == 0 and snapshot(engine) == before

    # a legacy program writes a hostile name straight into CUST_MST: emitted as written
    name = "Robert'); DROP TABLE \"CUST_MST\";-- \u00e9\U0001F600"
    with engine.begin() as db:
        db.execute(sa.update(schema.CUST_MST).where(schema.CUST_MST.c.CUST_NO == "C00001")
                   .values(NAME=name, UPD_TS=schema.utc_stamp()))
    assert wait_for(lambda: (customers.drain(), any(
        e["data"]["values"]["name"] == name and e["data"]["origin"] == "erp" for e in customers.events))[1],
        timeout=15)
    assert snapshot(engine)[0] == before[0]
