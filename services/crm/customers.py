"""The CRM's side of customer mastering, mixed into the crm service (`CrmService(CustomerSync)`).

The CRM's change feed reports every profile change with the API client that
made it: the changes its own users made become `customer.updated.v2` (origin
`crm`) for the customer hub; the changes the bus made (`X-Api-Client:
retailbus`) are its own coming back and are never reported. The hub's writes
for CRM profiles (`customer.mastered.v1`, taken in order) go to the CRM's bulk
API, a call per message, keyed by the message so a redelivery writes nothing twice.
"""
from __future__ import annotations

import logging

from prometheus_client import Counter

from bus.consumer import reliable_handler
from bus.extensions import EventPublisher
from bus.journal import JournalHops
from contracts.customer import CustomerUpdatedV2, CustomerValues
from contracts.envelope import CloudEvent
from contracts.mastering import CustomerMasteredV1, CustomerWrite
from legacy_wrappers.feed_changes import feed_changes
from legacy_wrappers.json_http import CLIENT
from services.customers.propagation import applied, binding, writes_for

log = logging.getLogger(__name__)
SYSTEM = "crm"
SOURCE = "retailbus/crm"
CONSENTS = ("marketing_email", "sms", "data_sharing")
BULK = 500  # profiles per call of the CRM's bulk API
REFUSED = Counter("retailbus_customer_feed_refused_total", "Feed changes the contract refused (logged, skipped)",
                  ["system"])


def _blank_to_none(value):
    return value if isinstance(value, str) and value.strip() else None


def statement(change: dict) -> CloudEvent:
    """A profile change as customer.updated.v2; a profile the contract refuses raises ValueError."""
    record = change["record"]
    values = CustomerValues(name=_blank_to_none(record.get("name")), email=_blank_to_none(record.get("email")),
                            phone=_blank_to_none(record.get("phone")),
                            **{f"consent_{c}": bool(record["consent"][c]) for c in CONSENTS})
    data = CustomerUpdatedV2(origin=SYSTEM, record_id=change["id"], changed_at=change["at"], values=values)
    return CloudEvent.new(CustomerUpdatedV2.TYPE, SOURCE, data, subject=change["id"],
                          idempotencykey=f"{CustomerUpdatedV2.TYPE}:crm:{change['seq']}")


def publish_statements(publisher, hops, changes: list[dict], mapper, system: str) -> int:
    """The changes not made by the bus, as statements, confirmed to the hub's queue (a change
    the hub has no queue for yet is retried: it must not be lost); returns how many went.
    Each is a `reported` hop under its key, as the hub's `mastered` hop is (`retailbus trace`)."""
    events = []
    for change in changes:
        if change["by"] == CLIENT:
            continue
        try:
            events.append(mapper(change))
        except ValueError as exc:  # legacy data the contract cannot carry: retrying cannot change it
            REFUSED.labels(system).inc()
            log.error("%s change %s refused by the contract: %s", system, change.get("seq"), exc)
    errors = [e for e in publisher.publish_many(events) if e is not None]
    if errors:
        raise errors[0]
    if events:
        hops.add("reported", items=[{"key": e.idempotencykey, "refs": [e.subject]} for e in events],
                 detail={"system": system})
    return len(events)


def applied_hop(hops, system: str, event: CloudEvent, writes: list[CustomerWrite]) -> None:
    """The writes a system API made, a `applied` hop item each: found by record and golden id."""
    hops.add("applied", items=[{"key": f"{system}:{w.record_id}", "refs": [w.record_id, w.golden_id]}
                               for w in writes], detail={"system": system}, id=event.id,
             correlationid=event.correlationid)


def profile(write: CustomerWrite) -> dict:
    """A hub write as the CRM's profile fields."""
    given = write.values.given()
    body = {"customer_id": write.record_id, **{a: given[a] for a in ("name", "email", "phone") if a in given}}
    consent = {c: given[f"consent_{c}"] for c in CONSENTS if given.get(f"consent_{c}") is not None}
    if consent:
        body["consent"] = consent
    if write.write_golden_id:
        body["golden_id"] = write.golden_id
    return body


class CustomerSync:
    customer_changes = EventPublisher()
    customer_hops = JournalHops()

    @feed_changes("crm", config_key="CRM_DB_URI")
    def on_crm_changes(self, changes: list[dict]):
        return publish_statements(self.customer_changes, self.customer_hops, changes, statement, SYSTEM)

    @reliable_handler("customers", binding(SYSTEM), ordered=True)
    def on_customer_mastered(self, mastered: CustomerMasteredV1, event: CloudEvent):
        """The hub's writes for CRM profiles, in its order, through the bulk API."""
        writes = writes_for(mastered, SYSTEM)
        for start in range(0, len(writes), BULK):
            self.crm.call("POST", "/customers/batch",
                          {"customers": [profile(w) for w in writes[start:start + BULK]]},
                          key=f"crm:mastered:{event.idempotencykey}:{start}")
        applied(SYSTEM, mastered, len(writes))
        if writes:
            applied_hop(self.customer_hops, SYSTEM, event, writes)
        return len(writes)
