"""The cases service's database: the cases, and their append-only history.

`cases` holds one row per case id (the sender's deterministic id, so an opening
delivered twice, or sent by two services, is one case), with its state (open ->
assigned -> resolved; assigned again to another owner), its owner and its SLA
deadline. `case_history` holds one row per thing done to a case: who (the OS
user of the CLI, or the service that opened it), when, what. The database
refuses an UPDATE of a history row, a DELETE of one while its case exists, and a
DELETE of a case not resolved (triggers), so a later bug can neither rewrite an
audit nor drop one still in use. Retention (`prune`) deletes resolved cases past
`RETAILBUS.retention.cases_days`, then their history.

State changes are one conditional UPDATE each (`... WHERE state != 'resolved'`)
with their history row in the caller's transaction: two people resolving the
same case at once get one resolution and one refusal, on SQLite (one writer) and
on PostgreSQL (row lock) alike. Times are UTC ISO strings of one fixed format,
so they compare as text.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import DDL, Column, Index, Integer, MetaData, String, Table, delete, event, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from contracts.cases import CaseOpenedV1
from contracts.errors import RetailbusError
from legacy_wrappers.legacy_db import create_indexes, create_tables, engine_for

STATES = ("open", "assigned", "resolved")
UNRESOLVED = ("open", "assigned")

metadata = MetaData()
CASES = Table(
    "cases", metadata,
    Column("case_id", String(128), primary_key=True),
    Column("case_type", String(48), nullable=False),
    Column("state", String(16), nullable=False),
    Column("store_id", String(8)),
    Column("process", String(64)),
    Column("process_id", String(128)),
    Column("transaction_id", String(128)),
    Column("summary", String(2000), nullable=False),
    Column("owner", String(64)),
    Column("opened_at", String(32), nullable=False),   # when it happened, as the sender says
    Column("due_at", String(32), nullable=False),      # opened_at + the type's SLA at opening
    Column("opened_by", String(200), nullable=False),  # the event's source
    Column("correlation_id", String(200)),             # the opening's: a retry carries it on
    Column("received_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("resolved_at", String(32)),
    Column("resolution", String(2000)),
    Index("ix_cases_state_type", "state", "case_type"),
    Index("ix_cases_store", "store_id"),
    Index("ix_cases_transaction", "transaction_id"),
    Index("ix_cases_resolved", "state", "resolved_at"),  # retention: the oldest resolved first
)
HISTORY = Table(
    "case_history", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("case_id", String(128), nullable=False),
    Column("at", String(32), nullable=False),
    Column("actor", String(200), nullable=False),      # OS user of the CLI, or the opening service
    Column("action", String(16), nullable=False),      # opened | assigned | retried | resolved
    Column("detail", String(2000), nullable=False),
    Index("ix_case_history_case", "case_id", "seq"),
)

# The history is append-only in the database itself, created with each table; a database made
# before retention has its guards brought up to these by `_upgrade_guards`.
_REFUSE = "case_history is append-only"
_KEEP = "only a resolved case is deleted"
_GUARDS = {
    (HISTORY, "sqlite"): (
        f"CREATE TRIGGER case_history_no_update BEFORE UPDATE ON case_history "
        f"BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END",
        f"CREATE TRIGGER case_history_no_delete BEFORE DELETE ON case_history "
        f"WHEN EXISTS (SELECT 1 FROM cases WHERE case_id = OLD.case_id) BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END"),
    (CASES, "sqlite"): (
        f"CREATE TRIGGER cases_keep_unresolved BEFORE DELETE ON cases "
        f"WHEN OLD.state != 'resolved' BEGIN SELECT RAISE(ABORT, '{_KEEP}'); END",),
    (HISTORY, "postgresql"): (
        "CREATE OR REPLACE FUNCTION case_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF TG_OP = 'DELETE' AND NOT EXISTS (SELECT 1 FROM cases WHERE case_id = OLD.case_id) THEN RETURN OLD; "
        f"END IF; RAISE EXCEPTION '{_REFUSE}'; END $$",
        "CREATE OR REPLACE TRIGGER case_history_append_only BEFORE UPDATE OR DELETE ON case_history "
        "FOR EACH ROW EXECUTE FUNCTION case_history_append_only()"),
    (CASES, "postgresql"): (
        "CREATE OR REPLACE FUNCTION cases_keep_unresolved() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF OLD.state <> 'resolved' THEN RAISE EXCEPTION '{_KEEP}'; END IF; RETURN OLD; END $$",
        "CREATE OR REPLACE TRIGGER cases_keep_unresolved BEFORE DELETE ON cases "
        "FOR EACH ROW EXECUTE FUNCTION cases_keep_unresolved()"),
}
for (_table, _dialect), _statements in _GUARDS.items():
    for _statement in _statements:
        event.listen(_table, "after_create", DDL(_statement).execute_if(dialect=_dialect))


def _guards_current(engine: Engine) -> bool:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            triggers = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").all())
            return "WHEN" in triggers.get("case_history_no_delete", "") and "cases_keep_unresolved" in triggers
        return conn.exec_driver_sql("SELECT count(*) FROM pg_trigger WHERE tgname = 'cases_keep_unresolved'"
                                    ).scalar() == 1


def _upgrade_guards(engine: Engine) -> None:
    """A database made before retention refused every DELETE of history and guarded no case:
    its guards are replaced by today's, in one transaction (looked at first, so a database that
    has them is not written to; another process upgrading it at the same moment is no error)."""
    if _guards_current(engine):
        return
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("DROP TRIGGER IF EXISTS case_history_no_delete")
                conn.exec_driver_sql("DROP TRIGGER IF EXISTS cases_keep_unresolved")
                statements = _GUARDS[(HISTORY, "sqlite")][1:] + _GUARDS[(CASES, "sqlite")]
            else:
                statements = _GUARDS[(HISTORY, "postgresql")] + _GUARDS[(CASES, "postgresql")]
            for statement in statements:
                conn.exec_driver_sql(statement)
    except DBAPIError:
        if not _guards_current(engine):
            raise


_INSERT_CASE = {"sqlite": sqlite.insert(CASES).on_conflict_do_nothing(),
                "postgresql": postgresql.insert(CASES).on_conflict_do_nothing()}


class CaseNotFoundError(RetailbusError):
    """Raised when no case has the id asked for."""


class CaseRefusedError(RetailbusError):
    """Raised when a case cannot take the change asked for (resolved already, no process to retry)."""


@dataclass(frozen=True)
class Filter:
    """What `retailbus cases list` narrows by; `overdue_at`: only cases past their deadline at that moment."""

    case_type: str | None = None
    store_id: str | None = None
    states: tuple[str, ...] = UNRESOLVED
    overdue_at: datetime | None = None


def stamp(moment: datetime) -> str:
    """One text format for every time in the database (UTC, microseconds), so they compare as text."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def parse_stamp(text: str) -> datetime:
    return datetime.fromisoformat(text)


