"""services/erp/service.py: the erp service posts a sale or return once per idempotency key,
the posting, the inbox key and the outbox event in one transaction (worker_factory, real SQLite file)."""
from __future__ import annotations

import gc
import json

import pytest
import sqlalchemy as sa
from nameko.testing.services import worker_factory
from prometheus_client import REGISTRY

from contracts.envelope import CloudEvent
from contracts.pos import PosReturnV1, PosSaleV1
from demo.legacy_erp import postings as legacy_postings
from demo.legacy_erp.schema import DEMO_ON_HAND, create_schema, seed_demo_data
from legacy_wrappers.legacy_db import LegacyDatabase, LegacyDb, LegacyValueError, engine_for
from legacy_wrappers import inbox
from bus.consumer import DUPLICATE
from legacy_wrappers.batched_writes import write_batch
from contracts.returns import ErpPostReturnV1
from services.erp import ledger, outbox, posting, return_links, unknown_sku
from services.erp.service import ErpService

pytestmark = pytest.mark.unit


def sale(txn_id="S001-07-000001", sku="100001", qty=2, price=1999) -> PosSaleV1:
    return PosSaleV1.model_validate({
        "store_id": "S001", "terminal_id": "07", "pos_txn_id": txn_id, "business_day": "2026-11-27",
        "occurred_at": "2026-11-27T10:15:00+00:00", "currency": "EUR",
        "lines": [{"line_no": 1, "sku": sku, "quantity": qty, "unit_price_minor": price,
                   "line_total_minor": qty * price}],
        "total_minor": qty * price, "tenders": [{"kind": "card", "amount_minor": qty * price}]})


def refund(txn_id="S001-07-R00001", orig="S001-07-000001", sku="100001") -> PosReturnV1:
    return PosReturnV1.model_validate({
        "store_id": "S001", "terminal_id": "07", "pos_txn_id": txn_id, "business_day": "2026-11-28",
        "occurred_at": "2026-11-28T09:00:00+00:00", "currency": "EUR",
        "lines": [{"line_no": 1, "sku": sku, "quantity": 1, "unit_price_minor": 1999,
                   "line_total_minor": 1999}],
        "total_minor": 1999, "tenders": [{"kind": "cash", "amount_minor": 1999}],
        "original": {"store_id": "S001", "pos_txn_id": orig}})


def command(ret: PosReturnV1) -> tuple[ErpPostReturnV1, CloudEvent]:
    """The return process's command to post `ret` (services/returns), as it sends it."""
    cmd = ErpPostReturnV1(pos_return=ret)
    return cmd, CloudEvent.new(cmd.TYPE, "retailbus/returns", cmd, subject=f"S001:{ret.pos_txn_id}",
                               correlationid="01J8Z3Q5W8N4T6B2C9D0E1F2G3",
                               idempotencykey=f"return_to_refund:01J8Z3Q5W8N4T6B2C9D0E1F2G3:post_return:0")


def envelope(txn) -> CloudEvent:
    return CloudEvent.new(txn.TYPE, f"store/{txn.store_id}/pos/{txn.terminal_id}", txn,
                          subject=txn.pos_txn_id,
                          idempotencykey=f"{txn.TYPE}:{txn.store_id}:{txn.pos_txn_id}")


def legacy_db(path) -> LegacyDb:
    engine = engine_for(f"sqlite:///{path}")
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    md = sa.MetaData()
    md.reflect(engine, only=ledger.LEGACY_TABLES)
    return LegacyDb(engine, dict(md.tables))


@pytest.fixture
def db(tmp_path):
    db = legacy_db(tmp_path / "erp.db")
    # ensure_inbox remembers engines by id(); create the table here so a recycled id from an
    # earlier test cannot skip it (see test_inbox_is_created_for_a_new_engine_with_a_recycled_id)
    for metadata in (inbox.metadata, outbox.metadata, return_links.metadata, unknown_sku.metadata):
        metadata.create_all(db.engine)
    yield db
    db.engine.dispose()


class OutboxWriter:
    """The worker side of the Outbox dependency, without its relay."""

    def added(self):
        pass


def postings(engine):
    """The BatchedWrites dependency without its writer greenthread: a worker's items one batch."""
    return lambda items: write_batch(engine, posting.post_many, items)


def post(handler, txn, event):
    """One message through a batching handler (`on_pos_sale`, `on_post_return`): its result."""
    [result] = handler([(txn, event)])
    return result


class Worker:
    """Calls a worker_factory service as nameko would run a worker: LegacyDatabase
    commits the worker's transaction when the method returns, rolls it back when it raises."""

    def __init__(self, service, db):
        self._service, self._db = service, db

    def __getattr__(self, name):
        method = getattr(self._service, name)

        def call(*args, **kwargs):
            try:
                result = method(*args, **kwargs)
            except BaseException:
                self._db.end(success=False)
                raise
            self._db.end(success=True)
            return result
        return call


