"""Reconciliation: the comparison rules (plain functions), the agent's control
notes in a real outbox file, the reconcile database, the points-file reader and
`retailbus reconcile` over a real SQLite legacy DB and real files (no broker)."""
from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace

import eventlet
import pytest
import yaml
from click.testing import CliRunner
from eventlet import wsgi
from nameko.testing.services import worker_factory
from pydantic import ValidationError
from werkzeug.test import EnvironBuilder

from contracts.control import ControlTxn, KindTotals, StoreControlTotalsV1
from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import SLS_HDR, create_schema, engine_for
from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop.outbound import fixed_record
from legacy_wrappers.legacy_http import LegacyHttpClient
from routing import control_totals
from routing.day_totals import RunningTotals
from routing.store_agent import StoreAgent
from routing.legacy_payload import sale_from_legacy
from routing.outbox import Outbox
from routing.route_state import RouteStats
from routing.route_table import parse_route_table
from bus.publisher import UnroutableError
from services.cli import main
from services.reconcile import sources, store
from services.reconcile.compare import ErpDoc, PointsRow, reconcile, render
from bus.settings import AgentSettings, PublisherSettings
from tests.integration.support import legacy_sale, write_config

pytestmark = pytest.mark.unit

DAY = date(2026, 11, 27)
REPO = Path(__file__).parents[2]


def txn(pos_id: str, total: int = 3998, card: bool = False, via: str = "bus") -> ControlTxn:
    return ControlTxn(pos_txn_id=pos_id, total_minor=total, currency="EUR", loyalty_card=card, via=via)


def totals(sales: list[ControlTxn], returns: list[ControlTxn] = (), as_of: int = 10,
           store_id: str = "S001") -> StoreControlTotalsV1:
    return StoreControlTotalsV1(store_id=store_id, business_day=DAY, as_of=as_of, taken_at=datetime.now(UTC),
                                sales=KindTotals.of(list(sales)), returns=KindTotals.of(list(returns)))


def doc(pos_id: str, total: int = 3998, kind: str = "sale", doc_no: str = "") -> ErpDoc:
    return ErpDoc(kind, pos_id, total, "EUR", doc_no or f"D-{pos_id}")


# -- the comparison ----------------------------------------------------------

def test_a_day_that_adds_up_has_no_gap():
    agent = totals([txn("A1"), txn("A2", card=True)], [txn("R1", 500, card=True)])
    report = reconcile("S001", DAY, agent, [doc("A1"), doc("A2"), doc("R1", 500, "return")],
                       [PointsRow("sale", "A2", 39), PointsRow("return", "R1", 5)])
    assert report.gap == 0
    assert report.agent["sale"].count == 2 and report.agent["sale"].amount_minor == {"EUR": 7996}
    assert report.erp["return"].amount_minor == {"EUR": 500}
    assert report.loyalty == {"sale": 1, "return": 1}


def test_names_missing_duplicated_unexpected_and_mismatched_postings():
    agent = totals([txn("A1"), txn("A2"), txn("A3"), txn("A4", 100)])
    report = reconcile("S001", DAY, agent,
                       [doc("A2"), doc("A2", doc_no="S2B"), doc("A3"), doc("A4", 999), doc("X9")], [])
    assert [f.pos_txn_id for f in report.erp_missing] == ["A1"]
    assert [f.pos_txn_id for f in report.erp_duplicated] == ["A2"]
    assert "2 documents" in report.erp_duplicated[0].detail and "S2B" in report.erp_duplicated[0].detail
    assert [f.pos_txn_id for f in report.erp_unexpected] == ["X9"]
    assert [f.pos_txn_id for f in report.amount_mismatch] == ["A4"]
    assert report.gap == 4


def test_a_sale_and_a_return_with_the_same_pos_id_are_different_transactions():
    report = reconcile("S001", DAY, totals([txn("T1")]), [doc("T1", kind="return")], [])
    assert [(f.kind, f.pos_txn_id) for f in report.erp_missing] == [("sale", "T1")]
    assert [(f.kind, f.pos_txn_id) for f in report.erp_unexpected] == [("return", "T1")]


def test_points_expected_only_for_bus_transactions_with_a_card_and_a_point():
    agent = totals([txn("B1", card=True), txn("B2", card=True), txn("L1", card=True, via="legacy"),
                    txn("C1", 99, card=True), txn("N1")])
    erp = [doc("B1"), doc("B2"), doc("L1"), doc("C1", 99), doc("N1")]
    report = reconcile("S001", DAY, agent, erp,
                       [PointsRow("sale", "B2", 39, "f1"), PointsRow("sale", "B2", 39, "f2"),
                        PointsRow("sale", "N1", 39, "f1")])
    assert [f.pos_txn_id for f in report.loyalty_missing] == ["B1"]
    assert [f.pos_txn_id for f in report.loyalty_duplicated] == ["B2"]
    assert "f1, f2" in report.loyalty_duplicated[0].detail
    assert [f.pos_txn_id for f in report.loyalty_unexpected] == ["N1"]
    assert report.gap == 3


