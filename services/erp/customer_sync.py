"""The ERP's side of customer mastering, mixed into the erp service (`ErpService(CustomerSync)`).

Change capture on CUST_MST reports what legacy programs change as
`customer.updated.v2` (origin `erp`) to the customer hub, never the rows the bus
wrote itself (customer_master.py); the hub's writes (`customer.mastered.v1`,
taken in order) go into CUST_MST in one transaction with their inbox key.
"""
from __future__ import annotations

from bus.consumer import DUPLICATE, reliable_handler
from contracts.envelope import CloudEvent
from contracts.mastering import CustomerMasteredV1
from legacy_wrappers import inbox
from legacy_wrappers.table_changes import table_changes
from services.customers.propagation import applied, binding, writes_for
from services.erp import customer_master, events
from services.erp.outbox import insert as outbox_insert

CONSUMER = "erp.on_customer_mastered"


class CustomerSync:
    @table_changes(customer_master.TABLE, key=customer_master.KEY)
    def on_customer_changes(self, changes):
        """CUST_MST rows changed by anyone but the bus -> customer.updated.v2 (a change the hub
        has no queue for yet is retried: a legacy edit must reach it)."""
        with self.db.engine.connect() as conn:  # a read: no transaction held while the publish waits
            rows = customer_master.not_ours(conn, [c.row for c in changes])
            conn.rollback()
        ours = {id(r) for r in rows}
        if events.publish_changes(self.events, [c for c in changes if id(c.row) in ours],
                                  customer_master.customer_updated, customer_master.TABLE, unroutable_ok=False):
            self.hops.add("reported", items=_traced(rows), detail={"system": customer_master.SYSTEM})

    @reliable_handler("customers", binding(customer_master.SYSTEM), ordered=True)
    def on_customer_mastered(self, mastered: CustomerMasteredV1, event: CloudEvent):
        """The hub's writes for ERP accounts, in its order, once."""
        writes = writes_for(mastered, customer_master.SYSTEM)
        if not writes:
            return "none for the erp"
        if not inbox.claim(self.db.conn, CONSUMER, event.idempotencykey, event.id):
            return DUPLICATE
        written, overwritten = customer_master.apply_writes(self.db.conn, self.db.tables[customer_master.TABLE],
                                                            writes)
        if overwritten:  # legacy edits capture may not have seen: reported before they go
            statement, rows = outbox_insert([customer_master.customer_updated(r) for r in overwritten])
            statement(self.db.conn, rows)
            self.outbox.added()
        applied(customer_master.SYSTEM, mastered, written)
        self.hops.add("applied", items=[{"key": f"erp:{w.record_id}", "refs": [w.record_id, w.golden_id]}
                                        for w in writes],
                      detail={"system": customer_master.SYSTEM, "table": customer_master.TABLE, "written": written})
        return written


def _traced(rows: list[dict]) -> list[dict]:
    """The reported row versions for the journal (a row the contract refused was not reported)."""
    items = []
    for row in rows:
        try:
            items.append({"key": customer_master.row_key(row), "refs": [row["CUST_NO"]]})
        except ValueError:
            continue
    return items
