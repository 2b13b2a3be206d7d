"""The business exception workbench without a broker: SLA arithmetic, the age buckets the
gauges count, config/cases.yaml refused by line and field path, and the cases database
(real SQLite files): one case per id, state changes refused once resolved, a retry only for
a case with a process, and a history the database itself keeps append-only; the service's
workers (worker_factory) on that database."""
from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from nameko.testing.services import worker_factory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from bus import journal
from bus.consumer import DUPLICATE
from bus.publisher import UnroutableError
from contracts.cases import CaseOpenedV1, ProcessStepRetryV1
from contracts.envelope import CloudEvent
from services.cases import rules, store
from services.cases.rules import CasesConfigError
from services.cases.service import CasesService

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
T0 = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)


def case(case_id="loyalty_over_redemption:S001:S001-07-1", case_type="loyalty_over_redemption", **fields):
    return CaseOpenedV1(**{"case_id": case_id, "case_type": case_type, "store_id": "S001",
                           "transaction_id": "S001-07-1", "summary": "card LC1: 300 points not covered",
                           "opened_at": T0, **fields})


# ---------------------------------------------------------------------- rules
def test_the_shipped_file_is_valid_and_sets_the_deadline_by_type():
    config = rules.load(ROOT / "config" / "cases.yaml")
    assert rules.due_at(config, "loyalty_over_redemption", T0) == T0 + timedelta(days=2)
    assert rules.due_at(config, "order_failed", T0) == T0 + timedelta(hours=4)
    assert rules.due_at(config, "never_heard_of", T0) == T0 + timedelta(hours=24)  # default_sla
    assert config.known("return_over_quantity") and not config.known("never_heard_of")