def test_without_a_points_file_configured_the_loyalty_side_is_not_checked():
    report = reconcile("S001", DAY, totals([txn("B1", card=True)]), [doc("B1")], None)
    assert report.gap == 0 and report.loyalty == {"sale": 0, "return": 0}


def test_no_totals_from_a_store_makes_every_posting_unexpected():
    report = reconcile("S002", DAY, None, [doc("A1")], [])
    assert not report.totals_received and report.gap == 1
    assert "no control totals received" in render(report)


def test_render_lists_each_finding_by_pos_id():
    report = reconcile("S001", DAY, totals([txn("A1"), txn("A2")]), [doc("A2"), doc("A2", doc_no="S9")], [])
    text = render(report)
    assert "GAP 2" in text
    assert "erp missing" in text and "A1" in text and "erp duplicated" in text


# -- the contract --------------------------------------------------------------

def test_control_totals_must_add_up():
    with pytest.raises(ValidationError, match="count 3 != 1"):
        KindTotals(count=3, amount_minor={"EUR": 3998}, transactions=[txn("A1")])
    with pytest.raises(ValidationError, match="amount_minor"):
        KindTotals(count=1, amount_minor={"EUR": 1}, transactions=[txn("A1")])
    with pytest.raises(ValidationError, match="listed twice"):
        KindTotals.of([txn("A1"), txn("A1")])


def test_control_totals_travel_in_a_cloudevent():
    event = CloudEvent.new(StoreControlTotalsV1.TYPE, "store/S001/agent", totals([txn("A1")]),
                           idempotencykey="k")
    assert CloudEvent.from_json(event.to_json()).payload() == totals([txn("A1")]).model_copy(
        update={"taken_at": event.payload().taken_at})


# -- the agent's notes -----------------------------------------------------------

def sale_event(pos_id: str, card: str | None = None, store_id: str = "S001") -> CloudEvent:
    sale = sale_from_legacy({**legacy_sale(pos_id, store=store_id), **({"LOYALTY_CARD": card} if card else {})})
    return CloudEvent.new("pos.sale.v1", f"store/{store_id}/pos/07", sale, subject=pos_id,
                          idempotencykey=f"pos.sale.v1:{store_id}:{pos_id}")


def test_outbox_notes_each_accepted_sale_once_in_the_same_commit(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    try:
        box.accept(sale_event("S001-1"))
        box.accept(sale_event("S001-1"))  # a retry of the till
        box.accept(sale_event("S001-2"))
        box.accept(CloudEvent.new("test.thing.v1", "x", {"n": 1}, idempotencykey="other"))
        box.record_accepted("pos.sale.v1", sale_from_legacy(legacy_sale("S001-3")).model_dump(mode="json"))
    finally:
        box.close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    running = RunningTotals(86400)
    running.recount(db, datetime.now().timestamp())
    [(name, day_running)] = running.days.items()
    assert (name, day_running.as_of, day_running.last_seq) == ("2026-11-27", 3, 2)  # the last sale in outbox row 2
    day = control_totals.day_totals(db, "S001", "2026-11-27", 3)
    assert [(t.pos_txn_id, t.via) for t in day.sales.transactions] == \
        [("S001-1", "bus"), ("S001-2", "bus"), ("S001-3", "legacy")]
    assert day.sales.amount_minor == {"EUR": 3 * 3998} and day.returns.count == 0 and day.as_of == 3
    assert control_totals.day_totals(db, "S001", "2026-11-27", 1).sales.count == 1  # as of note 1
    assert control_totals.unsent_up_to(db, 2) == 2


def test_compaction_drops_old_notes(tmp_path):
    box = Outbox(tmp_path / "outbox.db", retention_days=1)
    try:
        box.accept(sale_event("S001-1"))
        box.compact(now=datetime.now().timestamp() + 2 * 86400)
    finally:
        box.close()
    assert sqlite3.connect(tmp_path / "outbox.db").execute("SELECT count(*) FROM accepted_txn").fetchone() == (0,)


# -- the reconcile database ---------------------------------------------------------

def test_only_a_later_snapshot_replaces_the_held_one(tmp_path):
    engine = store.open_engine(f"sqlite:///{tmp_path / 'r' / 'reconcile.db'}")
    assert store.keep_latest(engine, totals([txn("A1")], as_of=5))
    assert store.keep_latest(engine, totals([txn("A1"), txn("A2")], as_of=9))
    assert not store.keep_latest(engine, totals([txn("A1")], as_of=7))  # late and older
    assert not store.keep_latest(engine, totals([txn("A1"), txn("A2")], as_of=9))  # redelivered
    held = store.totals_for(engine, DAY)
    assert held["S001"].as_of == 9 and held["S001"].sales.count == 2
    assert store.latest_days(engine) == {"S001": DAY}


# -- retailbus reconcile ----------------------------------------------------------------

def points_file(folder: Path, name: str, rows: list[dict], complete: bool = True):
    fields = fd_config.load(REPO / "config" / "filedrops.yaml").outbound["loyalty_points"].fields
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"H{name}"] + [fixed_record(fields, r) for r in rows] + [f"T{len(rows):09d}{0:015d}"]
    (folder / name).write_text("\n".join(lines) + "\n")
    if complete:
        (folder / (name + ".done")).touch()


