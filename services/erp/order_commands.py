"""The erp's part of click and collect: the order process's commands (bus/process).

A mixin of `ErpService`: each command is one transaction of the legacy database (the
worker's), answered once it committed. Every effect is idempotent per order
(services/erp/reservations.py, orders.py), so a command sent again, or run again after
a crash before its reply was confirmed, answers what was done the first time. A
reservation's reply (`inventory.reserved.v1`, `inventory.released.v1`) is also what the
stores' stock caches follow; a collection's stock leaves by the same event, written to
the erp's outbox with the collection.
"""
from __future__ import annotations

from datetime import datetime, timezone

from bus.process import StepRefused, command_handler
from contracts.envelope import CloudEvent
from contracts.inventory import InventoryReleasedV1, InventoryReservedV1, InventoryUnavailableV1
from contracts.order_process import (ErpCommitOrderV1, ErpFulfilOrderV1, ErpOrderCommittedV1, ErpOrderFulfilledV1,
                                     ErpOrderReversedV1, ErpReleaseStockV1, ErpReserveStockV1, ErpReverseOrderV1)
from legacy_wrappers.legacy_db import LegacyValueError
from legacy_wrappers.prepared import run_together
from services.erp import orders, reservations
from services.erp.outbox import insert as outbox_insert

SOURCE = "erp"


def _aware(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc)


class OrderCommands:
    """Command handlers of click and collect (mixed into ErpService, which has db, outbox, hops)."""

    def _order_tables(self) -> orders.OrderTables:
        return orders.OrderTables.of(self.db.tables)

    def _hop(self, hop: str, event: CloudEvent, order_id: str, outcome: str = "ok", **detail) -> None:
        self.hops.add(hop, outcome, id=event.id, correlationid=event.correlationid, subject=order_id, detail=detail)

    @command_handler(ErpReserveStockV1.TYPE)
    def on_reserve_stock(self, command: ErpReserveStockV1, event: CloudEvent):
        t, now = self._order_tables(), datetime.now(timezone.utc)
        try:
            done = reservations.reserve(self.db.conn, t.stock, t.reservations, command.order_id, command.store_id,
                                        [(line.sku, line.quantity) for line in command.lines], command.expires_at, now)
        except LegacyValueError as exc:
            raise StepRefused("unfit_for_erp", str(exc)) from None
        if done.shortages:
            self._hop("stock_unavailable", event, command.order_id, "refused", store=command.store_id)
            return InventoryUnavailableV1(order_id=command.order_id, store_id=command.store_id, at=now, shortages=[
                {"sku": sku, "wanted": wanted, "available": available} for sku, wanted, available in done.shortages])
        self._hop("stock_reserved", event, command.order_id, "duplicate" if done.duplicate else "ok",
                  store=command.store_id)
        return InventoryReservedV1(order_id=command.order_id, store_id=command.store_id, at=now,
                                   expires_at=_aware(done.expires_at), lines=[lv.as_line() for lv in done.levels])

    @command_handler(ErpReleaseStockV1.TYPE)
    def on_release_stock(self, command: ErpReleaseStockV1, event: CloudEvent):
        t, now = self._order_tables(), datetime.now(timezone.utc)
        store, levels = reservations.release(self.db.conn, t.stock, t.reservations, command.order_id, now)
        if store is None:  # released (or collected) before: the same answer
            store, levels = reservations.order_lines(self.db.conn, t.stock, t.reservations, command.order_id, now)
        if store is None:
            raise StepRefused("nothing_reserved", f"order {command.order_id} reserved no stock")
        self._hop("stock_released", event, command.order_id, store=store)
        return InventoryReleasedV1(order_id=command.order_id, store_id=store, reason="cancelled", at=now,
                                   lines=[lv.as_line() for lv in levels])

    @command_handler(ErpCommitOrderV1.TYPE)
    def on_commit_order(self, command: ErpCommitOrderV1, event: CloudEvent):
        order = command.order
        try:
            doc_no, duplicate = orders.commit(self.db.conn, self._order_tables(), order, datetime.now(timezone.utc))
        except LegacyValueError as exc:
            raise StepRefused("unfit_for_erp", str(exc)) from None
        self._hop("order_committed", event, order.order_id, "duplicate" if duplicate else "ok", doc_no=doc_no,
                  store=order.pickup_store)
        return ErpOrderCommittedV1(order_id=order.order_id, store_id=order.pickup_store, doc_no=doc_no,
                                   total_minor=order.total_minor, currency=order.currency)

    @command_handler(ErpReverseOrderV1.TYPE)
    def on_reverse_order(self, command: ErpReverseOrderV1, event: CloudEvent):
        try:
            doc_no, duplicate = orders.reverse(self.db.conn, self._order_tables(), command.order_id,
                                               command.business_day, datetime.now(timezone.utc))
        except orders.OrderClosedError as exc:
            raise StepRefused("order_collected", str(exc)) from None
        self._hop("order_reversed", event, command.order_id, "duplicate" if duplicate else "ok", doc_no=doc_no)
        return ErpOrderReversedV1(order_id=command.order_id, store_id=command.store_id, doc_no=doc_no)

    @command_handler(ErpFulfilOrderV1.TYPE)
    def on_fulfil_order(self, command: ErpFulfilOrderV1, event: CloudEvent):
        """The goods leave the shelf and the revenue is recognised, in one transaction."""
        t, now = self._order_tables(), datetime.now(timezone.utc)
        try:
            store, taken = reservations.collect(self.db.conn, t.stock, t.reservations, command.order_id, now)
            doc_no, duplicate = orders.recognise(self.db.conn, t, command.order_id, command.business_day, now)
        except (orders.OrderClosedError, reservations.ReservationReleasedError) as exc:
            raise StepRefused("order_cancelled", str(exc)) from None
        if doc_no is None:
            raise StepRefused("not_committed", f"order {command.order_id} has no commitment in the ERP")
        if taken:  # the stores' stock caches: the reservation ended with the goods
            released = CloudEvent.new(InventoryReleasedV1.TYPE, SOURCE, InventoryReleasedV1(
                order_id=command.order_id, store_id=store, reason="collected", at=now,
                lines=[lv.as_line() for lv in taken]), subject=command.order_id, correlationid=event.correlationid,
                idempotencykey=f"{InventoryReleasedV1.TYPE}:collected:{command.order_id}")
            run_together(self.db.conn, [outbox_insert([released])])
            self.outbox.added()
        head = orders.header(self.db.conn, t, command.order_id)
        self._hop("revenue_recognised", event, command.order_id, "duplicate" if duplicate else "ok", doc_no=doc_no,
                  store=head.STORE_NO)
        return ErpOrderFulfilledV1(order_id=command.order_id, store_id=head.STORE_NO, revenue_doc_no=doc_no,
                                   total_minor=head.TOTAL_CENTS, currency=head.CURRENCY)