def open_engine(dsn: str) -> Engine:
    """The cases database at `dsn` (absolute); SQLite in WAL with one connection per process
    (legacy_db.engine_for), so the CLI reads while the service writes. Tables made when missing."""
    if dsn.startswith("sqlite:///"):
        Path(dsn.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = engine_for(dsn)
    create_tables(engine, metadata)
    create_indexes(engine, CASES)  # a database made before an index was added
    _upgrade_guards(engine)
    return engine


def _note(conn: Connection, case_id: str, at: datetime, actor: str, action: str, detail: str) -> None:
    conn.execute(insert(HISTORY).values(case_id=case_id, at=stamp(at), actor=actor[:200], action=action,
                                        detail=detail[:2000]))


def open_case(conn: Connection, case: CaseOpenedV1, due: datetime, source: str, correlation_id: str | None,
              now: datetime) -> bool:
    """Record `case` unless its id is known (then nothing changes); True when it is new."""
    row = dict(case_id=case.case_id, case_type=case.case_type, state="open", store_id=case.store_id,
               process=case.process, process_id=case.process_id, transaction_id=case.transaction_id,
               summary=case.summary, opened_at=stamp(case.opened_at), due_at=stamp(due), opened_by=source[:200],
               correlation_id=correlation_id, received_at=stamp(now), updated_at=stamp(now))
    if conn.execute(_INSERT_CASE[conn.dialect.name], row).rowcount != 1:
        return False
    _note(conn, case.case_id, now, source, "opened", case.summary)
    return True


def get(conn: Connection, case_id: str) -> dict | None:
    row = conn.execute(select(CASES).where(CASES.c.case_id == case_id)).mappings().first()
    return dict(row) if row is not None else None


def history(conn: Connection, case_id: str) -> list[dict]:
    h = HISTORY.c
    return [dict(r) for r in conn.execute(select(HISTORY).where(h.case_id == case_id).order_by(h.seq)).mappings()]


def _unresolved(conn: Connection, case_id: str) -> dict:
    """The case, refused when unknown or resolved already."""
    case = get(conn, case_id)
    if case is None:
        raise CaseNotFoundError(f"no case {case_id}")
    if case["state"] == "resolved":
        raise CaseRefusedError(f"case {case_id} was resolved at {case['resolved_at']}: "
                               f"{case['resolution']}")
    return case


def _change(conn: Connection, case_id: str, values: dict) -> None:
    """One conditional UPDATE: a case resolved meanwhile by someone else is refused, not overwritten."""
    c = CASES.c
    done = conn.execute(update(CASES).where(c.case_id == case_id, c.state != "resolved").values(**values))
    if done.rowcount != 1:
        _unresolved(conn, case_id)  # raises, naming who won
        raise CaseRefusedError(f"case {case_id} changed meanwhile; try again")


def assign(conn: Connection, case_id: str, owner: str, actor: str, now: datetime) -> dict:
    case = _unresolved(conn, case_id)
    _change(conn, case_id, dict(state="assigned", owner=owner, updated_at=stamp(now)))
    before = f" (was {case['owner']})" if case["owner"] and case["owner"] != owner else ""
    _note(conn, case_id, now, actor, "assigned", f"to {owner}{before}")
    return get(conn, case_id)


def resolve(conn: Connection, case_id: str, reason: str, actor: str, now: datetime) -> dict:
    _unresolved(conn, case_id)
    _change(conn, case_id, dict(state="resolved", resolved_at=stamp(now), resolution=reason, updated_at=stamp(now)))
    _note(conn, case_id, now, actor, "resolved", reason)
    return get(conn, case_id)


def retry(conn: Connection, case_id: str, actor: str, now: datetime) -> tuple[dict, int]:
    """Note a retry of the case's process step; (the case, how many retries it had before)."""
    case = _unresolved(conn, case_id)
    if not (case["process"] and case["process_id"]):
        raise CaseRefusedError(f"case {case_id} has no process instance to retry (opened by "
                               f"{case['opened_by']}): settle it where it happened, then resolve it")
    h = HISTORY.c
    before = len(conn.execute(select(h.seq).where(h.case_id == case_id, h.action == "retried")).all())
    _change(conn, case_id, dict(updated_at=stamp(now)))
    _note(conn, case_id, now, actor, "retried", f"step of {case['process']} {case['process_id']} run again")
    return case, before


def select_cases(conn: Connection, where: Filter, limit: int = 500) -> list[dict]:
    """Cases by the filter, the nearest deadline first."""
    c = CASES.c
    query = select(CASES).where(c.state.in_(where.states)).order_by(c.due_at, c.case_id).limit(limit)
    if where.case_type:
        query = query.where(c.case_type == where.case_type)
    if where.store_id:
        query = query.where(c.store_id == where.store_id)
    if where.overdue_at is not None:
        query = query.where(c.due_at < stamp(where.overdue_at))
    return [dict(r) for r in conn.execute(query).mappings()]


def unresolved(conn: Connection) -> list[tuple[str, str, str]]:
    """(case type, opened at, due at) of every case not resolved: what the gauges count."""
    c = CASES.c
    return [tuple(r) for r in conn.execute(select(c.case_type, c.opened_at, c.due_at)
                                           .where(c.state.in_(UNRESOLVED)))]


def prune(engine: Engine, older_than: datetime, limit: int) -> int:
    """Up to `limit` cases resolved before `older_than`, the oldest resolution first, and then
    their history (the database refuses it the other way round); returns how many cases. Open
    and assigned cases are never taken (nor would the database let them go)."""
    c = CASES.c
    with engine.begin() as conn:
        ids = list(conn.execute(select(c.case_id).where(c.state == "resolved", c.resolved_at < stamp(older_than))
                                .order_by(c.resolved_at).limit(limit)).scalars())
        if ids:
            conn.execute(delete(CASES).where(c.case_id.in_(ids), c.state == "resolved"))
            conn.execute(delete(HISTORY).where(HISTORY.c.case_id.in_(ids)))
    return len(ids)
