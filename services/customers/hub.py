"""One unit of the hub's work, in the worker's transaction: claim, master, save, queue the events.

Inputs become `Statement`s (a row of the CRM's nightly file, a
`customer.updated.v2` from a system API); each is claimed in the inbox by its
idempotency key, so a redelivered chunk or event changes nothing; the batch
is mastered (mastering.py) over a workspace (store.py); what it decided is
saved and its events are queued in the transactional outbox, all in one
transaction: a crash (a SIGKILL) loses or doubles nothing, and the relay
publishes the events once the transaction is committed.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy.engine import Connection
from ulid import ULID

from contracts.cases import CaseOpenedV1
from contracts.customer import CrmCustomerExportedV1, CustomerUpdatedV2
from contracts.envelope import AssembledEvent, CloudEvent
from contracts.mastering import ConsentChangedV1, CustomerMasteredV1, CustomerMergedV1
from contracts.errors import RetailbusError
from legacy_wrappers import inbox
from services.customers import matching
from services.customers.config import CustomersConfig
from services.customers.mastering import Master, Outcome, Statement
from services.customers.model import stamp
from services.customers.propagation import binding
from services.customers.store import Workspace
from services.erp import outbox

CONSUMER = "customers"  # one inbox for every path: the ERP's capture-before-overwrite repeats capture's keys
SOURCE = "retailbus/customers"
FILE_ORIGIN = "crm_file"
WRITES_PER_EVENT = 5000


class UnknownOriginError(RetailbusError):
    """A change from an origin config/customers.yaml does not know: which system it speaks for is unknown."""


def file_statement(config: CustomersConfig, row: CrmCustomerExportedV1, key: str) -> Statement:
    return Statement(_system(config, FILE_ORIGIN), FILE_ORIGIN, row.customer_id, stamp(row.updated_at),
                     row.given(), key)


def event_statement(config: CustomersConfig, change: CustomerUpdatedV2, key: str) -> Statement:
    return Statement(_system(config, change.origin), change.origin, change.record_id, stamp(change.changed_at),
                     change.values.given(), key)


def _system(config: CustomersConfig, origin: str) -> str:
    try:
        return config.origins[origin]
    except KeyError:
        raise UnknownOriginError(f"origin: {origin!r} is not in config/customers.yaml origins "
                                 f"({', '.join(sorted(config.origins))})") from None


def master(conn: Connection, config: CustomersConfig, items: list[tuple[Statement, str]]) -> tuple[Outcome, list[bool]]:
    """Master the (statement, message id) items not seen before; which ones were new."""
    now = datetime.now(timezone.utc)
    workspace = Workspace(conn, config)  # first: takes the mastering lock
    fresh = inbox.claim_many(conn, [(CONSUMER, s.key, message_id) for s, message_id in items])
    statements = [s for (s, _), new in zip(items, fresh) if new]
    if not statements:
        return Outcome(), fresh
    numbers = [(system, s.record_id) for s in statements if s.system in config.matching.customer_number
               for system in config.matching.customer_number]  # the records a `create` may key by the number
    keys = [matching.value_keys(config, s.system, s.record_id, s.values) for s in statements]
    workspace.preload([(s.system, s.record_id) for s in statements] + numbers,
                      [(name, value) for k in keys for name, values in k.items() for value in values])
    hub = Master(config, workspace, stamp(now))
    for statement, statement_keys in zip(statements, keys):
        hub.take(statement, statement_keys)
    outcome = hub.finish()
    workspace.save(stamp(now))
    events = events_of(outcome, now)
    if events:
        statement, rows = outbox.insert(*zip(*events))
        statement(conn, rows)
    return outcome, fresh


def events_of(outcome: Outcome, now: datetime) -> list[tuple[CloudEvent, str]]:
    """(event, routing key): the writes as one `customer.mastered.v1` per system (its own
    routing key), then the merges, consents and cases."""
    events = []
    by_system: dict[str, list] = {}
    for write in outcome.writes:
        by_system.setdefault(write.system, []).append(write)
    for system, writes in by_system.items():
        for start in range(0, len(writes), WRITES_PER_EVENT):
            events.append((mastered(writes[start:start + WRITES_PER_EVENT], now), binding(system)))
    for merge in outcome.merges:
        events.append(_event(CustomerMergedV1(merged_at=now, **merge), f"merged:{merge['retired']}",
                             merge["survivor"]))
    for consent in outcome.consents:
        at = datetime.fromisoformat(consent.pop("at").replace("Z", "+00:00"))
        events.append(_event(ConsentChangedV1(changed_at=at, **consent),
                             f"consent:{consent['golden_id']}:{consent['consent']}:{ULID()}", consent["golden_id"]))
    for case in outcome.cases:
        events.append(_event(CaseOpenedV1(case_id=case["case_id"], case_type="customer_match",
                                          summary=case["summary"], opened_at=now),
                             case["case_id"], case["golden_a"]))
    return events


def mastered(writes: list, now: datetime) -> CloudEvent:
    """`customer.mastered.v1`, assembled, not validated: every value is the hub's own, each
    attribute's as the contract's type (a unit test holds this to the contract); validating
    a thousand writes again cost more than mastering their rows."""
    event_id = str(ULID())
    data = {"mastered_at": now.isoformat(), "writes": [
        {"system": w.system, "record_id": w.record_id, "golden_id": w.golden_id, "origin": w.origin,
         "create": w.create, "write_golden_id": w.write_golden_id, "values": w.values} for w in writes]}
    return AssembledEvent.model_construct(
        id=event_id, source=SOURCE, type=CustomerMasteredV1.TYPE, time=now, subject=None, data=data,
        correlationid=event_id, idempotencykey=f"{CustomerMasteredV1.TYPE}:{event_id}")


def _event(payload, key: str, subject: str | None) -> tuple[CloudEvent, str]:
    return (CloudEvent.new(payload.TYPE, SOURCE, payload, subject=subject, idempotencykey=f"{payload.TYPE}:{key}"),
            payload.TYPE)
