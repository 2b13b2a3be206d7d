"""The process engine's transitions on a real SQLite file, without a broker: what a start,
replies, a refusal, a timeout and an ops retry do to an instance and what they send."""
from __future__ import annotations

import json
import time
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from contracts.cases import ProcessStepRetryV1
from contracts.envelope import CloudEvent
from contracts.process import ProcessStepFailedV1
from bus.process import store
from bus.process.definition import ProcessDefinition, Step
from bus.process.engine import REPLY_SUFFIX, Effects, Engine

pytestmark = pytest.mark.unit


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ref: str


def _model(type_name: str) -> type[BaseModel]:
    return type(type_name, (_Msg,), {"TYPE": type_name, "__annotations__": {"TYPE": ClassVar[str]}})


Started, Did, Undid = _model("test.started.v1"), _model("test.did.v1"), _model("test.undid.v1")


def _step(name: str, target: str, undo: bool = True, on_failure: str = "compensate") -> Step:
    return Step(name, target=target, command=lambda ctx: Did(ref=f"{name}:{ctx.key}"), reply=Did,
                on_reply=lambda ctx, r: ctx.data.setdefault("done", []).append(name),
                compensation=(lambda ctx: Undid(ref=f"undo {name}")) if undo else None,
                compensation_reply=Undid if undo else None, timeout=5, resends=1, on_failure=on_failure)


DEFINITION = ProcessDefinition("test_flow", Started, lambda m: m.ref, (
    _step("pivot", "erp", undo=False), _step("first", "loyalty"), _step("second", "loyalty"),
    _step("third", "loyalty"), _step("note", "crm", undo=False, on_failure="case")))


@pytest.fixture
def engine(tmp_path):
    db = store.open_engine(f"sqlite:///{tmp_path / 'p.db'}")
    store.create(db)
    yield Engine(DEFINITION, "tests", {s.name: (s.timeout, s.resends) for s in DEFINITION.steps}), db
    db.dispose()


def _event(model: BaseModel, corr: str | None = None, key: str | None = None) -> CloudEvent:
    return CloudEvent.model_construct(id=str(time.time_ns()), type=model.TYPE, source="t", correlationid=corr or "c",
                                      idempotencykey=key or f"k{time.time_ns()}", data={}, subject=None)


def _outbox(db) -> list[tuple[str, dict]]:
    with db.connect() as conn:
        rows = conn.execute(select(store.OUTBOX.c.ROUTING_KEY, store.OUTBOX.c.BODY).order_by(store.OUTBOX.c.ID))
        return [(r.ROUTING_KEY, json.loads(r.BODY)) for r in rows]


def _apply(pair, fn):
    """One transition in its transaction, its history and messages written as the manager does."""
    engine, db = pair
    fx = Effects()
    with store.transaction(db) as conn:
        result = fn(engine, conn, fx)
        store.write(conn, fx.history, fx.outbox)
    return result


def _reply_to(db, model) -> CloudEvent:
    """The reply a command handler sends to the last command queued."""
    _, last = _outbox(db)[-1]
    return _event(model, last["correlationid"], last["idempotencykey"] + REPLY_SUFFIX)


def _instance(db, pid):
    with db.connect() as conn:
        return store.load(conn, "test_flow", pid)


def test_a_start_twice_is_one_instance_and_replies_run_the_steps_in_order(engine):
    _, db = engine
    start = _event(Started(ref="K1"), key="start-1")
    pid = _apply(engine, lambda e, c, fx: e.start(c, start, Started(ref="K1"), fx))
    again = _apply(engine, lambda e, c, fx: e.start(c, _event(Started(ref="K1"), key="start-2"), Started(ref="K1"), fx))
    assert pid and again is None
    for _ in range(5):
        reply = _reply_to(db, Did)
        assert _apply(engine, lambda e, c, fx: e.handle(c, reply, Did(ref="x"), fx)) == "done"
        assert _apply(engine, lambda e, c, fx: e.handle(c, reply, Did(ref="x"), fx)) == "duplicate"
    inst = _instance(db, pid)
    assert inst.state == "completed" and inst.data["done"] == ["pivot", "first", "second", "third", "note"]
    assert [key for key, _ in _outbox(db)] == ["test.did.v1"] * 5
    assert [body["idempotencykey"].split(":")[2] for _, body in _outbox(db)] == [
        "pivot", "first", "second", "third", "note"]