@pytest.fixture
def service(db):
    return Worker(worker_factory(ErpService, db=db, outbox=OutboxWriter(), postings=postings(db.engine)), db)


def outbox_types(db):
    with db.engine.connect() as conn:
        return [r.TYPE for r in conn.execute(sa.select(outbox.OUTBOX.c.TYPE).order_by(outbox.OUTBOX.c.ID))]


def scalar(db, query):
    with db.engine.connect() as conn:
        return conn.execute(query).scalar()


def headers(db, doc_type=None):
    h = db.tables["SLS_HDR"]
    query = sa.select(h.c.DOC_NO, h.c.POS_TXN_ID, h.c.ORIG_DOC_NO, h.c.CHANNEL).order_by(h.c.DOC_NO)
    if doc_type:
        query = query.where(h.c.DOC_TYPE == doc_type)
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def inbox_keys(db):
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(inbox.INBOX.c.CONSUMER, inbox.INBOX.c.IDEM_KEY).order_by(inbox.INBOX.c.IDEM_KEY))]


def on_hand(db, sku, store="S001"):
    s = db.tables["STK_LVL"]
    return scalar(db, sa.select(s.c.ON_HAND).where(s.c.STORE_NO == store, s.c.SKU == sku))


def test_sale_posts_once_per_idempotency_key(service, db):
    txn = sale()
    ev = envelope(txn)
    assert post(service.on_pos_sale, txn, ev) == "S00000001"
    assert post(service.on_pos_sale, txn, ev) is DUPLICATE
    redelivered = CloudEvent.from_json(ev.to_json())  # the same message off the wire
    assert post(service.on_pos_sale, redelivered.payload(), redelivered) is DUPLICATE
    assert headers(db) == [("S00000001", "S001-07-000001", None, "RBUS")]
    assert on_hand(db, "100001") == DEMO_ON_HAND - 2
    assert inbox_keys(db) == [("erp.on_pos_sale", "pos.sale.v1:S001:S001-07-000001")]
    gl = db.tables["GL_PST"]
    assert scalar(db, sa.select(sa.func.count()).select_from(gl)) == 2
    assert outbox_types(db) == ["erp.sale_posted.v1"]  # one event, for the one posting


def test_a_new_event_id_with_the_same_key_is_still_a_duplicate(service, db):
    txn = sale()
    post(service.on_pos_sale, txn, envelope(txn))
    assert post(service.on_pos_sale, txn, envelope(txn)) is DUPLICATE  # republished: new id, same key
    assert len(headers(db)) == 1


def test_different_sales_both_post(service, db):
    assert post(service.on_pos_sale, sale("A"), envelope(sale("A"))) == "S00000001"
    assert post(service.on_pos_sale, sale("B"), envelope(sale("B"))) == "S00000002"
    assert [h[1] for h in headers(db)] == ["A", "B"]
    assert on_hand(db, "100001") == DEMO_ON_HAND - 4


def test_return_posts_once_and_references_the_sale(service, db):
    post(service.on_pos_sale, sale(), envelope(sale()))
    ret = refund()
    assert post(service.on_post_return, *command(ret)) == "R00000001"
    assert post(service.on_post_return, *command(ret)) is DUPLICATE
    assert headers(db, "R") == [("R00000001", "S001-07-R00001", "S00000001", "RBUS")]
    assert on_hand(db, "100001") == DEMO_ON_HAND - 2 + 1
    # keyed as the till's return, whatever the process's key: the RPC path and the bus post it once
    assert ("erp.on_pos_return", "pos.return.v1:S001:S001-07-R00001") in inbox_keys(db)
    # the process asking again is answered again: the same announcement (key), for the same document
    with db.engine.connect() as conn:
        announced = [json.loads(r.BODY) for r in conn.execute(sa.select(outbox.OUTBOX.c.BODY).where(
            outbox.OUTBOX.c.TYPE == "erp.return_posted.v1"))]
    assert [a["idempotencykey"] for a in announced] == ["erp.return_posted.v1:R00000001"] * 2
    assert {a["correlationid"] for a in announced} == {"01J8Z3Q5W8N4T6B2C9D0E1F2G3"}
    assert announced[0]["data"] == announced[1]["data"] | {"posted_at": announced[0]["data"]["posted_at"]}
    assert announced[0]["data"]["original"] == {
        "doc_no": "S00000001", "business_day": "2026-11-27", "loyalty_card": None, "returned_before": [],
        "lines": [{"sku": "100001", "quantity": 2, "line_total_minor": 3998}]}


