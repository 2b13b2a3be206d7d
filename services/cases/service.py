"""The `cases` service: the business exception workbench's owner.

Any service opens a case by publishing `case.opened.v1` on its own events
exchange; this service keeps one queue per sender (one handler each below: a
new sender is one more line) and records the case once, however often the
opening arrives (the inbox claims the message's key, the case id is the
table's key). It is the only writer of its database: `retailbus cases assign|
resolve|retry` call it over RPC, each change committed with its history row
before the answer goes back. `retry` publishes `process.step_retry.v1` on
`cases.events` for the process engine; no queue bound means nothing retried,
and the CLI says so. The gauges of open cases by type and age, and of cases
past their SLA, are sampled from the database every RETAILBUS.cases.interval.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from nameko.extensions import DependencyProvider
from nameko.rpc import rpc
from nameko.timer import Timer
from prometheus_client import Counter, Gauge

from bus import journal
from bus.consumer import DUPLICATE, reliable_handler
from bus.extensions import EventPublisher, container_settings
from bus.metrics_http import MetricsHttp
from bus.publisher import UnroutableError
from bus.retention import before, in_batches, retention_timer
from contracts.cases import CaseOpenedV1, ProcessStepRetryV1
from contracts.envelope import CloudEvent
from legacy_wrappers import inbox
from services.cases import rules, store
from services.cases.store import CaseRefusedError

log = logging.getLogger(__name__)
SOURCE = "retailbus/cases"
CONSUMER = "cases.open"

OPEN = Gauge("retailbus_cases_open", "Cases not resolved, by type and age since they were opened", ["type", "age"])
OVERDUE = Gauge("retailbus_cases_overdue", "Cases not resolved past their SLA deadline, by type", ["type"])
ACTIONS = Counter("retailbus_cases_actions_total", "Cases opened, assigned, retried and resolved, by type",
                  ["type", "action"])
ACTION_NAMES = ("opened", "assigned", "retried", "resolved")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def text(field: str, value, limit: int) -> str:
    """A CLI-given value, refused when empty or too long (the columns hold `limit`)."""
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise CaseRefusedError(f"{field}: expected 1 to {limit} characters")
    return value.strip()


class CaseBook(DependencyProvider):
    """The cases database (RETAILBUS.cases.dsn) and the case types' rules (RETAILBUS.cases.rules,
    read at start: an invalid file stops the service with its line and field)."""

    def setup(self):
        settings = container_settings(self.container.config)[1]
        self.rules_path = settings.path(settings.cases.rules)
        self.rules = rules.load(self.rules_path)
        self.engine = store.open_engine(settings.absolute_dsn(settings.cases.dsn))
        self.retention = settings.retention
        self.sampled: set[str] = set()  # case types with gauge series, so a type's last case drops it to 0
        self.late: dict[str, int] = {}  # cases past their SLA by type, as last logged
        for case_type in self.rules.types:
            for action in ACTION_NAMES:
                ACTIONS.labels(case_type, action)  # exported at 0 from the start

    def stop(self):
        self.engine.dispose()

    kill = stop

    def get_dependency(self, worker_ctx):
        return self

    def sample(self, now: datetime) -> dict[str, int]:
        """Set the gauges from the database; returns the overdue count per type."""
        with self.engine.connect() as conn:
            rows = store.unresolved(conn)
        opened, overdue = rules.tally(rows, now, set(self.rules.types) | self.sampled)
        self.sampled |= set(overdue)
        for (case_type, age), n in opened.items():
            OPEN.labels(case_type, age).set(n)
        for case_type, n in overdue.items():
            OVERDUE.labels(case_type).set(n)
        return overdue


class SampleTimer(Timer):
    """nameko's timer, every RETAILBUS.cases.interval seconds."""

    def setup(self):
        self.interval = container_settings(self.container.config)[1].cases.interval