def test_a_refusal_undoes_the_done_steps_latest_first_and_opens_a_case(engine):
    _, db = engine
    pid = _apply(engine, lambda e, c, fx: e.start(c, _event(Started(ref="K2")), Started(ref="K2"), fx))
    for _ in range(3):  # pivot, first and second done
        reply = _reply_to(db, Did)
        _apply(engine, lambda e, c, fx: e.handle(c, reply, Did(ref="x"), fx))
    refusal = _reply_to(db, ProcessStepFailedV1)
    payload = ProcessStepFailedV1(command_type="test.did.v1", command_id="x", code="no", reason="not today")
    assert _apply(engine, lambda e, c, fx: e.handle(c, refusal, payload, fx)) == "refused"
    undone = []
    for _ in range(2):  # the latest done step first
        undone.append(_outbox(db)[-1][1]["data"]["ref"])
        reply = _reply_to(db, Undid)
        assert _apply(engine, lambda e, c, fx: e.handle(c, reply, Undid(ref="x"), fx)) == "compensated"
    assert undone == ["undo second", "undo first"]
    inst = _instance(db, pid)
    assert inst.state == "failed"
    assert [s["status"] for s in inst.steps] == ["not_compensated", "compensated", "compensated", "failed", "pending"]
    kind, case = _outbox(db)[-1]
    assert kind == "case.opened.v1" and case["data"]["case_id"] == "test_flow_third_failed:K2"
    assert "Undone: first, second. Still in effect: pivot" in case["data"]["summary"]
    # ops retry: the process runs on from the first step not done, with new keys
    retry = ProcessStepRetryV1(process="test_flow", process_id=pid, case_id=case["data"]["case_id"], requested_by="me")
    assert _apply(engine, lambda e, c, fx: e.handle(c, _event(retry), retry, fx)) == "retried"
    kind, command = _outbox(db)[-1]
    assert command["data"] == {"ref": "first:K2"} and command["idempotencykey"].endswith(":first:1")


def test_no_reply_resends_then_a_case_step_parks_and_a_late_reply_goes_on(engine):
    _, db = engine
    pid = _apply(engine, lambda e, c, fx: e.start(c, _event(Started(ref="K3")), Started(ref="K3"), fx))
    for _ in range(4):
        reply = _reply_to(db, Did)
        _apply(engine, lambda e, c, fx: e.handle(c, reply, Did(ref="x"), fx))
    first_note = _outbox(db)[-1][1]
    later = time.time() + 10
    assert _apply(engine, lambda e, c, fx: e.timeout(c, pid, later, fx)) == "timeout"
    resent = _outbox(db)[-1][1]
    assert resent["idempotencykey"] == first_note["idempotencykey"] and resent["id"] != first_note["id"]
    assert _apply(engine, lambda e, c, fx: e.timeout(c, pid, time.time() + 1, fx)) == "not due"  # resent: due anew
    assert _apply(engine, lambda e, c, fx: e.timeout(c, pid, later + 10, fx)) == "timeout"
    inst = _instance(db, pid)
    assert inst.state == "failed" and inst.steps[4]["status"] == "failed" and inst.due_at is None
    assert _outbox(db)[-1][1]["data"]["case_type"] == "test_flow_note_failed"
    late = _event(Did(ref="x"), pid, first_note["idempotencykey"] + REPLY_SUFFIX)
    assert _apply(engine, lambda e, c, fx: e.handle(c, late, Did(ref="x"), fx)) == "done"
    assert _instance(db, pid).state == "completed"


def test_a_reply_of_another_instance_or_process_changes_nothing(engine):
    _, db = engine
    stray = _event(Did(ref="x"), "01J8Z3Q5W8N4T6B2C9D0E1F2G3")
    assert _apply(engine, lambda e, c, fx: e.handle(c, stray, Did(ref="x"), fx)) == "orphan"
    other = ProcessStepRetryV1(process="another", process_id="x", case_id="c:1", requested_by="me")
    assert _apply(engine, lambda e, c, fx: e.handle(c, _event(other), other, fx)) == "not ours"
    assert _outbox(db) == []


def test_new_id_is_a_ulid_as_python_ulid_reads_it():
    """engine.new_id spells a ULID faster than python-ulid: the library must read back its time
    and randomness, and ids sort by their millisecond."""
    from ulid import ULID

    from bus.process.engine import new_id

    before = int(time.time() * 1000)
    ids = [new_id() for _ in range(2000)]
    after = int(time.time() * 1000)
    for made in ids[:200]:
        parsed = ULID.from_str(made)
        assert str(parsed) == made and len(made) == 26
        assert before <= parsed.milliseconds <= after
    assert len(set(ids)) == len(ids)
    stamps = [ULID.from_str(i).milliseconds for i in ids]
    assert stamps == sorted(stamps) and [i[:10] for i in ids] == sorted(i[:10] for i in ids)
    assert len({ULID.from_str(i).bytes[6:] for i in ids}) == len(ids)  # 80 random bits each
