"""The `erp` service: the ERP system API over the legacy ERP database.

Thin on purpose: each entrypoint maps a message to its contract and hands it
to the ledger inside the idempotent inbox, so a redelivered sale posts once.
"""
from __future__ import annotations

from contracts.envelope import CloudEvent
from contracts.pos import PosReturnV1, PosSaleV1
from legacy_wrappers.legacy_db import LegacyDatabase
from services.bus.consumer import reliable_handler
from services.bus.inbox import apply_once
from services.erp import ledger


class ErpService:
    name = "erp"

    db = LegacyDatabase(reflect=ledger.LEGACY_TABLES)

    @reliable_handler("store_agent", "pos.sale.v1")
    def on_pos_sale(self, sale: PosSaleV1, event: CloudEvent):
        tables = ledger.LegacyTables.of(self.db.tables)
        return apply_once(self.db.engine, "erp.on_pos_sale", event,
                          lambda conn: ledger.post_sale(conn, tables, sale))

    @reliable_handler("store_agent", "pos.return.v1")
    def on_pos_return(self, ret: PosReturnV1, event: CloudEvent):
        tables = ledger.LegacyTables.of(self.db.tables)
        return apply_once(self.db.engine, "erp.on_pos_return", event,
                          lambda conn: ledger.post_return(conn, tables, ret))
