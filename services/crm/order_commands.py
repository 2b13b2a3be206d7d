"""The crm service's part of click and collect: the closed order in the engagement history.

A mixin of `CrmService`. The order process asks last, once the order is closed, so a
CRM that is down never holds an order up: a collected order is the customer's purchase
(it counts in the CRM's segments like a till sale), a cancelled one a service
interaction. The profile is created when the CRM does not know the customer yet; both
writes are keyed by the order, so a command sent again adds nothing.
"""
from __future__ import annotations

from bus.process import StepRefused, command_handler
from contracts.envelope import CloudEvent
from contracts.order_process import CrmOrderRecordedV1, CrmRecordOrderV1
from legacy_wrappers.json_http import RemoteRefusedError, segment

KINDS = {"collected": "purchase", "cancelled": "service"}


class OrderCommands:
    """Command handlers of click and collect (mixed into CrmService, which has `crm`)."""

    @command_handler(CrmRecordOrderV1.TYPE)
    def on_record_order(self, command: CrmRecordOrderV1, event: CloudEvent):
        customer = segment(command.customer_id)
        reference = f"{command.store_id}/{command.order_id}"
        entry = {"type": KINDS[command.outcome], "reference": reference, "store": command.store_id,
                 "amount_minor": command.amount_minor if command.outcome == "collected" else 0,
                 "at": command.at.isoformat()}
        try:
            self.crm.call("PUT", f"/customers/{customer}", {}, key=f"crm:order-profile:{reference}")
            self.crm.call("POST", f"/customers/{customer}/interactions", entry, key=f"crm:order:{reference}")
        except RemoteRefusedError as exc:  # retrying cannot change the CRM's mind
            raise StepRefused("crm_refused", f"the CRM refused order {reference}: {exc}") from None
        return CrmOrderRecordedV1(order_id=command.order_id, store_id=command.store_id,
                                  customer_id=command.customer_id)
