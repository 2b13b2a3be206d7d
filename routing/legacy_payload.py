"""The legacy ERP's POS payload (UPPER-CASE keys, cents) <-> our contracts.

POS systems keep sending exactly what they sent to the ERP; only the base
URL changes. The agent refuses what the legacy ERP refuses (its column
widths, its tender codes), so the bus path never accepts a sale that the
ERP could not hold; errors use the POS's own field names, lines from 1.
"""
from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from pydantic import ValidationError

from contracts.errors import ContractError, error_paths
from contracts.pos import Limits, PosReturnV1, PosSaleV1

_FIELDS = {
    "store_id": "STORE", "terminal_id": "TERMINAL", "pos_txn_id": "TXN_ID",
    "business_day": "TXN_DATE", "occurred_at": "TXN_TIME", "currency": "CURRENCY",
    "lines": "LINES", "tenders": "TENDERS", "total_minor": "TOTAL",
    "loyalty_card": "LOYALTY_CARD", "customer_id": "CUST_NO", "reason": "REASON",
    "sku": "SKU", "quantity": "QTY", "unit_price_minor": "PRICE",
    "discount_minor": "DISC", "line_total_minor": "LINE", "kind": "TYPE", "amount_minor": "AMOUNT", "hold_id": "HOLD_ID",
    "original.store_id": "ORIG_STORE", "original.pos_txn_id": "ORIG_TXN_ID", "original": "ORIG_TXN_ID",
}
TENDER_TYPES = {"CASH": "cash", "CARD": "card", "VOUCHER": "voucher", "LOYALTY": "loyalty", "OTHER": "other"}
# The legacy ERP's column widths (demo/legacy_erp schema): longer values cannot be stored.
_WIDTHS = {"SKU": 20, "LOYALTY_CARD": 20, "CUST_NO": 12}


def _refuse(path: str, reason: str):
    raise ContractError(f"{path}: {reason}", [(path, reason)])


def _legacy_path(path: str) -> str:
    """`lines.0.quantity` -> `LINES[1].QTY`; `original.store_id` -> `ORIG_STORE`."""
    for prefix in ("original.store_id", "original.pos_txn_id"):
        if path.startswith(prefix):
            return _FIELDS[prefix]
    out = ""
    for part in path.split("."):
        if part.isdigit():
            out += f"[{int(part) + 1}]"
        else:
            out += ("." if out else "") + _FIELDS.get(part, part)
    return out


def _when(payload: dict) -> tuple[date, datetime | None]:
    """The business day, and the moment when the till sent a TXN_TIME: without one the
    legacy ERP stores no time (NULL), so the contract carries none either."""
    day, clock = payload.get("TXN_DATE"), payload.get("TXN_TIME")
    try:
        on = datetime.strptime(day, "%Y%m%d").date() if isinstance(day, str) and len(day) == 8 else None
    except ValueError:
        on = None
    if on is None:
        _refuse("TXN_DATE", f"expected a date as YYYYMMDD, got {day!r}")
    if clock is None or clock == "":
        return on, None
    try:
        at = datetime.strptime(clock, "%H%M%S") if isinstance(clock, str) and len(clock) == 6 else None
    except ValueError:
        at = None
    if at is None:
        _refuse("TXN_TIME", f"expected a time as HHMMSS, got {clock!r}")
    return on, datetime.combine(on, at.time(), tzinfo=timezone.utc)


def _optional(payload: dict, key: str) -> Any:
    value = payload.get(key)
    if value == "":  # the legacy ERP stores an empty optional field as NULL
        return None
    if isinstance(value, str) and key in _WIDTHS and len(value) > _WIDTHS[key]:
        _refuse(key, f"at most {_WIDTHS[key]} characters")
    return value


def _list(payload: dict, key: str) -> list:
    value = payload.get(key)
    if not isinstance(value, list):
        _refuse(key, "expected a list")
    return value


def _line(i: int, line: Any) -> Any:
    if not isinstance(line, dict):
        return line
    sku = line.get("SKU")
    if isinstance(sku, str) and len(sku) > _WIDTHS["SKU"]:
        _refuse(f"LINES[{i}].SKU", f"at most {_WIDTHS['SKU']} characters")
    return dict(line_no=i, sku=sku, quantity=line.get("QTY"), unit_price_minor=line.get("PRICE"),
                discount_minor=line.get("DISC", 0), line_total_minor=line.get("LINE"))


def _tender(i: int, tender: Any) -> Any:
    if not isinstance(tender, dict):
        return tender
    kind = TENDER_TYPES.get(tender.get("TYPE"))
    if kind is None:
        _refuse(f"TENDERS[{i}].TYPE", f"unknown tender type {tender.get('TYPE')!r} "
                                      f"(one of {', '.join(TENDER_TYPES)})")
    fields = dict(kind=kind, amount_minor=tender.get("AMOUNT"))
    if tender.get("HOLD_ID") not in (None, ""):  # a LOYALTY tender's hold (POST /v1/loyalty/authorize)
        fields["hold_id"] = tender["HOLD_ID"]
    return fields


def _common(payload: Any) -> dict:
    if not isinstance(payload, dict):
        _refuse("body", "expected a JSON object")
    day, at = _when(payload)
    return dict(
        store_id=payload.get("STORE"), terminal_id=payload.get("TERMINAL"),
        pos_txn_id=payload.get("TXN_ID"), business_day=day, occurred_at=at,
        currency=payload.get("CURRENCY"), total_minor=payload.get("TOTAL"),
        loyalty_card=_optional(payload, "LOYALTY_CARD"), customer_id=_optional(payload, "CUST_NO"),
        lines=[_line(i, line) for i, line in enumerate(_list(payload, "LINES"), start=1)],
        tenders=[_tender(i, t) for i, t in enumerate(_list(payload, "TENDERS"), start=1)],
    )


def _validate(model, fields: dict, limits: Limits | None):
    try:
        return model.model_validate(fields, context={"limits": limits} if limits else None)
    except ValidationError as exc:
        errors = [(_legacy_path(path), msg) for path, msg in error_paths(exc)]
        raise ContractError("; ".join(f"{p}: {m}" for p, m in errors), errors) from None


def sale_from_legacy(payload: Any, limits: Limits | None = None) -> PosSaleV1:
    """`limits`: the agent's bounds (contracts.pos.Limits), refused naming the field."""
    return _validate(PosSaleV1, _common(payload), limits)


def return_from_legacy(payload: Any, limits: Limits | None = None) -> PosReturnV1:
    fields = _common(payload)
    if _optional(payload, "ORIG_TXN_ID") is not None:  # a return without a receipt has none
        fields["original"] = dict(store_id=payload.get("ORIG_STORE") or payload.get("STORE"),
                                  pos_txn_id=payload.get("ORIG_TXN_ID"))
    fields["reason"] = _optional(payload, "REASON")
    return _validate(PosReturnV1, fields, limits)
