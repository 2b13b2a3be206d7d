"""Control totals as digests: the agent's running totals (real outbox files) held to a
full recount, and reconciliation comparing digests first and asking a real HTTP
server standing for the agent for the list only when they differ."""
from __future__ import annotations

import json
import random
import sqlite3
from datetime import UTC, date, datetime
from types import SimpleNamespace

import eventlet
import pytest
from eventlet import wsgi
from nameko.testing.services import worker_factory
from werkzeug.test import EnvironBuilder

from contracts.control import KindDigest, StoreControlTotalsV2, TxnDigest
from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import SLS_HDR, create_schema, engine_for
from bus.settings import AgentSettings, PublisherSettings
from routing import control_totals
from routing.day_totals import RunningTotals
from routing.edge_auth import TerminalKeys, Verifier, signed_headers
from routing.legacy_payload import return_from_legacy, sale_from_legacy
from routing.outbox import Outbox
from routing.store_agent import StoreAgent
from services.reconcile import run, store
from services.reconcile.service import ReconcileService
from tests.integration.support import legacy_sale

pytestmark = pytest.mark.unit

DAYS = ("20261127", "20261128")
DAY = date(2026, 11, 27)


def txn_event(kind: str, pos_id: str, day: str, price: int, card: bool) -> CloudEvent:
    payload = {**legacy_sale(pos_id, price=price), "TXN_DATE": day, **({"LOYALTY_CARD": "LC0000000001"} if card else {})}
    parse, type_name = (sale_from_legacy, "pos.sale.v1") if kind == "sale" else (return_from_legacy, "pos.return.v1")
    return CloudEvent.new(type_name, "store/S001/pos/07", parse(payload), subject=pos_id,
                          idempotencykey=f"{type_name}:S001:{pos_id}")


def expected_digests(accepted: dict) -> dict[str, dict[str, tuple]]:
    """What the test itself accepted, digested: day -> kind -> (txns, loyalty)."""
    out: dict = {}
    for (kind, pos_id), (day, total, card, via) in accepted.items():
        kinds = out.setdefault(day, {k: (TxnDigest(), TxnDigest()) for k in ("sale", "return")})
        kinds[kind][0].add_txn(kind, pos_id, total, "EUR")
        if card and via == "bus":
            kinds[kind][1].add_points(kind, pos_id)
    return out


def digests_of(running: RunningTotals) -> dict:
    return {day.replace("-", ""): {k: (t.txns[k], t.loyalty[k]) for k in ("sale", "return")}
            for day, t in running.days.items()}


def test_incremental_totals_equal_a_full_recount_after_sales_returns_retries_and_restarts(tmp_path):
    rng = random.Random(25)
    path = tmp_path / "outbox.db"
    box, db = Outbox(path), sqlite3.connect(path, check_same_thread=False)
    running = RunningTotals(86400)
    running.recount(db, datetime.now().timestamp())
    accepted, events, restarts, retries = {}, [], 0, 0
    try:
        for n in range(900):
            roll = rng.random()
            if roll < 0.03:  # a restart: the running totals are counted again from the notes
                box.close()
                db.close()
                box, db = Outbox(path), sqlite3.connect(path, check_same_thread=False)
                running = RunningTotals(86400)
                running.recount(db, datetime.now().timestamp())
                restarts += 1
            elif roll < 0.15 and events:  # a till's retry: same key, same content
                assert box.accept(rng.choice(events)).duplicate
                retries += 1
            elif roll < 0.22:  # a legacy-mode sale the legacy ERP took
                day, price = rng.choice(DAYS), rng.randint(1, 5000)
                sale = sale_from_legacy({**legacy_sale(f"L{n}", price=price), "TXN_DATE": day})
                box.record_accepted("pos.sale.v1", sale.model_dump(mode="json"))
                accepted[("sale", f"L{n}")] = (day, 2 * price, False, "legacy")
            else:
                kind = "return" if roll < 0.35 else "sale"
                day, price, card = rng.choice(DAYS), rng.randint(1, 5000), rng.random() < 0.4
                event = txn_event(kind, f"T{n}", day, price, card)
                assert not box.accept(event).duplicate
                events.append(event)
                accepted[(kind, f"T{n}")] = (day, 2 * price, card, "bus")
            if rng.random() < 0.1:
                running.tail(db, datetime.now().timestamp())
        running.tail(db, datetime.now().timestamp())
        recount = RunningTotals(86400)
        recount.recount(db, datetime.now().timestamp())
    finally:
        box.close()
        db.close()
    assert restarts >= 10 and retries >= 50
    assert digests_of(running) == expected_digests(accepted) == digests_of(recount)
    assert {d: t.as_of for d, t in running.days.items()} == {d: t.as_of for d, t in recount.days.items()}


