"""The `customers` service: the customer hub, holding one golden record per customer.

Thin on purpose: each entrypoint maps its messages to statements and hands them
to the hub (hub.py) in the worker's transaction; the rules are plain Python
(mastering.py, survivorship.py, matching.py). What it takes in: the rows of the
CRM's nightly export (`event.batch.v1` of `crm.customer_exported.v1`) and
`customer.updated.v2` from the CRM's, the ERP's and the loyalty platform's system
APIs. What it sends, through its outbox: `customer.mastered.v1` (what each
system must write), `customer.merged.v1`, `consent.changed.v1`, `case.opened.v1`.
"""
from __future__ import annotations

from bus.consumer import DUPLICATE, PermanentError, reliable_handler
from bus.journal import JournalHops
from bus.metrics_http import MetricsHttp
from bus.retention import retention_timer
from contracts.batch import EventBatchV1
from contracts.customer import CrmCustomerExportedV1, CustomerUpdatedV2
from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from contracts.mastering import ConsentChangedV1, CustomerMergedV1
from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import LegacyDatabase
from services.customers import hub, tables
from services.customers.config import CustomerRules
from services.erp.outbox import Outbox
from services.erp.outbox import metadata as outbox_tables
from services.erp.retention import LegacyRetention

BATCH = 64  # customer.updated.v2 per worker: one transaction, one workspace


class CustomersService:
    name = "customers"

    db = LegacyDatabase(config_key="CUSTOMERS_DB_URI", create=(tables.metadata, inbox.metadata, outbox_tables))
    outbox = Outbox(config_key="CUSTOMERS_DB_URI", notices=(CustomerMergedV1.TYPE, ConsentChangedV1.TYPE))
    rules = CustomerRules()
    hops = JournalHops()
    metrics = MetricsHttp()
    retention = LegacyRetention(config_key="CUSTOMERS_DB_URI")

    @retention_timer()
    def prune(self) -> dict[str, int]:
        """Inbox keys past the redelivery horizon and outbox rows long sent (RETAILBUS.retention);
        golden records, their links and history are the hub's record and stay."""
        return self.retention.prune()

    @reliable_handler("files", EventBatchV1.TYPE)
    def on_file_rows(self, batch: EventBatchV1, event: CloudEvent):
        """The CRM's nightly export, a chunk at a time; other files' rows are other services' business."""
        if batch.item_type != CrmCustomerExportedV1.TYPE:
            return "not a customer file"
        try:
            rows = batch.typed_items()
        except ContractError as exc:
            raise PermanentError(str(exc)) from None
        items = [(hub.file_statement(self.rules, row, item.idempotencykey), event.id)
                 for item, row in zip(batch.items, rows)]
        fresh = self._master(items, event, {"file": batch.file}, {item.idempotencykey: item.row for item in batch.items})
        return "mastered" if any(fresh) else DUPLICATE

    @reliable_handler("crm", CustomerUpdatedV2.TYPE, batch=BATCH)
    def on_crm_change(self, changes: list[tuple[CustomerUpdatedV2, CloudEvent]]):
        return self._changes(changes)

    @reliable_handler("erp", CustomerUpdatedV2.TYPE, batch=BATCH)
    def on_erp_change(self, changes: list[tuple[CustomerUpdatedV2, CloudEvent]]):
        return self._changes(changes)

    @reliable_handler("loyalty", CustomerUpdatedV2.TYPE, batch=BATCH)
    def on_loyalty_change(self, changes: list[tuple[CustomerUpdatedV2, CloudEvent]]):
        return self._changes(changes)

    def _changes(self, changes: list[tuple[CustomerUpdatedV2, CloudEvent]]) -> list:
        """One result per change; a change from an origin the config does not know is parked alone."""
        items, results = [], []
        for change, event in changes:
            try:
                items.append((hub.event_statement(self.rules, change, event.idempotencykey), event.id))
                results.append(None)
            except hub.UnknownOriginError as exc:
                results.append(PermanentError(str(exc)))
        if items:
            fresh = iter(self._master(items, None, {}))
        return [r if r is not None else ("mastered" if next(fresh) else DUPLICATE) for r in results]

    def _master(self, items, event: CloudEvent | None, detail: dict, rows: dict | None = None) -> list[bool]:
        """Master the items in the worker's transaction; which of them were new. `rows`: a file
        row's number by its key, for the journal."""
        outcome, fresh = hub.master(self.db.conn, self.rules, items)
        if outcome.writes or outcome.merges or outcome.consents or outcome.cases:
            self.outbox.added()
        if outcome.traced:
            ids = {} if event is None else {"id": event.id, "correlationid": event.correlationid}
            traced = [{**item, "row": rows[item["key"]]} for item in outcome.traced] if rows else outcome.traced
            self.hops.add("mastered", items=traced, detail={
                **detail, "writes": len(outcome.writes), "merges": len(outcome.merges),
                "cases": len(outcome.cases)}, **ids)
        return fresh
