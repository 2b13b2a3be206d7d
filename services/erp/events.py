"""The events the erp service announces once a posting is committed: contract <- posting.

Ids are minted once, when the event enters the outbox, so a re-sent event is
the same message; the idempotency key names the ERP document, so every
consumer can recognise a repeat.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from prometheus_client import Counter
from ulid import ULID

from contracts.envelope import AssembledEvent, CloudEvent
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1
from contracts.pos import PosReturnV1, PosSaleV1
from bus.publisher import UnroutableError

log = logging.getLogger(__name__)
SOURCE = "erp"
REFUSED = Counter("retailbus_cdc_refused_total", "Captured legacy rows the contract refused", ["table"])


def _document(txn: PosSaleV1 | PosReturnV1, doc_no: str) -> dict:
    """The posted document as its contract's JSON, assembled, not validated: every
    value is the validated sale's (same field types) or ours. Validating our own
    copy again cost more per sale than writing its rows; a unit test holds this to
    the contract."""
    return {"store_id": txn.store_id, "pos_txn_id": txn.pos_txn_id, "doc_no": doc_no,
            "business_day": txn.business_day.isoformat(),
            "posted_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "currency": txn.currency, "total_minor": txn.total_minor, "loyalty_card": txn.loyalty_card,
            "lines": [{"sku": line.sku, "quantity": line.quantity, "line_total_minor": line.line_total_minor}
                      for line in txn.lines]}


def _event(type_name: str, doc_no: str, data: dict, correlationid: str | None) -> CloudEvent:
    event_id = str(ULID())
    return AssembledEvent.model_construct(
        id=event_id, source=SOURCE, type=type_name, time=datetime.now(timezone.utc), subject=doc_no,
        data=data, correlationid=correlationid or event_id, idempotencykey=f"{type_name}:{doc_no}")


def sale_posted(sale: PosSaleV1, doc_no: str, correlationid: str | None) -> CloudEvent:
    return _event(ErpSalePostedV1.TYPE, doc_no, _document(sale, doc_no), correlationid)


def return_posted(ret: PosReturnV1, doc_no: str, original_doc_no: str | None,
                  correlationid: str | None, original: dict | None = None) -> CloudEvent:
    """`original`: the sale as the ERP holds it (services/erp/return_facts.py), None without one."""
    data = {**_document(ret, doc_no), "original_pos_txn_id": ret.original.pos_txn_id if ret.original else None,
            "original_doc_no": original_doc_no, "original": original}
    return _event(ErpReturnPostedV1.TYPE, doc_no, data, correlationid)


def publish_changes(publisher, changes, mapper, table: str, envelopes=list, unroutable_ok: bool = True) -> int:
    """Map captured rows to events (or to items, which `envelopes` packs into events)
    and publish them, confirmed; returns how many rows left.

    A row the contract refuses (legacy data the contract cannot carry) is
    logged and counted, not retried: no retry can change the row, and holding
    it would stop the capture of every later change. UnroutableError events (no
    subscriber yet) are not an error for the same reason, unless `unroutable_ok`
    is False (a change its subscriber must not miss: the batch waits for its queue).
    Any other publish failure raises, so the batch comes again.
    """
    out = []
    for change in changes:
        try:
            out.append(mapper(change.row, deleted=change.deleted) if change.deleted else mapper(change.row))
        except (ValueError, TypeError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
            REFUSED.labels(table).inc()
            log.error("%s row refused by the contract: %s", table, exc, extra={"id": repr(change.row)[:200]})
    errors = [e for e in publisher.publish_many(envelopes(out))
              if e is not None and not (unroutable_ok and isinstance(e, UnroutableError))]
    if errors:
        raise errors[0]
    return len(out)
