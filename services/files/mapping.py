"""Rows of the demo estate's batch files <-> retail contracts (plain functions)."""
from __future__ import annotations

from datetime import UTC, datetime

import orjson
from ulid import ULID

from contracts.batch import EventBatchV1, validate_rows
from contracts.customer import CrmCustomerExportedV1
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1, ErpStockChangedV1
from contracts.envelope import AssembledEvent, CloudEvent
from legacy_wrappers.filedrop.inbound import RowChunk

ROW_TYPES = {"customers": CrmCustomerExportedV1, "stock": ErpStockChangedV1}
# The business name of a row, by which `retailbus trace` finds it: these fields (the contract
# requires them), joined by "/"; the drop's row loop writes it (`file_drop(name_fields=...)`).
NAME_FIELDS = {"customers": ("customer_id",), "stock": ("store_id", "sku")}


def drop_options(drop: str) -> dict:
    """The `file_drop` options of a drop: its contract's JSON schema, for the row loop
    to test every row's values against (legacy_wrappers/filedrop/rowcode.py), and
    the fields that name a row."""
    return {"values_schema": ROW_TYPES[drop].model_json_schema(), "name_fields": NAME_FIELDS[drop]}


def batch_event(chunk: RowChunk, source: str) -> tuple[CloudEvent, dict]:
    """One envelope per chunk, each row checked against its contract and keyed
    `<sha256>:<row>`; and the chunk's rows for the journal, compactly (`FileRows` in
    contracts/journal.py: the row numbers as runs and each row's business name).

    A row the contract refuses raises ContractError naming the row: the file fails.
    The chunk's rows arrive as the batch's items, already JSON, their values tested
    against the contract's schema in the drop's row loop: the first row is validated
    fully here (the shape is the same for every row of a layout), every row when the
    loop doubted any. The envelope is assembled, not validated: every field is ours,
    and a full pydantic validation of 500 items costs more than the rest of the
    pipeline per row; the items' JSON goes into it as it is (`orjson.Fragment`).

    The chunk's rows are taken from it (`RowChunk.take_rows`), so they live as long
    as the event does (services/files/service.py writes it and lets go of it before
    the publish waits for its confirm), not as long as the worker.
    """
    model = ROW_TYPES[chunk.drop]
    rows = chunk.take_rows()
    checked = [orjson.loads(item) for item in (rows.items if chunk.doubtful else rows.items[:1])]
    validate_rows(model, [i["data"] for i in checked], [i["row"] for i in checked], chunk.file)
    items = orjson.Fragment("[" + ",".join(rows.items) + "]")
    batch = {"item_type": model.TYPE, "file": chunk.file, "sha256": chunk.sha256, "items": items}
    trace = {"sha256": chunk.sha256, "runs": row_runs(rows.numbers), "names": rows.names}
    event_id = str(ULID())
    event = AssembledEvent.model_construct(
        id=event_id, source=source, type=EventBatchV1.TYPE, time=datetime.now(UTC), subject=model.TYPE,
        data=batch, correlationid=event_id,
        # by its rows, not its index: a resumed file's chunks are cut afresh (inbound.py)
        idempotencykey=f"{chunk.sha256}:rows:{rows.numbers[0]}-{rows.numbers[-1]}")
    return event, trace


def row_runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Row numbers (ascending) as runs of consecutive numbers [(first, last), ...]: one run
    for a chunk without skipped rows or lines (a quoted value spanning lines splits it too)."""
    first, last = numbers[0], numbers[-1]
    if last - first + 1 == len(numbers):
        return [(first, last)]
    runs = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return [(a, b) for a, b in runs]


def points_for(total_minor: int) -> int:
    """One loyalty point per whole currency unit (reconciliation expects a record when > 0)."""
    return abs(total_minor) // 100


def points_record(doc: ErpSalePostedV1 | ErpReturnPostedV1) -> dict | None:
    """The loyalty job's record; None when nothing to book."""
    points = points_for(doc.total_minor)
    if not doc.loyalty_card or points == 0:
        return None
    return {"kind": "R" if isinstance(doc, ErpReturnPostedV1) else "A", "card": doc.loyalty_card,
            "store_id": doc.store_id, "pos_txn_id": doc.pos_txn_id,
            "business_day": doc.business_day.strftime("%Y%m%d"), "points": points,
            "basis_minor": abs(doc.total_minor), "currency": doc.currency}