def test_a_day_not_counted_at_start_is_counted_whole_when_touched_again(tmp_path):
    """Days older than the window are not counted at start; a late sale for one
    brings its earlier notes with it, not just itself."""
    path = tmp_path / "outbox.db"
    box, db = Outbox(path), sqlite3.connect(path, check_same_thread=False)
    try:
        box.accept(txn_event("sale", "OLD1", DAYS[0], 100, False))
        box.accept(txn_event("sale", "OLD2", DAYS[0], 100, False))
        db.execute("UPDATE accepted_txn SET accepted_at = accepted_at - 10 * 86400")
        db.commit()
        running = RunningTotals(86400)
        running.recount(db, datetime.now().timestamp())
        assert running.days == {}
        box.accept(txn_event("sale", "LATE", DAYS[0], 100, False))
        assert running.tail(db, datetime.now().timestamp()) == 1
        assert running.days["2026-11-27"].txns["sale"].count == 3
    finally:
        box.close()
        db.close()


# -- reconciliation: digests first, the list only on a difference --------------------

def v2(sales: TxnDigest, loyalty: TxnDigest, as_of: int = 9) -> StoreControlTotalsV2:
    return StoreControlTotalsV2(store_id="S001", business_day=DAY, as_of=as_of, taken_at=datetime.now(UTC),
                                sales=KindDigest.of(sales, loyalty), returns=KindDigest.of(TxnDigest(), TxnDigest()))


class Agent:
    """A real HTTP server answering GET /control/transactions with a recorded list."""

    def __init__(self, listed: dict):
        self.listed, self.asked, self.terminals = listed, [], []
        self.sock = eventlet.listen(("127.0.0.1", 0))
        self.server = eventlet.spawn(wsgi.server, self.sock, self.app, log_output=False)

    def app(self, environ, start_response):
        self.asked.append(environ["QUERY_STRING"])
        self.terminals.append(environ.get("HTTP_X_RETAILBUS_TERMINAL"))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(self.listed).encode()]

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.sock.getsockname()[1]

    def close(self):
        self.server.kill()
        self.sock.close()


@pytest.fixture
def estate(tmp_path):
    legacy = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    create_schema(legacy)
    with legacy.begin() as conn:
        for n, pos_id in enumerate(["S001-1", "S001-2"]):
            conn.execute(SLS_HDR.insert().values(
                DOC_NO=f"S{n:08d}", DOC_TYPE="S", STORE_NO="S001", TERM_NO="07", POS_TXN_ID=pos_id,
                TXN_DATE="20261127", TOTAL_CENTS=3998, CURRENCY="EUR", CHANNEL="RBUS", CREATED_TS="x"))
    agent = Agent({"store_id": "S001", "business_day": "2026-11-27", "as_of": 9,
                   "taken_at": "2026-11-27T22:00:00Z", "returns": {"count": 0},
                   "sales": {"count": 3, "amount_minor": {"EUR": 3 * 3998}, "transactions": [
                       {"pos_txn_id": p, "total_minor": 3998, "currency": "EUR", "loyalty_card": False,
                        "via": "bus"} for p in ("S001-1", "S001-2", "S001-3")]}})
    totals = store.open_engine(f"sqlite:///{tmp_path / 'reconcile.db'}")
    yield run.Estate(legacy, totals, None, ("S001",), {"S001": (agent.address, tmp_path / "keys.json")}), agent
    agent.close()


def sales_digest(*pos_ids: str) -> TxnDigest:
    digest = TxnDigest()
    for pos_id in pos_ids:
        digest.add_txn("sale", pos_id, 3998, "EUR")
    return digest


def test_equal_digests_reconcile_without_asking_the_agent(estate):
    e, agent = estate
    store.keep_latest(e.totals, v2(sales_digest("S001-1", "S001-2"), TxnDigest()))
    [report] = run.reconcile_day(e, DAY)
    assert report.gap == 0 and report.agent["sale"].count == report.erp["sale"].count == 2
    assert agent.asked == []


def test_a_differing_digest_fetches_the_list_and_names_the_transaction(estate):
    e, agent = estate
    store.keep_latest(e.totals, v2(sales_digest("S001-1", "S001-2", "S001-3"), TxnDigest()))
    [report] = run.reconcile_day(e, DAY)
    assert [f.pos_txn_id for f in report.erp_missing] == ["S001-3"] and report.gap == 1
    assert agent.asked == ["day=2026-11-27&as_of=9"] and agent.terminals == ["OPSDESK"]  # signed with the ops key


