"""Rows of the demo estate's batch files <-> retail contracts (plain functions)."""
from __future__ import annotations

from datetime import UTC, datetime

from ulid import ULID

from contracts.batch import EventBatchV1, check_rows
from contracts.customer import CustomerUpdatedV1
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1, ErpStockChangedV1
from contracts.envelope import CloudEvent
from legacy_wrappers.filedrop.inbound import RowChunk

ROW_TYPES = {"customers": CustomerUpdatedV1, "stock": ErpStockChangedV1}
# The business name of a row, by which `retailbus trace` finds it.
ROW_NAMES = {"customers": lambda v: v.get("customer_id"), "stock": lambda v: f"{v.get('store_id')}/{v.get('sku')}"}


def batch_event(chunk: RowChunk, source: str) -> CloudEvent:
    """One envelope per chunk; each row checked against its contract and keyed `<sha256>:<row>`.

    A row the contract refuses raises ContractError naming the row: the file fails.
    Rows are checked by `check_rows` (the first fully, the values of all), and the
    envelope is assembled, not validated: every field is ours, and a full pydantic
    validation of 500 items costs more than the rest of the pipeline per row.
    """
    model = ROW_TYPES[chunk.drop]
    check_rows(model, [r.values for r in chunk.rows], [r.row for r in chunk.rows], chunk.file)
    batch = {"item_type": model.TYPE, "file": chunk.file, "sha256": chunk.sha256,
             "items": [{"row": r.row, "idempotencykey": r.idempotencykey, "data": r.values}
                       for r in chunk.rows]}
    event_id = str(ULID())
    return CloudEvent.model_construct(
        id=event_id, source=source, type=EventBatchV1.TYPE, time=datetime.now(UTC), subject=model.TYPE,
        data=batch, correlationid=event_id, idempotencykey=f"{chunk.sha256}:chunk:{chunk.index}")


def points_for(total_minor: int) -> int:
    """One loyalty point per whole currency unit (reconciliation expects a record when > 0)."""
    return abs(total_minor) // 100


def trace_items(chunk: RowChunk) -> list[dict]:
    """The chunk's rows for the journal: key, line in the file, business name."""
    name = ROW_NAMES[chunk.drop]
    return [{"key": r.idempotencykey, "row": r.row, "refs": [str(name(r.values) or "")]} for r in chunk.rows]


def points_record(doc: ErpSalePostedV1 | ErpReturnPostedV1) -> dict | None:
    """The loyalty job's record; None when nothing to book."""
    points = points_for(doc.total_minor)
    if not doc.loyalty_card or points == 0:
        return None
    return {"kind": "R" if isinstance(doc, ErpReturnPostedV1) else "A", "card": doc.loyalty_card,
            "store_id": doc.store_id, "pos_txn_id": doc.pos_txn_id,
            "business_day": doc.business_day.strftime("%Y%m%d"), "points": points,
            "basis_minor": abs(doc.total_minor), "currency": doc.currency}
