"""The `erp` service: the ERP system API over the legacy ERP database.

Thin on purpose: each entrypoint maps a message to its contract and hands it
to the ledger inside the idempotent inbox, so a redelivered sale posts once.
"""
from __future__ import annotations

from datetime import datetime, timezone

from nameko.rpc import rpc
from pydantic import ValidationError
from ulid import ULID

from contracts.envelope import CloudEvent
from contracts.loyalty import LoyaltySettlementV1
from contracts.errors import ContractError
from contracts.pos import PosReturnV1, PosSaleV1, idempotency_key
from contracts.returns import ErpPostReturnV1
from legacy_wrappers.batched_writes import BatchedWrites
from legacy_wrappers.legacy_db import LegacyDatabase, LegacyValueError
from legacy_wrappers.table_changes import table_changes
from legacy_wrappers import inbox
from legacy_wrappers.prepared import run_together
from bus import topology
from bus.consumer import DUPLICATE, PermanentError, reliable_handler
from bus.extensions import EventPublisher
from bus.journal import JournalHops
from bus.metrics_http import MetricsHttp
from bus.retention import retention_timer
from services.erp import (customer_master, events, ledger, loyalty_gl, orders, posting, reservations, return_links,
                          stock, unknown_sku)
from services.erp import order_commands  # the module, not its mixin: `nameko run` takes every class with entrypoints
from services.erp import customer_sync  # the module, as order_commands
from services.erp import return_facts
from services.erp.outbox import Outbox
from services.erp.outbox import insert as outbox_insert
from services.erp.retention import LegacyRetention
from services.erp.outbox import metadata as outbox_tables


# POS messages per worker (bus/consumer.py, `batch`); the writer commits them
# with other workers' in batches of up to 64 anyway.
BATCH = 64