@pytest.mark.parametrize("given, expected", [("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)),
                                             ("4h", timedelta(hours=4)), ("2d", timedelta(days=2))])
def test_durations(given, expected):
    assert rules.duration(given) == expected


@pytest.mark.parametrize("bad", ["0h", "4", "1.5h", "4 h", "2w", ""])
def test_a_duration_needs_a_whole_number_and_a_unit(bad):
    with pytest.raises(ValueError, match="expected a whole number and a unit"):
        rules.duration(bad)


def test_age_buckets_and_the_tally_give_every_known_type_every_bucket():
    assert [rules.age_bucket(T0 - timedelta(hours=h), T0) for h in (0, 0.99, 1, 5, 30, 100)] == \
        ["0-1h", "0-1h", "1-4h", "4-24h", "1-3d", "3d+"]
    rows = [("a", store.stamp(T0 - timedelta(hours=2)), store.stamp(T0 - timedelta(minutes=1))),   # late
            ("a", store.stamp(T0 - timedelta(minutes=5)), store.stamp(T0 + timedelta(hours=1))),
            ("unlisted", store.stamp(T0 - timedelta(days=5)), store.stamp(T0 + timedelta(seconds=1)))]
    opened, late = rules.tally(rows, T0, {"a", "b"})
    assert late == {"a": 1, "b": 0, "unlisted": 0}
    assert opened[("a", "1-4h")] == 1 and opened[("a", "0-1h")] == 1 and opened[("unlisted", "3d+")] == 1
    assert opened[("b", "0-1h")] == 0 and len(opened) == 3 * len(rules.AGE_BUCKETS)


@pytest.mark.parametrize("text_, expected", [
    ("types:\n  loyalty_over_redemption: {sla: 2d}\n  return_over_quantity:\n    sla: 2 days\n",
     r"cases.yaml:4: types.return_over_quantity.sla: String should match pattern"),
    ("default_sla: 24h\ntypes:\n  return_over_quantity: {sla: 2d, slaa: 3d}\n",
     r"cases.yaml:3: types.return_over_quantity: unknown key 'slaa' \(did you mean 'sla'\?\)"),
    ("default_sla: 24h\ndefault_sl: 2h\n", r"cases.yaml:2: <top>: unknown key 'default_sl' \(did you mean 'default_sla'\?\)"),
    ("types:\n  Return-Over: {sla: 2d}\n", r"cases.yaml:2: types.Return-Over.\[key\]: String should match pattern"),
    ("types:\n  return_over_quantity: {}\n", r"cases.yaml:2: types.return_over_quantity.sla: required, missing"),
    ("types:\n  a: {sla: 2d}\n  a: {sla: 3d}\n", r"cases.yaml:3: types: key 'a' is given twice \(first on line 2\)"),
    ("types:\n  a: {sla: 2d\n", r"cases.yaml:3: a \{mapping\} that is not closed"),
    ("- a\n", r"cases.yaml:1: expected a mapping"),
])
def test_a_bad_file_is_refused_with_its_line_and_field_path(text_, expected):
    with pytest.raises(CasesConfigError, match=expected):
        rules.parse(text_, "cases.yaml")


def test_a_missing_file_is_refused_by_name(tmp_path):
    with pytest.raises(CasesConfigError, match=r"nothing.yaml: cannot read"):
        rules.load(tmp_path / "nothing.yaml")


# ---------------------------------------------------------------------- the database
@pytest.fixture
def engine(tmp_path):
    engine = store.open_engine(f"sqlite:///{tmp_path / 'cases.db'}")
    yield engine
    engine.dispose()


def opened(engine, c: CaseOpenedV1, source="retailbus/loyalty") -> bool:
    with engine.begin() as conn:
        return store.open_case(conn, c, c.opened_at + timedelta(days=2), source, "corr-1", T0)


def test_one_case_per_id_however_often_it_is_opened(engine):
    assert opened(engine, case()) is True
    assert opened(engine, case(summary="the same, said again")) is False
    assert opened(engine, case(), source="retailbus/returns") is False
    with engine.connect() as conn:
        found = store.get(conn, case().case_id)
        assert found["state"] == "open" and found["summary"] == "card LC1: 300 points not covered"
        assert found["due_at"] == store.stamp(T0 + timedelta(days=2)) and found["opened_by"] == "retailbus/loyalty"
        assert [h["action"] for h in store.history(conn, case().case_id)] == ["opened"]


def test_assign_then_resolve_then_every_change_is_refused(engine):
    opened(engine, case())
    cid = case().case_id
    with engine.begin() as conn:
        assert store.assign(conn, cid, "ana", "opsuser", T0)["state"] == "assigned"
        assert store.assign(conn, cid, "ben", "opsuser", T0)["owner"] == "ben"
        done = store.resolve(conn, cid, "card topped up by goodwill", "opsuser2", T0 + timedelta(hours=1))
    assert done["state"] == "resolved" and done["resolution"] == "card topped up by goodwill"
    for change in (lambda conn: store.assign(conn, cid, "cy", "x", T0),
                   lambda conn: store.resolve(conn, cid, "again", "x", T0)):
        with engine.begin() as conn, pytest.raises(store.CaseRefusedError, match="was resolved at .*goodwill"):
            change(conn)
    with engine.connect() as conn:
        assert [(h["action"], h["actor"], h["detail"]) for h in store.history(conn, cid)] == [
            ("opened", "retailbus/loyalty", "card LC1: 300 points not covered"), ("assigned", "opsuser", "to ana"),
            ("assigned", "opsuser", "to ben (was ana)"), ("resolved", "opsuser2", "card topped up by goodwill")]
    with engine.begin() as conn, pytest.raises(store.CaseNotFoundError, match="no case nope"):
        store.assign(conn, "nope", "ana", "x", T0)


def test_a_retry_needs_a_process_instance_and_counts_the_retries(engine):
    opened(engine, case())
    opened(engine, case("return_over_quantity:S001-R-1", "return_over_quantity", process="return_to_refund",
                        process_id="P-1"))
    with engine.begin() as conn, pytest.raises(store.CaseRefusedError, match="has no process instance to retry"):
        store.retry(conn, case().case_id, "ops", T0)
    for n in range(2):
        with engine.begin() as conn:
            found, earlier = store.retry(conn, "return_over_quantity:S001-R-1", "ops", T0)
        assert (found["process"], found["process_id"], earlier) == ("return_to_refund", "P-1", n)


def test_the_list_filters_by_type_store_state_and_deadline(engine):
    opened(engine, case())
    opened(engine, case("a:2", "return_over_quantity", store_id="S002"))
    opened(engine, case("a:3", "return_over_quantity", opened_at=T0 - timedelta(days=3)))  # due a day before T0
    with engine.begin() as conn:
        store.resolve(conn, "a:2", "fine", "ops", T0)

    def ids(**where):
        with engine.connect() as conn:
            return [c["case_id"] for c in store.select_cases(conn, store.Filter(**where))]
    assert ids() == ["a:3", case().case_id]                      # the nearest deadline first
    assert ids(case_type="return_over_quantity") == ["a:3"]
    assert ids(store_id="S002") == [] and ids(store_id="S002", states=store.STATES) == ["a:2"]
    assert ids(overdue_at=T0) == ["a:3"]
    assert ids(overdue_at=T0 + timedelta(days=3)) == ["a:3", case().case_id]


def test_the_database_refuses_to_change_or_delete_history(engine):
    opened(engine, case())
    for statement in ("UPDATE case_history SET actor = 'someone else'", "DELETE FROM case_history"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert [h["actor"] for h in store.history(conn, case().case_id)] == ["retailbus/loyalty"]


# ---------------------------------------------------------------------- the service's workers
class Events:
    """Stands in for the broker: records what was published, or refuses it as unroutable."""

    def __init__(self, routable: bool = True):
        self.routable, self.sent = routable, []

    def publish(self, event):
        if not self.routable:
            raise UnroutableError("no queue bound")
        self.sent.append(event)


def cases_worker(engine, events: Events):
    book = SimpleNamespace(engine=engine, rules=rules.parse("types:\n  return_over_quantity: {sla: 2d}\n"),
                           rules_path="cases.yaml")
    return worker_factory(CasesService, book=book, events=events)


def envelope(c: CaseOpenedV1, key: str | None = None) -> CloudEvent:
    return CloudEvent.new(CaseOpenedV1.TYPE, "retailbus/returns", c, subject=c.case_id,
                          idempotencykey=key or c.case_id)


def test_the_handler_opens_once_with_the_type_sla_or_the_default(engine):
    worker = cases_worker(engine, Events())
    known = case("return_over_quantity:S001-R-9", "return_over_quantity", process="return_to_refund",
                 process_id="P-9")
    assert worker.on_returns_case(known, envelope(known)) == known.case_id
    assert worker.on_returns_case(known, envelope(known)) is DUPLICATE                 # redelivered
    assert worker.on_loyalty_case(known, envelope(known, "another key")) is DUPLICATE   # sent again
    odd = case("odd_one:1", "odd_one")
    worker.on_loyalty_case(odd, envelope(odd))
    with engine.connect() as conn:
        assert store.get(conn, known.case_id)["due_at"] == store.stamp(T0 + timedelta(days=2))
        assert store.get(conn, "odd_one:1")["due_at"] == store.stamp(T0 + timedelta(hours=24))


def test_a_retry_no_process_service_receives_is_refused_and_leaves_no_history(engine):
    c = case("return_over_quantity:S001-R-8", "return_over_quantity", process="return_to_refund", process_id="P-8")
    cases_worker(engine, Events()).on_returns_case(c, envelope(c))
    with pytest.raises(store.CaseRefusedError, match="no queue takes process.step_retry.v1"):
        cases_worker(engine, Events(routable=False)).retry(c.case_id, "ops")
    with engine.connect() as conn:
        assert [h["action"] for h in store.history(conn, c.case_id)] == ["opened"]
    events = Events()
    assert cases_worker(engine, events).retry(c.case_id, "ops")["case_id"] == c.case_id
    [sent] = events.sent
    assert sent.payload() == ProcessStepRetryV1(process="return_to_refund", process_id="P-8", case_id=c.case_id,
                                                requested_by="ops")


def test_the_cli_given_values_are_checked_by_the_service(engine):
    c = case()
    worker = cases_worker(engine, Events())
    worker.on_loyalty_case(c, envelope(c))
    for call in (lambda: worker.assign(c.case_id, " ", "ops"), lambda: worker.resolve(c.case_id, "", "ops"),
                 lambda: worker.assign(c.case_id, "x" * 65, "ops"), lambda: worker.resolve(c.case_id, "ok", "")):
        with pytest.raises(store.CaseRefusedError, match="expected 1 to"):
            call()


def test_openings_and_changes_are_trace_hops_of_their_transaction(engine, monkeypatch):
    monkeypatch.setattr(journal.BUFFER, "limit", 100)  # as a process running a Journal has it
    monkeypatch.setattr(journal.BUFFER, "hops", deque())
    c = case()
    worker = cases_worker(engine, Events())
    worker.on_loyalty_case(c, envelope(c))
    worker.resolve(c.case_id, "settled", "ops")
    assert [(h["hop"], h["subject"], h["detail"]["case"]) for h in journal.BUFFER.hops] == [
        ("case_opened", "S001-07-1", c.case_id), ("case_resolved", "S001-07-1", c.case_id)]