def test_a_differing_digest_with_the_agent_away_is_a_gap_saying_so(estate):
    e, agent = estate
    agent.close()
    store.keep_latest(e.totals, v2(sales_digest("S001-1", "S001-2", "S001-3"), TxnDigest()))
    [report] = run.reconcile_day(e, DAY)
    assert report.gap == 1
    [finding] = report.digest_mismatch
    assert finding.kind == "sale" and "erp 2 vs agent 3" in finding.detail and "/control/transactions" in finding.detail


def test_reconcile_keeps_a_v2_snapshot_small_and_prunes_old_days(tmp_path):
    engine = store.open_engine(f"sqlite:///{tmp_path / 'reconcile.db'}")
    store.keep_latest(engine, v2(sales_digest(*[f"S001-{n}" for n in range(50_000)]), TxnDigest()))
    [(size,)] = sqlite3.connect(tmp_path / "reconcile.db").execute("SELECT length(body) FROM control_totals")
    assert size < 1000
    assert store.prune(engine, DAY, limit=100) == 0  # not before the day: kept
    assert store.prune(engine, date(2026, 11, 28), limit=100) == 1
    assert store.totals_for(engine, DAY) == {}


def test_agent_lists_a_day_up_to_a_note(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    try:
        for n in range(3):
            box.accept(txn_event("sale", f"T{n}", DAYS[0], 100, False))
    finally:
        box.close()
    listed = control_totals.day_totals(sqlite3.connect(path), "S001", "2026-11-27", 2)
    assert [t.pos_txn_id for t in listed.sales.transactions] == ["T0", "T1"] and listed.as_of == 2


def test_the_agent_lists_a_day_to_the_ops_key_only(tmp_path):
    """GET /control/transactions through the agent's own handler: a till's key is refused,
    the store's ops key gets the day's list up to the note asked for."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    for n in range(3):
        box.accept(txn_event("sale", f"T{n}", DAYS[0], 100, False))
    keys = TerminalKeys(tmp_path / "terminal_keys.json")
    till, ops = bytes.fromhex(keys.add("07")), bytes.fromhex(keys.add("OPSDESK"))
    totals = control_totals.ControlTotalsPublisher()
    totals.attach(path, "S001", "amqp://u:p@127.0.0.1:1/v", PublisherSettings(), 60, 3)
    store = SimpleNamespace(store_id="S001", outbox=box, totals=totals, verifier=Verifier(keys),
                            config=AgentSettings(auth_required=True))
    agent = worker_factory(StoreAgent, store=store)

    def get(terminal: str, key: bytes):
        url = "/control/transactions?day=2026-11-27&as_of=2"
        request = EnvironBuilder(method="GET", path=url, headers=signed_headers(terminal, key, "GET", url, b"")
                                 ).get_request()
        return agent.control_transactions(request)
    try:
        assert get("07", till).status_code == 403
        answer = get("OPSDESK", ops)
        assert answer.status_code == 200
        listed = json.loads(answer.get_data())
        assert [t["pos_txn_id"] for t in listed["sales"]["transactions"]] == ["T0", "T1"]
        unsigned = EnvironBuilder(method="GET", path="/control/transactions?day=2026-11-27").get_request()
        assert agent.control_transactions(unsigned).status_code == 401
    finally:
        box.close()


def test_the_schedule_asks_for_a_list_only_once_the_day_has_settled_and_once(estate):
    """Round 1: the digests differ (the ERP lacks S001-3): nothing is asked yet, the gauge
    is left alone. Round 2, nothing changed: the list is asked for, the gap is named. Round
    3, still nothing changed: that report stands, the agent is not asked again. A new
    snapshot starts it over."""
    e, agent = estate
    service = worker_factory(ReconcileService, estate=e)
    store.keep_latest(e.totals, v2(sales_digest("S001-1", "S001-2", "S001-3"), TxnDigest()))
    assert service.reconcile() == {} and agent.asked == []
    assert service.reconcile() == {"S001": 1} and len(agent.asked) == 1
    assert service.reconcile() == {"S001": 1} and len(agent.asked) == 1
    store.keep_latest(e.totals, v2(sales_digest("S001-1", "S001-2", "S001-3", "S001-4"), TxnDigest(), as_of=12))
    assert service.reconcile() == {} and len(agent.asked) == 1
