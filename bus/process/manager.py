"""`ProcessManager`, the dependency that runs a process definition, and
`process_messages`, the entrypoint that feeds it the replies.

A transition runs in one database transaction: the message's idempotency key
(inbox), the instance's new state (checked against the version read), its history,
the commands and cases to send (outbox). Handlers take messages in batches
(`reliable_handler(batch=N)`): a batch is one transaction, each message in a
savepoint of its own, so one message's failure (another process changed its instance
first, a bug in a definition's function) rolls back only that message, which is
retried alone. Trace hops and metrics follow the commit; the outbox relay is woken.

A thread of the manager looks for instances whose awaited reply is late every
`RETAILBUS.processes.<name>.poll_seconds` (the timeouts are rows), samples
`retailbus_process_instances` and prunes old inbox keys, sent outbox rows and completed
instances (`prune`).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from nameko.extensions import DependencyProvider
from sqlalchemy import MetaData

from contracts.cases import ProcessStepRetryV1
from contracts.process import ProcessStepFailedV1
from bus import journal, topology
from bus.consumer import DUPLICATE, reliable_handler
from bus.process import metrics, sql, store
from bus.process.definition import ProcessDefinition
from bus.process.engine import Effects, Engine
from bus.process.outbox import ProcessDatabase
from bus.retention import before, in_batches
from bus.settings import ConfigError, ProcessSettings, RetentionSettings, retailbus_settings

log = logging.getLogger(__name__)

CASES_SERVICE = "cases"  # the business exception workbench: `cases retry` sends process.step_retry.v1
GAUGE_SECONDS = 15.0


class ProcessManager(DependencyProvider):
    """Runs `definition` with its instances in the database at config key `config_key`;
    `tables`: the process service's own tables, created beside the engine's."""

    def __init__(self, definition: ProcessDefinition, config_key: str = "PROCESS_DB_URI",
                 tables: tuple[MetaData, ...] = ()):
        self.definition, self.config_key, self.tables = definition, config_key, tables
        self.database = ProcessDatabase(config_key)
        self._halt = threading.Event()
        self._thread = None
        self._children: dict[tuple, object] = {}  # (metric, labels) -> its child: `labels()` locks and looks up each time

    def setup(self):
        d, service = self.definition, self.container.service_name
        settings = retailbus_settings(self.container.config)
        configured = settings.processes.get(d.name) or ProcessSettings()
        names = [s.name for s in d.steps]
        for step in configured.steps:
            if step not in names:
                raise ConfigError(f"RETAILBUS.processes.{d.name}.steps.{step}: {d.name} has no such step "
                                  f"(its steps: {', '.join(names)})")
        timeouts = {}
        for s in d.steps:
            override = configured.steps.get(s.name)
            timeouts[s.name] = ((override and override.timeout) or s.timeout,
                                s.resends if override is None or override.resends is None else override.resends)
        self.poll, self.retention = configured.poll_seconds, settings.retention
        self.engine = Engine(d, service, timeouts)
        self.database.tables.extend(t for t in self.tables if t not in self.database.tables)
        for target in sorted(d.targets()):
            self.database.bus.register_exchange(topology.commands_exchange(target))
        self.database.bus.register_exchange(topology.events_exchange(service))

    def start(self):
        self._halt.clear()
        self._thread = self.container.spawn_managed_thread(self._tick, identifier=f"process_{self.definition.name}")

    def stop(self):
        self._halt.set()
        if self._thread is not None:
            self._thread.wait()

    def kill(self):
        self._halt.set()
        if self._thread is not None:
            self._thread.kill()

    def get_dependency(self, worker_ctx):
        return self

    # ------------------------------------------------------------------ what services call
    def start_many(self, items: list, extras: dict | None = None) -> list:
        """(start message, event) each: a new instance's id, DUPLICATE (the key has one), or the
        error. `extras` reach the definition's `begin` as `ctx.extras` (e.g. the rules in force)."""
        return self._run(items, lambda conn, event, payload, fx: self.engine.start(conn, event, payload, fx, extras)
                         or DUPLICATE)

    def handle_many(self, items: list) -> list:
        """(reply, refusal or ops retry, event) each: what it did, DUPLICATE, or the error."""
        def one(conn, event, payload, fx):
            outcome = self.engine.handle(conn, event, payload, fx)
            return DUPLICATE if outcome == "duplicate" else outcome
        return self._run(items, one)

    def transaction(self):
        """A transaction on the process database, for the service's own reads and writes."""
        return store.transaction(self.database.ready())

    # ------------------------------------------------------------------ machinery
    def _run(self, items: list, apply: Callable) -> list:
        results: list = [None] * len(items)
        done: list[Effects] = []
        with store.transaction(self.database.ready()) as conn:
            for n, (payload, event) in enumerate(items):
                fx = Effects()
                try:
                    with sql.savepoint(conn):
                        results[n] = apply(conn, event, payload, fx)
                    done.append(fx)
                except Exception as exc:  # noqa: BLE001  (this message alone is retried)
                    log.warning("%s: %s not applied: %s", self.definition.name, event.type, exc,
                                extra={"id": event.id, "correlationid": event.correlationid})
                    results[n] = exc
            store.write(conn, [row for fx in done for row in fx.history], [row for fx in done for row in fx.outbox])
        self._after_commit(done)
        return results

    def _after_commit(self, done: list[Effects]) -> None:
        children = self._children
        for fx in done:
            for hop, outcome, fields in fx.hops:
                journal.record(hop, outcome, **fields)
            for metric, labels in fx.counts:
                child = children.get((metric, labels))
                if child is None:
                    child = children[(metric, labels)] = metrics.BY_NAME[metric].labels(*labels)
                child.inc()
            for step, seconds in fx.timings:
                child = children.get(("step_seconds", step))
                if child is None:
                    child = children[("step_seconds", step)] = metrics.STEP_SECONDS.labels(self.definition.name, step)
                child.observe(seconds)
        if any(fx.outbox for fx in done):
            self.database.wake()

    def _tick(self):
        sampled = pruned = 0.0
        while not self._halt.wait(self.poll):
            try:
                now = time.time()
                due = store.due(self.database.ready(), self.definition.name, now, 100)
                if due:
                    self._run([(pid, _Due(pid)) for pid in due],
                              lambda conn, event, pid, fx: self.engine.timeout(conn, pid, now, fx))
                if now - sampled >= GAUGE_SECONDS:
                    sampled = now
                    counts = store.counts(self.database.engine, self.definition.name)
                    for state in metrics.STATES:
                        metrics.INSTANCES.labels(self.definition.name, state).set(counts.get(state, 0))
                if now - pruned >= self.retention.interval:
                    pruned = now
                    prune(self.database.engine, self.retention)
            except Exception as exc:  # the database away: the next round tries again
                log.warning("%s: timeouts round failed: %s", self.definition.name, exc)


