"""The `crm` service: the CRM's system API on the bus.

Posted sales and returns with a loyalty card become the customer's engagement
history (the card's member at the loyalty platform names the customer, and its
tier is kept on the profile, so the CRM's tier segments follow tier changes);
profiles follow the customer hub's golden records, and the CRM users' changes reach
it (services/crm/customers.py). Every write carries a key derived from
the business transaction, so a redelivered event adds nothing; the CRM keeps one
entry per (customer, type, reference) besides.
"""
from __future__ import annotations

from nameko.extensions import DependencyProvider

from bus.consumer import PermanentError, reliable_handler
from bus.metrics_http import MetricsHttp
from bus.settings import retailbus_settings
from contracts.envelope import CloudEvent
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1
from legacy_wrappers.json_http import JsonHttpClient, RemoteRefusedError, segment
from legacy_wrappers.legacy_http import LegacyHttpClient
from services.crm import order_commands  # the module, not its mixin: `nameko run` takes every class with entrypoints
from services.crm import customers  # the module, as order_commands
from services.loyalty.platform import LoyaltyPlatform, UnknownMemberError


class Crm(DependencyProvider):
    """A breaker-guarded JSON client of the CRM at RETAILBUS.crm.http."""

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.client = JsonHttpClient(LegacyHttpClient(f"http://{settings.crm.http}", 2.0, system="crm"))

    def get_dependency(self, worker_ctx):
        return self.client


def engagement(doc: ErpSalePostedV1 | ErpReturnPostedV1) -> dict:
    kind = "return" if isinstance(doc, ErpReturnPostedV1) else "purchase"
    return {"type": kind, "reference": f"{doc.store_id}/{doc.pos_txn_id}", "store": doc.store_id,
            "amount_minor": abs(doc.total_minor), "at": doc.posted_at.isoformat()}


class CrmService(order_commands.OrderCommands, customers.CustomerSync):
    name = "crm"

    crm = Crm()
    loyalty = LoyaltyPlatform()
    metrics = MetricsHttp()

    @reliable_handler("erp", "erp.sale_posted.v1")
    def on_sale_posted(self, doc: ErpSalePostedV1, event: CloudEvent):
        return self._engage(doc)

    @reliable_handler("erp", "erp.return_posted.v1")
    def on_return_posted(self, doc: ErpReturnPostedV1, event: CloudEvent):
        return self._engage(doc)

    def _engage(self, doc: ErpSalePostedV1 | ErpReturnPostedV1):
        if not doc.loyalty_card:
            return "no card"
        try:
            member = self.loyalty.member(doc.loyalty_card)
        except UnknownMemberError:
            return "unknown card"
        customer = segment(member["customer_id"])
        entry = engagement(doc)
        # The profile first (created if the CRM does not know the customer yet), with the tier
        # the loyalty platform has now: the CRM recomputes its segments from both.
        self.crm.call("PUT", f"/customers/{customer}", {"loyalty_tier": member["tier"]},
                      key=f"crm:tier:{entry['reference']}:{member['tier']}")
        try:
            self.crm.call("POST", f"/customers/{customer}/interactions", entry,
                          key=f"crm:{entry['type']}:{entry['reference']}")
        except RemoteRefusedError as exc:  # retrying cannot change the CRM's mind: parked, with why
            raise PermanentError(f"the CRM refused {entry['type']} {entry['reference']}: {exc}") from exc
        return entry["reference"]
