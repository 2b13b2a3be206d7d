"""The loyalty platform's side of customer mastering, mixed into the loyalty service
(`LoyaltyService(MemberSync)`).

The platform's change feed reports every member change with the API client
that made it: enrolments at the till and the programme's own changes
(household, reward preference) become `customer.updated.v2` (origin `loyalty`)
for the customer hub; the changes the bus made are its own coming back and are
never reported. The hub's writes for members (`customer.mastered.v1`, in order)
go to the platform's bulk API; a member the platform no longer knows is logged.
"""
from __future__ import annotations

import logging

from bus.consumer import reliable_handler
from bus.extensions import EventPublisher
from bus.journal import JournalHops
from contracts.customer import CustomerUpdatedV2, CustomerValues
from contracts.envelope import CloudEvent
from contracts.mastering import CustomerMasteredV1, CustomerWrite
from legacy_wrappers.feed_changes import feed_changes
from services.crm.customers import applied_hop, publish_statements
from services.customers.propagation import applied, binding, writes_for

log = logging.getLogger(__name__)
SYSTEM = "loyalty"
SOURCE = "retailbus/loyalty"
HELD = ("name", "email", "phone", "household_id", "reward_preference", "consent_marketing_email", "consent_sms",
        "consent_data_sharing")
BULK = 500  # members per call of the platform's bulk API


def statement(change: dict) -> CloudEvent:
    """A member change as customer.updated.v2; a member the contract refuses raises ValueError."""
    member = change["record"]
    values = CustomerValues(loyalty_card=member["card"], **{a: _blank_to_none(member.get(a)) for a in HELD})
    data = CustomerUpdatedV2(origin=SYSTEM, record_id=member["card"], changed_at=change["at"], values=values)
    return CloudEvent.new(CustomerUpdatedV2.TYPE, SOURCE, data, subject=member["card"],
                          idempotencykey=f"{CustomerUpdatedV2.TYPE}:loyalty:{change['seq']}")


def _blank_to_none(value):
    return None if isinstance(value, str) and not value.strip() else value


def member(write: CustomerWrite) -> dict:
    """A hub write as the platform's member fields."""
    given = write.values.given()
    body = {"card": write.record_id, **{a: given[a] for a in HELD if a in given}}
    if write.write_golden_id:
        body["golden_id"] = write.golden_id
    return body


class MemberSync:
    customer_changes = EventPublisher()
    customer_hops = JournalHops()

    @feed_changes("loyalty_platform", config_key="LOYALTY_DB_URI")
    def on_member_changes(self, changes: list[dict]):
        return publish_statements(self.customer_changes, self.customer_hops, changes, statement, SYSTEM)

    @reliable_handler("customers", binding(SYSTEM), ordered=True)
    def on_customer_mastered(self, mastered: CustomerMasteredV1, event: CloudEvent):
        """The hub's writes for members, in its order, through the bulk API."""
        writes = writes_for(mastered, SYSTEM)
        for start in range(0, len(writes), BULK):
            answer = self.platform.call("POST", "/members/batch",
                                        {"members": [member(w) for w in writes[start:start + BULK]]},
                                        key=f"loyalty:mastered:{event.idempotencykey}:{start}")
            for result in answer["members"]:
                if "error" in result:
                    log.warning("member %s not written: %s (no such member at the platform)", result["card"],
                                result["error"])
        applied(SYSTEM, mastered, len(writes))
        if writes:
            applied_hop(self.customer_hops, SYSTEM, event, writes)
        return len(writes)