class CasesService:
    name = "cases"

    book = CaseBook()
    events = EventPublisher()  # cases.events: process.step_retry.v1
    metrics = MetricsHttp()

    # ---------------------------------------------------------------- openings, one queue per sender
    @reliable_handler("loyalty", CaseOpenedV1.TYPE)
    def on_loyalty_case(self, case: CaseOpenedV1, event: CloudEvent):
        return self._open(case, event)

    @reliable_handler("returns", CaseOpenedV1.TYPE)
    def on_returns_case(self, case: CaseOpenedV1, event: CloudEvent):
        return self._open(case, event)

    @reliable_handler("orders", CaseOpenedV1.TYPE)
    def on_orders_case(self, case: CaseOpenedV1, event: CloudEvent):
        return self._open(case, event)

    @reliable_handler("customers", CaseOpenedV1.TYPE)
    def on_customers_case(self, case: CaseOpenedV1, event: CloudEvent):
        return self._open(case, event)

    def _open(self, case: CaseOpenedV1, event: CloudEvent):
        now = utcnow()
        due = rules.due_at(self.book.rules, case.case_type, case.opened_at)
        opened = inbox.apply_once(self.book.engine, CONSUMER, event, lambda conn: store.open_case(
            conn, case, due, event.source, event.correlationid, now))
        if opened is DUPLICATE or not opened:
            return DUPLICATE
        ACTIONS.labels(case.case_type, "opened").inc()
        if not self.book.rules.known(case.case_type):
            log.warning("case type %s is not in %s: its SLA is default_sla (%s); add the type",
                        case.case_type, self.book.rules_path, self.book.rules.default_sla)
        log.info("case %s opened (%s, due %s)", case.case_id, case.case_type, store.stamp(due),
                 extra={"id": event.id, "correlationid": event.correlationid, "outcome": "opened"})
        journal.record("case_opened", id=event.id, correlationid=event.correlationid,
                       subject=case.transaction_id or case.case_id,
                       detail={"case": case.case_id, "type": case.case_type, "due": store.stamp(due)})
        return case.case_id

    # ---------------------------------------------------------------- the CLI's changes
    @rpc
    def assign(self, case_id: str, owner: str, actor: str) -> dict:
        owner, actor = text("owner", owner, 64), text("actor", actor, 64)
        with self.book.engine.begin() as conn:
            case = store.assign(conn, case_id, owner, actor, utcnow())
        return self._done(case, "assigned", actor, owner=owner)

    @rpc
    def resolve(self, case_id: str, reason: str, actor: str) -> dict:
        reason, actor = text("reason", reason, 2000), text("actor", actor, 64)
        with self.book.engine.begin() as conn:
            case = store.resolve(conn, case_id, reason, actor, utcnow())
        return self._done(case, "resolved", actor, reason=reason)

    @rpc
    def retry(self, case_id: str, actor: str) -> dict:
        """Publish process.step_retry.v1 for the case's process instance, with the history row
        in the same transaction: committed only once the broker confirmed the command to a queue."""
        actor = text("actor", actor, 64)
        with self.book.engine.begin() as conn:
            case, earlier = store.retry(conn, case_id, actor, utcnow())
            command = ProcessStepRetryV1(process=case["process"], process_id=case["process_id"], case_id=case_id,
                                         requested_by=actor)
            event = CloudEvent.new(ProcessStepRetryV1.TYPE, SOURCE, command, subject=case["process_id"],
                                   correlationid=case["correlation_id"],
                                   idempotencykey=f"step_retry:{case_id}:{earlier + 1}")
            try:
                self.events.publish(event)
            except UnroutableError:
                raise CaseRefusedError(f"no queue takes {ProcessStepRetryV1.TYPE} (is the {case['process']} "
                                       "process service running?); nothing was retried") from None
            case = store.get(conn, case_id)
        return self._done(case, "retried", actor, event=event.id)

    def _done(self, case: dict, action: str, actor: str, **detail) -> dict:
        ACTIONS.labels(case["case_type"], action).inc()
        log.info("case %s %s by %s", case["case_id"], action, actor,
                 extra={"id": case["case_id"], "correlationid": case["correlation_id"], "outcome": action})
        journal.record(f"case_{action}", correlationid=case["correlation_id"],
                       subject=case["transaction_id"] or case["case_id"],
                       detail={"case": case["case_id"], "by": actor, **detail})
        return case

    # ---------------------------------------------------------------- housekeeping
    @SampleTimer.decorator(interval=15, eager=True)
    def sample(self) -> dict[str, int]:
        """The gauges; a log line when the cases past their SLA change (not every sample)."""
        overdue = self.book.sample(utcnow())
        late = {t: n for t, n in overdue.items() if n}
        if late != self.book.late:
            self.book.late = late
            log.warning("cases past their SLA: %s (retailbus cases list --overdue)",
                        ", ".join(f"{t}={n}" for t, n in sorted(late.items())) or "none now")
        return overdue

    @retention_timer()
    def prune(self) -> dict[str, int]:
        """The inbox's keys past RETAILBUS.retention.inbox_days; resolved cases (with their history)
        past cases_days. Open and assigned cases stay whatever their age."""
        r = self.book.retention
        return {
            "cases_inbox": in_batches("cases_inbox", lambda n: inbox.prune(self.book.engine, before(r.inbox_days), n),
                                      r.batch, r.max_batches),
            "cases": in_batches("cases", lambda n: store.prune(self.book.engine, before(r.cases_days), n),
                                r.batch, r.max_batches),
        }