def test_a_return_knows_what_the_returns_posted_before_it_took_back(db):
    """By document order: within one batch and across batches."""
    _batch(db, sale("A", qty=3), refund("R1", orig="A"), refund("R2", orig="A"))
    _batch(db, refund("R3", orig="A"))
    with db.engine.connect() as conn:
        events = [json.loads(r.BODY)["data"] for r in conn.execute(sa.select(outbox.OUTBOX.c.BODY).where(
            outbox.OUTBOX.c.TYPE == "erp.return_posted.v1").order_by(outbox.OUTBOX.c.ID))]
    assert [e["original"]["returned_before"] for e in events] == [
        [], [{"sku": "100001", "quantity": 1, "line_total_minor": 1999}],
        [{"sku": "100001", "quantity": 2, "line_total_minor": 3998}]]


def test_failure_inside_posting_leaves_no_header_and_no_inbox_row(service, db, monkeypatch):
    real_run_together = posting.run_together

    def post_then_fail(conn, statements):
        real_run_together(conn, statements)  # header, lines, stock, GL and the event written...
        raise RuntimeError("ERP posting failed half-way")  # ...then the handler dies

    monkeypatch.setattr(posting, "run_together", post_then_fail)
    txn = sale()
    ev = envelope(txn)
    failed = post(service.on_pos_sale, txn, ev)
    assert isinstance(failed, RuntimeError) and "half-way" in str(failed)
    assert headers(db) == []
    assert inbox_keys(db) == []
    assert outbox_types(db) == []  # no event without its effect
    assert on_hand(db, "100001") == DEMO_ON_HAND
    seq = db.tables["DOC_SEQ"]
    assert scalar(db, sa.select(seq.c.NEXT_NO).where(seq.c.SEQ_NAME == "SLS")) == 1

    # the retry of the same message (the key was not consumed) posts it, once
    monkeypatch.setattr(posting, "run_together", real_run_together)
    assert post(service.on_pos_sale, txn, ev) == "S00000001"
    assert post(service.on_pos_sale, txn, ev) is DUPLICATE
    assert len(headers(db)) == 1


def test_inbox_and_outbox_are_created_for_a_fresh_database(tmp_path, container_factory):
    db = legacy_db(tmp_path / "fresh.db")
    dsn = str(db.engine.url)
    db.engine.dispose()
    container = container_factory(ErpService, {"LEGACY_DB_URI": dsn, "AMQP_URI": "amqp://unused"})
    provider = next(d for d in container.dependencies if isinstance(d, LegacyDatabase))
    provider.setup()
    try:
        assert not {"RB_INBOX", "RB_OUTBOX"} & set(sa.inspect(provider.engine).get_table_names())
        assert set(provider.tables()) >= {"SLS_HDR", "STK_LVL", "CUST_MST"}  # reflected, first worker
        assert {"RB_INBOX", "RB_OUTBOX"} <= set(sa.inspect(provider.engine).get_table_names())
    finally:
        provider.engine.dispose()


def test_inbox_is_created_for_a_new_engine_with_a_recycled_id(tmp_path, monkeypatch):
    monkeypatch.setattr(inbox, "_ready", set(), raising=False)
    first = engine_for(f"sqlite:///{tmp_path / 'first.db'}")
    inbox.ensure_inbox(first)
    first_id = id(first)
    first.dispose()
    del first
    gc.collect()
    engine = None
    for _ in range(300):  # CPython often hands the freed address to a new engine
        candidate = engine_for(f"sqlite:///{tmp_path / 'other.db'}")
        if id(candidate) == first_id:
            engine = candidate
            break
        del candidate
    if engine is None:
        # no recycled address this time: the stale entry that would cause it must be gone
        assert first_id not in getattr(inbox, "_ready", set())
        return
    try:
        create_schema(engine)
        assert inbox.apply_once(engine, "erp.test", envelope(sale()), lambda conn: "applied") == "applied"
    finally:
        engine.dispose()


def _batch(db, *txns):
    t = ledger.LegacyTables.of(db.tables)
    items = [posting.Posting(t, txn, f"{txn.TYPE}:{txn.store_id}:{txn.pos_txn_id}", f"m{i}", None)
             for i, txn in enumerate(txns)]
    return write_batch(db.engine, posting.post_many, items)


def test_a_batch_posts_each_message_once_in_one_transaction(db):
    a, b = sale("A"), sale("B", sku="100002", qty=1)
    results = _batch(db, a, b, a, refund("R1", orig="A"))
    assert [r[:2] for r in results] == [("S00000001", False), ("S00000002", False), ("S00000001", True),
                                        ("R00000001", False)]
    assert headers(db) == [("R00000001", "R1", "S00000001", "RBUS"), ("S00000001", "A", None, "RBUS"),
                           ("S00000002", "B", None, "RBUS")]  # the return found its sale of the same batch
    assert on_hand(db, "100001") == DEMO_ON_HAND - 2 + 1  # moves summed per SKU: -2 (A), +1 (R1)
    assert on_hand(db, "100002") == DEMO_ON_HAND - 1
    assert outbox_types(db) == ["erp.sale_posted.v1", "erp.sale_posted.v1", "erp.return_posted.v1"]
    assert len(inbox_keys(db)) == 3