def points(pos_id: str, kind: str = "A") -> dict:
    return {"kind": kind, "card": "LC0000000001", "store_id": "S001", "pos_txn_id": pos_id,
            "business_day": "20261127", "points": 39, "basis_minor": 3998, "currency": "EUR"}


@pytest.fixture
def estate(tmp_path):
    legacy = tmp_path / "legacy.db"
    create_schema(engine_for(f"sqlite:///{legacy}"))
    config = write_config(tmp_path, "amqp://unused", legacy_db=f"sqlite:///{legacy}",
                          stores=[{"id": "S001"}], reconcile={"dsn": "sqlite:///var/reconcile.db"})
    shutil.copy(REPO / "config" / "filedrops.yaml", config.parent / "filedrops.yaml")
    engine = store.open_engine(f"sqlite:///{tmp_path / 'var' / 'reconcile.db'}")
    store.keep_latest(engine, totals([txn("S001-1"), txn("S001-2", card=True), txn("S001-3")]))
    with engine_for(f"sqlite:///{legacy}").begin() as conn:
        for n, pos_id in enumerate(["S001-1", "S001-2", "S001-3"]):
            conn.execute(SLS_HDR.insert().values(
                DOC_NO=f"S{n:08d}", DOC_TYPE="S", STORE_NO="S001", TERM_NO="07", POS_TXN_ID=pos_id,
                TXN_DATE="20261127", TOTAL_CENTS=3998, CURRENCY="EUR", CHANNEL="RBUS", CREATED_TS="x"))
    points_file(tmp_path / "var" / "drops" / "loyalty_out", "POINTS_1.dat", [points("S001-2")])
    points_file(tmp_path / "var" / "drops" / "loyalty_out", "POINTS_2.dat", [points("S001-2")], complete=False)
    return tmp_path, config, legacy


def run(*args):
    return CliRunner().invoke(main, ["reconcile", *map(str, args)])


def test_points_reader_takes_complete_files_of_the_store_and_day(estate):
    root, _, _ = estate
    drop = fd_config.load(root / "config" / "filedrops.yaml").outbound["loyalty_points"]
    assert sources.points_rows(drop, "S001", DAY) == [PointsRow("sale", "S001-2", 39, "POINTS_1.dat")]
    assert sources.points_rows(drop, "S002", DAY) == []
    assert sources.points_rows(drop, "S001", date(2026, 11, 26)) == []


def test_cli_exit_0_when_the_day_reconciles(estate):
    _, config, _ = estate
    result = run("--date", "2026-11-27", "--config", config)
    assert result.exit_code == 0, result.output
    assert "store S001  business day 2026-11-27  OK" in result.output and "no differences" in result.output


def test_cli_exit_1_naming_a_deleted_and_a_duplicated_posting(estate):
    _, config, legacy = estate
    with sqlite3.connect(legacy) as db:
        db.execute("DELETE FROM SLS_HDR WHERE POS_TXN_ID = 'S001-1'")
        db.execute("INSERT INTO SLS_HDR SELECT 'S99999999', DOC_TYPE, STORE_NO, TERM_NO, POS_TXN_ID, TXN_DATE, "
                   "TXN_TIME, TOTAL_CENTS, CURRENCY, LOYALTY_CARD, CUST_NO, ORIG_DOC_NO, CHANNEL, CREATED_TS "
                   "FROM SLS_HDR WHERE POS_TXN_ID = 'S001-3'")
    result = run("--date", "2026-11-27", "--store", "S001", "--json", "--config", config)
    assert result.exit_code == 1, result.output
    [report] = json.loads(result.output)
    assert report["gap"] == 2
    assert [f["pos_txn_id"] for f in report["erp_missing"]] == ["S001-1"]
    assert [f["pos_txn_id"] for f in report["erp_duplicated"]] == ["S001-3"]
    assert report["erp"]["sale"] == {"count": 3, "amount_minor": {"EUR": 3 * 3998}}  # same count, wrong txns


