"""The `crm` service: the CRM's system API on the bus.

Posted sales and, on the return process's command (services/returns), returns
with a loyalty card become the customer's engagement history (the card's member
at the loyalty platform names the customer, and its tier is kept on the profile,
so the CRM's tier segments follow tier changes);
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
from contracts.erp import ErpSalePostedV1
from contracts.returns import CrmRecordReturnV1, CrmReturnRecordedV1
from bus.process import StepRefused, command_handler
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


def engagement(doc: ErpSalePostedV1) -> dict:
    return {"type": "purchase", "reference": f"{doc.store_id}/{doc.pos_txn_id}", "store": doc.store_id,
            "amount_minor": abs(doc.total_minor), "at": doc.posted_at.isoformat()}


class CrmService(order_commands.OrderCommands, customers.CustomerSync):
    name = "crm"

    crm = Crm()
    loyalty = LoyaltyPlatform()
    metrics = MetricsHttp()

    @reliable_handler("erp", "erp.sale_posted.v1")
    def on_sale_posted(self, doc: ErpSalePostedV1, event: CloudEvent):
        return self._engage(doc)

    @command_handler(CrmRecordReturnV1.TYPE)
    def on_record_return(self, command: CrmRecordReturnV1, event: CloudEvent) -> CrmReturnRecordedV1:
        """A return in the card holder's history, on the return process's command (services/returns)."""
        member = self._member(command.loyalty_card)
        if member is not None:
            entry = {"type": "return", "reference": f"{command.store_id}/{command.pos_txn_id}",
                     "store": command.store_id, "amount_minor": command.amount_minor,
                     "at": command.posted_at.isoformat()}
            try:
                self._record(member, entry)
            except RemoteRefusedError as exc:
                raise StepRefused("crm_refused", f"the CRM refused return {entry['reference']}: {exc}") from exc
        return CrmReturnRecordedV1(store_id=command.store_id, pos_txn_id=command.pos_txn_id,
                                   customer_id=member and member["customer_id"], recorded=member is not None)

    def _engage(self, doc: ErpSalePostedV1):
        if not doc.loyalty_card:
            return "no card"
        member = self._member(doc.loyalty_card)
        if member is None:
            return "unknown card"
        entry = engagement(doc)
        try:
            self._record(member, entry)
        except RemoteRefusedError as exc:  # retrying cannot change the CRM's mind: parked, with why
            raise PermanentError(f"the CRM refused {entry['type']} {entry['reference']}: {exc}") from exc
        return entry["reference"]

    def _member(self, card: str) -> dict | None:
        """The card's member at the loyalty platform (None: no member has it)."""
        try:
            return self.loyalty.member(card)
        except UnknownMemberError:
            return None

    def _record(self, member: dict, entry: dict) -> None:
        customer = segment(member["customer_id"])
        # The profile first (created if the CRM does not know the customer yet), with the tier
        # the loyalty platform has now: the CRM recomputes its segments from both.
        self.crm.call("PUT", f"/customers/{customer}", {"loyalty_tier": member["tier"]},
                      key=f"crm:tier:{entry['reference']}:{member['tier']}")
        self.crm.call("POST", f"/customers/{customer}/interactions", entry,
                      key=f"crm:{entry['type']}:{entry['reference']}")