def test_a_value_the_legacy_table_cannot_hold_fails_alone_and_the_batch_commits(db):
    bad = sale("BAD").model_copy(update={"customer_id": "C" * 13})  # CUST_NO holds 12
    results = _batch(db, sale("A"), bad, sale("B"))
    assert results[0][:2] == ("S00000001", False) and results[2][1] is False
    assert isinstance(results[1], LegacyValueError) and "SLS_HDR.CUST_NO" in str(results[1])
    assert [h[1] for h in headers(db)] == ["A", "B"]
    assert ("erp.on_pos_sale", "pos.sale.v1:S001:BAD") not in inbox_keys(db)  # a fixed message can post
    assert outbox_types(db) == ["erp.sale_posted.v1", "erp.sale_posted.v1"]


def unknown_moves(db) -> list[tuple]:
    u = unknown_sku.TABLE
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(u.c.STORE_NO, u.c.SKU, u.c.DOC_NO, u.c.QTY).order_by(u.c.ID))]


def test_a_sku_the_store_holds_no_stock_for_is_recorded_not_invented(db):
    """Unlike the legacy posting program, no STK_LVL row is made up (negative on hand): the
    document posts, the move is recorded in RB_UNKNOWN_SKU and handed back for the metric."""
    results = _batch(db, sale("A", sku="NEW-SKU", qty=3), sale("B", qty=1))
    assert [h[1] for h in headers(db)] == ["A", "B"]
    assert on_hand(db, "NEW-SKU") is None and on_hand(db, "100001") == DEMO_ON_HAND - 1
    assert results[0].unknown_skus == (("S00000001", "S001", "NEW-SKU", -3),) and results[1].unknown_skus == ()
    _batch(db, sale("C", sku="NEW-SKU", qty=2), refund("R1", orig="A", sku="NEW-SKU"))
    assert on_hand(db, "NEW-SKU") is None
    assert unknown_moves(db) == [("S001", "NEW-SKU", "S00000001", -3), ("S001", "NEW-SKU", "S00000003", -2),
                                 ("S001", "NEW-SKU", "R00000001", 1)]


def test_the_unknown_sku_metric_counts_each_move_once_its_posting_committed(service, db):
    before = REGISTRY.get_sample_value("retailbus_unknown_sku_total", {"store": "S001"}) or 0
    txn = sale("A", sku="NEW-SKU")
    assert post(service.on_pos_sale, txn, envelope(txn)) == "S00000001"
    assert post(service.on_pos_sale, txn, envelope(txn)) is DUPLICATE
    assert REGISTRY.get_sample_value("retailbus_unknown_sku_total", {"store": "S001"}) == before + 1


def test_a_sale_the_legacy_api_booked_already_is_a_duplicate(service, db):
    """A till's legacy call that timed out after the ERP booked it, then sent again and
    queued on the bus: the document is there under no RB_INBOX key; it is not booked twice."""
    with db.engine.begin() as conn:
        legacy_postings.post_sale(conn, {
            "STORE": "S001", "TERMINAL": "07", "TXN_ID": "S001-07-000001", "TXN_DATE": "20261127",
            "CURRENCY": "EUR", "LINES": [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "LINE": 3998}],
            "TOTAL": 3998, "TENDERS": [{"TYPE": "CARD", "AMOUNT": 3998}]})
    txn = sale()
    assert post(service.on_pos_sale, txn, envelope(txn)) is DUPLICATE
    assert headers(db) == [("S00000001", "S001-07-000001", None, "POSAPI")]
    assert on_hand(db, "100001") == DEMO_ON_HAND - 2  # moved once, by the legacy posting
    assert outbox_types(db) == []
    other = sale("S001-07-000002")
    assert post(service.on_pos_sale, other, envelope(other)) == "S00000002"  # others still post


def test_a_return_posted_before_its_sale_is_linked_when_the_sale_posts(service, db):
    """After a backlog the returns queue can run ahead of the sales queue."""
    ret = refund()
    assert post(service.on_post_return, *command(ret)) == "R00000001"
    assert headers(db, "R") == [("R00000001", "S001-07-R00001", None, "RBUS")]
    txn = sale()
    assert post(service.on_pos_sale, txn, envelope(txn)) == "S00000001"
    assert headers(db, "R") == [("R00000001", "S001-07-R00001", "S00000001", "RBUS")]
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(return_links.TABLE)).scalar() == 0