def test_cli_bad_input_exits_2_naming_the_problem(estate, tmp_path):
    _, config, _ = estate
    result = run("--date", "27.11.2026", "--config", config)
    assert result.exit_code == 2 and "--date" in result.output
    result = run("--date", "2026-11-27", "--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "cannot read" in result.output
    broken = yaml_with(config, LEGACY_DB_URI=f"sqlite:///{tmp_path / 'missing.db'}")
    result = run("--date", "2026-11-27", "--config", broken)
    assert result.exit_code == 2 and "LEGACY_DB_URI: no legacy ERP database" in result.output


def yaml_with(config: Path, **keys) -> Path:
    data = yaml.safe_load(config.read_text())
    data.update(keys)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


# -- the agent's control-totals publisher: behind the sales, only when changed ----------

class Recorder:
    """Stands in for the confirming publisher: records what would be confirmed."""

    def __init__(self, error: Exception | None = None):
        self.sent, self.error = [], error

    def publish(self, message):
        if self.error:
            raise self.error
        self.sent.append(message)


def test_control_totals_leave_after_the_sales_they_count_and_only_when_changed(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    totals_out = control_totals.ControlTotalsPublisher()
    totals_out.attach(path, "S001", "amqp://store-S001:pw@127.0.0.1:1/v", PublisherSettings(), 0.3, 3)
    totals_out._db = sqlite3.connect(path, check_same_thread=False)
    try:
        box.accept(sale_event("S001-1"))
        box.accept(sale_event("S001-2", card="LC0000000001"))
        totals_out.publisher = Recorder(UnroutableError("no queue bound"))
        assert totals_out.publish_changed() == 0  # the sales are not sent yet: nothing leaves

        box.mark_sent([1, 2])
        assert totals_out.publish_changed() == 0 and totals_out.published == {}  # unroutable: taken again
        totals_out.publisher = Recorder()
        assert totals_out.publish_changed() == 1
        [message] = totals_out.publisher.sent
        assert (message.exchange, message.routing_key, message.user_id) == \
            ("store_agent.events", "store.control_totals.v2", "store-S001")
        day = CloudEvent.from_json(message.body).payload()
        assert (day.sales.count, day.as_of, day.sales.loyalty_count) == (2, 2, 1)
        assert totals_out.publish_changed() == 0  # unchanged: not sent again

        box.record_accepted("pos.sale.v1", sale_from_legacy(legacy_sale("S001-3")).model_dump(mode="json"))
        assert totals_out.publish_changed() == 1  # a legacy-mode sale has no outbox row to wait for
        assert CloudEvent.from_json(totals_out.publisher.sent[-1].body).payload().sales.count == 3
    finally:
        box.close()
        totals_out._db.close()


# -- legacy mode: the agent notes what the legacy ERP answered OK ------------------------

LEGACY_TABLE = """version: 1
legacy: {{base_url: "http://127.0.0.1:{port}"}}
routes:
  - {{name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: legacy}}
"""


def test_agent_notes_a_sale_the_legacy_erp_accepted_and_not_one_it_refused(tmp_path):
    def legacy_erp(environ, start_response):  # a real HTTP server standing in for the legacy ERP
        body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        ok = body["TXN_ID"] != "S001-REFUSED"
        start_response("200 OK" if ok else "400 Bad Request", [("Content-Type", "application/json")])
        return [json.dumps({"STATUS": "OK", "DOC_NO": "S00000001"} if ok else {"STATUS": "ERROR"}).encode()]

    sock = eventlet.listen(("127.0.0.1", 0))
    server = eventlet.spawn(wsgi.server, sock, legacy_erp, log_output=False)
    box = Outbox(tmp_path / "outbox.db")
    try:
        store_dep = SimpleNamespace(store_id="S001", outbox=box, forwarder=SimpleNamespace(wake=lambda: None),
                                    config=AgentSettings(auth_required=False), verifier=None,
                                    later=lambda fn, *args: fn(*args))
        routes = SimpleNamespace(table=parse_route_table(LEGACY_TABLE.format(port=sock.getsockname()[1])),
                                 stats=RouteStats())
        agent = worker_factory(StoreAgent, store=store_dep, routes=routes,
                               legacy=lambda base_url, timeout: LegacyHttpClient(base_url, timeout))
        for txn_id in ("S001-LEG1", "S001-REFUSED"):
            req = EnvironBuilder(method="POST", path="/erp/sales", data=json.dumps(legacy_sale(txn_id)),
                                 content_type="application/json").get_request()
            agent.post_sale(req)
        assert box.unsent(10) == []  # legacy mode: nothing for the forwarder
    finally:
        box.close()
        server.kill()
        sock.close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    assert db.execute("SELECT pos_txn_id, via, outbox_seq FROM accepted_txn").fetchall() == \
        [("S001-LEG1", "legacy", None)]
