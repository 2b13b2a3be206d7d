"""The legacy ERP's POS payload (UPPER-CASE keys, cents) <-> our contracts.

POS systems keep sending exactly what they sent to the ERP; only the base
URL changes. Errors are reported in the POS's own field names.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from contracts.errors import ContractError, error_paths
from contracts.pos import PosReturnV1, PosSaleV1

_FIELDS = {
    "store_id": "STORE", "terminal_id": "TERMINAL", "pos_txn_id": "TXN_ID",
    "business_day": "TXN_DATE", "occurred_at": "TXN_TIME", "currency": "CURRENCY",
    "lines": "LINES", "tenders": "TENDERS", "total_minor": "TOTAL",
    "loyalty_card": "LOYALTY_CARD", "customer_id": "CUST_NO", "original": "ORIG_TXN_ID",
    "reason": "REASON", "sku": "SKU", "quantity": "QTY", "unit_price_minor": "PRICE",
    "discount_minor": "DISC", "line_total_minor": "LINE", "kind": "TYPE", "amount_minor": "AMOUNT",
}


def _legacy_path(path: str) -> str:
    """`lines.0.quantity` -> `LINES[1].QTY` (the legacy ERP counts lines from 1)"""
    out = ""
    for part in path.split("."):
        if part.isdigit():
            out += f"[{int(part) + 1}]"
        else:
            out += ("." if out else "") + _FIELDS.get(part, part)
    return out


def _when(payload: dict) -> tuple[Any, Any]:
    day, clock = str(payload.get("TXN_DATE", "")), str(payload.get("TXN_TIME") or "000000")
    if not re.fullmatch(r"\d{8}", day):
        raise ContractError(f"TXN_DATE: expected YYYYMMDD, got {day!r}", [("TXN_DATE", "expected YYYYMMDD")])
    try:
        at = datetime.strptime(day + clock, "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ContractError(f"TXN_TIME: expected HHMMSS, got {clock!r}",
                            [("TXN_TIME", "expected HHMMSS")]) from None
    return at.date(), at


def _common(payload: dict) -> dict:
    if not isinstance(payload, dict):
        raise ContractError("body: expected a JSON object", [("body", "expected a JSON object")])
    day, at = _when(payload)
    return dict(
        store_id=payload.get("STORE"), terminal_id=payload.get("TERMINAL"),
        pos_txn_id=payload.get("TXN_ID"), business_day=day, occurred_at=at,
        currency=payload.get("CURRENCY"), total_minor=payload.get("TOTAL"),
        loyalty_card=payload.get("LOYALTY_CARD"), customer_id=payload.get("CUST_NO"),
        lines=[dict(line_no=i, sku=line.get("SKU"), quantity=line.get("QTY"),
                    unit_price_minor=line.get("PRICE"), discount_minor=line.get("DISC", 0),
                    line_total_minor=line.get("LINE"))
               if isinstance(line, dict) else line
               for i, line in enumerate(payload.get("LINES") or [], start=1)],
        tenders=[dict(kind=str(t.get("TYPE", "")).lower(), amount_minor=t.get("AMOUNT"))
                 if isinstance(t, dict) else t for t in payload.get("TENDERS") or []],
    )


def _validate(model, fields: dict):
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        errors = [(_legacy_path(path), msg) for path, msg in error_paths(exc)]
        raise ContractError("; ".join(f"{p}: {m}" for p, m in errors), errors) from None


def sale_from_legacy(payload: dict) -> PosSaleV1:
    return _validate(PosSaleV1, _common(payload))


def return_from_legacy(payload: dict) -> PosReturnV1:
    fields = _common(payload)
    fields["original"] = dict(store_id=payload.get("ORIG_STORE") or payload.get("STORE"),
                              pos_txn_id=payload.get("ORIG_TXN_ID"))
    fields["reason"] = payload.get("REASON")
    return _validate(PosReturnV1, fields)