def prune(engine, r: RetentionSettings) -> dict[str, int]:
    """Inbox keys and sent outbox rows past `inbox_days`, completed instances (with their history)
    past `process_days`, a few batches each (bus/retention.py: counted, the rest next pass)."""
    return {
        "process_inbox_outbox": in_batches("process_inbox_outbox", lambda n: store.prune(
            engine, before(r.inbox_days), n), r.batch, r.max_batches),
        "process_instances": in_batches("process_instances", lambda n: store.prune_completed(
            engine, before(r.process_days), n), r.batch, r.max_batches),
    }


class _Due:
    """A timeout, in the shape `_run` logs a message by."""

    type = "timeout"
    correlationid = None

    def __init__(self, process_id: str):
        self.id = process_id


def process_messages(definition: ProcessDefinition, batch: int = 64):
    """The entrypoint of a process's incoming messages: every reply its steps wait for (on
    `<target>.events`), every target's refusal (`process.step_failed.v1`) and the
    workbench's `process.step_retry.v1` (on `cases.events`), each on a queue of its own
    with the reliable handler's retries and dead-letter queue. The method hands the
    batch to the manager: `return self.<manager>.handle_many(items)`."""
    bindings = definition.replies() | {(t, ProcessStepFailedV1.TYPE) for t in definition.targets()}
    bindings.add((CASES_SERVICE, ProcessStepRetryV1.TYPE))

    def decorate(fn):
        for source, message_type in sorted(bindings):
            fn = reliable_handler(source, message_type, batch=batch)(fn)
        return fn

    return decorate