class ErpService(order_commands.OrderCommands, customer_sync.CustomerSync):
    name = "erp"

    db = LegacyDatabase(reflect=(*ledger.LEGACY_TABLES, customer_master.TABLE, *orders.TABLES),
                        create=(inbox.metadata, outbox_tables, return_links.metadata, unknown_sku.metadata,
                                loyalty_gl.metadata, customer_master.metadata))
    postings = BatchedWrites(posting.post_many)
    outbox = Outbox()
    events = EventPublisher()
    metrics = MetricsHttp()
    hops = JournalHops()
    retention = LegacyRetention()

    @reliable_handler("store_agent", "pos.sale.v1", ordered=True, batch=BATCH)
    def on_pos_sale(self, sales: list[tuple[PosSaleV1, CloudEvent]]):
        return self._post_events(sales)

    @reliable_handler("erp", ErpPostReturnV1.TYPE, exchange=topology.commands_exchange("erp"), batch=BATCH)
    def on_post_return(self, commands: list[tuple[ErpPostReturnV1, CloudEvent]]):
        """A bus-routed return, posted on the return process's command (services/returns): the one
        way a bus-routed return reaches the ERP, keyed as the till's return. The reply is the
        erp.return_posted.v1 the posting announces (correlated to the process); a return
        posted before (the legacy API booked it, or the process asked again) is announced
        again, so the process always has its answer."""
        items = [(command.pos_return, event) for command, event in commands]
        results = self._post_events(items, keyed=True)
        again = [return_facts.announced_again(self.db.conn, ledger.LegacyTables.of(self.db.tables), txn,
                                              event.correlationid)
                 for (txn, event), result in zip(items, results) if result is DUPLICATE]
        if again:
            run_together(self.db.conn, [outbox_insert(again)])
            self.outbox.added()
        return results

    def _post_events(self, items: list, keyed: bool = False) -> list:
        """One result per (txn, event), committed with the postings of other workers when
        `postings` returns: the document number, DUPLICATE, or the item's error; a value
        the legacy columns cannot hold is parked at once (retrying cannot fix it). `keyed`:
        the inbox key is the transaction's own (`idempotency_key`), not the message's."""
        tables = ledger.LegacyTables.of(self.db.tables)
        written = self.postings([posting.Posting(tables, txn, idempotency_key(txn) if keyed else event.idempotencykey,
                                                 event.id, event.correlationid) for txn, event in items])
        results = []
        for (txn, event), outcome in zip(items, written):
            if isinstance(outcome, BaseException):
                results.append(PermanentError(str(outcome)) if isinstance(outcome, LegacyValueError) else outcome)
                continue
            doc_no, duplicate, unknown = outcome
            unknown_sku.committed(unknown)
            if not duplicate:
                self.outbox.added()
            self.hops.add("posted", "duplicate" if duplicate else "ok", id=event.id,
                          correlationid=event.correlationid, subject=txn.pos_txn_id,
                          detail={"doc_no": doc_no, "store": txn.store_id})
            results.append(DUPLICATE if duplicate else doc_no)
        return results

    @reliable_handler("loyalty", LoyaltySettlementV1.TYPE)
    def on_loyalty_settlement(self, settlement: LoyaltySettlementV1, event: CloudEvent):
        """A store's daily loyalty figures -> a GL document on the liability account, once."""
        if not inbox.claim(self.db.conn, "erp.on_loyalty_settlement", event.idempotencykey, event.id):
            return DUPLICATE
        return loyalty_gl.post(self.db.conn, ledger.LegacyTables.of(self.db.tables), settlement)

    @rpc
    def post_sale(self, sale: dict) -> dict:
        return self._post_rpc(PosSaleV1, sale)

    @rpc
    def post_return(self, ret: dict) -> dict:
        return self._post_rpc(PosReturnV1, ret)

    def _post_rpc(self, model, data: dict) -> dict:
        """Committed before the answer: the caller is told only what is durable."""
        try:
            txn = model.model_validate(data)
        except ValidationError as exc:
            raise ContractError.from_validation(exc, model.TYPE) from None
        [(doc_no, duplicate, unknown)] = posting.post_many(self.db.conn, [posting.Posting(
            ledger.LegacyTables.of(self.db.tables), txn, idempotency_key(txn), str(ULID()), None)])
        self.db.end(success=True)
        unknown_sku.committed(unknown)
        if not duplicate:
            self.outbox.added()
        return {"doc_no": doc_no, "duplicate": duplicate}

    @rpc
    def stock_level(self, store_id: str, sku: str) -> dict | None:
        """On hand, reserved for click-and-collect orders, and available to sell."""
        level = stock.stock_level(self.db.conn, self.db.tables[stock.TABLE], store_id, sku)
        if level is not None:
            reserved = reservations.levels(self.db.conn, self.db.tables[stock.TABLE], self.db.tables[reservations.TABLE],
                                           store_id, [sku], datetime.now(timezone.utc))[sku][1]
            level.update(reserved=reserved, available=level["on_hand"] - reserved)
        return level

    @rpc
    def customer_account(self, customer_id: str) -> dict | None:
        return customer_master.customer_account(
            self.db.conn, self.db.tables[customer_master.TABLE], customer_id)

    @rpc
    def sale_status(self, store_id: str, pos_txn_id: str) -> dict | None:
        return ledger.sale_status(self.db.conn, ledger.LegacyTables.of(self.db.tables), store_id, pos_txn_id)

    @rpc
    def shadow_compare(self, message_type: str, data: dict, legacy_doc_no: str) -> list[dict]:
        """Shadow mode: the fields where the posting we WOULD write differs from
        the legacy call's posting `legacy_doc_no` (dry run: nothing is written)."""
        from services.erp import shadow
        model = {PosSaleV1.TYPE: PosSaleV1, PosReturnV1.TYPE: PosReturnV1}.get(message_type)
        if model is None:
            raise ContractError(f"message_type: {message_type!r} has no posting to compare")
        try:
            txn = model.model_validate(data)
        except ValidationError as exc:
            raise ContractError.from_validation(exc, model.TYPE) from None
        try:
            return shadow.compare(self.db.conn, ledger.LegacyTables.of(self.db.tables), txn, legacy_doc_no)
        finally:
            self.db.end(success=False)  # a dry run: nothing to make durable, no commit to wait for

    @retention_timer()
    def prune(self) -> dict[str, int]:
        """Inbox keys past the redelivery horizon and relay rows long sent (RETAILBUS.retention)."""
        return self.retention.prune()

    @table_changes(stock.TABLE, key=stock.KEY)
    def on_stock_changes(self, changes):
        """STK_LVL rows changed by anyone (us or legacy programs) -> erp.stock_changes.v1,
        each item an erp.stock_changed.v1."""
        events.publish_changes(self.events, changes, stock.stock_change, stock.TABLE, stock.stock_changes)

    @reliable_handler("files", "event.batch.v1")
    def on_file_rows(self, batch, event: CloudEvent):
        """Rows of legacy batch files (services/files), applied by row type: the stock snapshot
        to STK_LVL; the customer export is the customer hub's (it reaches CUST_MST mastered);
        a row type nobody applies is parked."""
        from services.erp import file_rows
        if batch.item_type in file_rows.ELSEWHERE:
            return f"applied by {file_rows.ELSEWHERE[batch.item_type]}"
        try:
            table = file_rows.table_of(batch)
        except file_rows.UnappliedRowsError as exc:
            raise PermanentError(str(exc)) from None
        result = file_rows.apply(self.db.conn, self.db.tables, batch, event) or DUPLICATE
        self.hops.add("applied", "duplicate" if result is DUPLICATE else "ok", items=file_rows.trace_items(batch),
                      detail={"table": table, "file": batch.file})
        return result
