"""The legacy ERP's own posting logic: validate a POS document, then book it.

This is the behaviour retailbus has to reproduce when it strangles the ERP,
so it is written the way legacy ERPs work: document numbers from a counter
table, a duplicate check by SELECT (racy on purpose; there is no unique
constraint behind it), stock and general ledger updated in the same
transaction as the document. Every function takes a Connection inside the
caller's transaction, so the caller decides what commits together.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from .schema import DOC_SEQ, GL_PST, SLS_HDR, SLS_LIN, SLS_TND, STK_LVL, STK_RSV, utc_stamp

#: GL account debited (sale) or credited (return) per tender type.
TENDER_ACCOUNTS = {"CASH": "1000", "CARD": "1100", "VOUCHER": "1200",
                   "LOYALTY": "1300", "OTHER": "1900"}
REVENUE_ACCOUNT = "4000"
CHANNEL = "POSAPI"

_INT32 = 2**31 - 1
_INT64 = 2**63 - 1


class ValidationError(ValueError):
    """A payload the ERP refuses; ``str()`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Line:
    sku: str
    qty: int
    price: int
    disc: int
    line: int


@dataclass(frozen=True)
class Tender:
    type: str
    amount: int


@dataclass(frozen=True)
class Document:
    """A validated sale (``doc_type`` 'S') or return ('R') in ERP terms."""

    doc_type: str
    store: str
    terminal: str
    txn_id: str
    txn_date: str
    txn_time: str | None
    currency: str
    total: int
    lines: tuple[Line, ...]
    tenders: tuple[Tender, ...]
    loyalty_card: str | None
    cust_no: str | None
    orig_store: str | None = None
    orig_txn_id: str | None = None


class Posted(NamedTuple):
    doc_no: str
    duplicate: bool


# --- validation -------------------------------------------------------------

def _text(obj: dict, key: str, field: str, max_len: int, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None or value == "":
        if required:
            raise ValidationError(field, "required")
        return None
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if len(value) > max_len:
        raise ValidationError(field, f"longer than {max_len} characters")
    return value


def _int(obj: dict, key: str, field: str, bound: int, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise ValidationError(field, "required")
    # bool is an int subclass in Python; amounts must be real integers (cents).
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(field, "must be an integer")
    if abs(value) > bound:
        raise ValidationError(field, "out of range")
    return value


def _stamp(obj: dict, key: str, fmt: str, width: int, required: bool) -> str | None:
    value = _text(obj, key, key, width, required)
    if value is None:
        return None
    try:
        if len(value) != width or not value.isdigit():
            raise ValueError
        datetime.strptime(value, fmt)
    except ValueError:
        raise ValidationError(key, f"must be {width} digits ({fmt.replace('%', '')})") from None
    return value


def _list(obj: dict, key: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list) or not value:
        raise ValidationError(key, "must be a non-empty list")
    return value


def _lines(payload: dict) -> tuple[Line, ...]:
    lines = []
    for no, raw in enumerate(_list(payload, "LINES"), start=1):
        at = f"LINES[{no}]"
        if not isinstance(raw, dict):
            raise ValidationError(at, "must be an object")
        line = Line(
            sku=_text(raw, "SKU", f"{at}.SKU", 20),
            qty=_int(raw, "QTY", f"{at}.QTY", _INT32),
            price=_int(raw, "PRICE", f"{at}.PRICE", _INT64),
            disc=_int(raw, "DISC", f"{at}.DISC", _INT64, default=0),
            line=_int(raw, "LINE", f"{at}.LINE", _INT64),
        )
        if line.qty == 0:
            raise ValidationError(f"{at}.QTY", "must not be zero")
        if line.price < 0:
            raise ValidationError(f"{at}.PRICE", "must not be negative")
        if line.disc < 0:
            raise ValidationError(f"{at}.DISC", "must not be negative")
        expected = line.qty * line.price - line.disc
        if line.line != expected:
            raise ValidationError(f"{at}.LINE", f"{line.line} != QTY*PRICE-DISC = {expected}")
        lines.append(line)
    return tuple(lines)


def _tenders(payload: dict) -> tuple[Tender, ...]:
    tenders = []
    for no, raw in enumerate(_list(payload, "TENDERS"), start=1):
        at = f"TENDERS[{no}]"
        if not isinstance(raw, dict):
            raise ValidationError(at, "must be an object")
        kind = _text(raw, "TYPE", f"{at}.TYPE", 8)
        if kind not in TENDER_ACCOUNTS:
            raise ValidationError(f"{at}.TYPE", f"unknown tender type {kind!r}")
        tenders.append(Tender(kind, _int(raw, "AMOUNT", f"{at}.AMOUNT", _INT64)))
    return tuple(tenders)


def parse_document(payload: Any, doc_type: str) -> Document:
    """Validate a legacy POS payload; raises ValidationError naming the field.

    Line and tender positions in messages count from 1, like LINE_NO.
    """
    if not isinstance(payload, dict):
        raise ValidationError("body", "must be a JSON object")
    store = _text(payload, "STORE", "STORE", 8)
    header = {
        "store": store,
        "terminal": _text(payload, "TERMINAL", "TERMINAL", 4),
        "txn_id": _text(payload, "TXN_ID", "TXN_ID", 40),
        "txn_date": _stamp(payload, "TXN_DATE", "%Y%m%d", 8, required=True),
        "txn_time": _stamp(payload, "TXN_TIME", "%H%M%S", 6, required=False),
        "currency": _text(payload, "CURRENCY", "CURRENCY", 3),
        "loyalty_card": _text(payload, "LOYALTY_CARD", "LOYALTY_CARD", 20, required=False),
        "cust_no": _text(payload, "CUST_NO", "CUST_NO", 12, required=False),
    }
    currency = header["currency"]
    if len(currency) != 3 or not (currency.isascii() and currency.isalpha() and currency.isupper()):
        raise ValidationError("CURRENCY", "must be a 3-letter upper-case ISO code")
    if doc_type == "R":
        header["orig_txn_id"] = _text(payload, "ORIG_TXN_ID", "ORIG_TXN_ID", 40, required=False)
        header["orig_store"] = _text(payload, "ORIG_STORE", "ORIG_STORE", 8, required=False) or store
        _text(payload, "REASON", "REASON", 200, required=False)  # accepted, not stored
    lines = _lines(payload)
    tenders = _tenders(payload)
    total = _int(payload, "TOTAL", "TOTAL", _INT64)
    line_sum = sum(line.line for line in lines)
    if total != line_sum:
        raise ValidationError("TOTAL", f"{total} != sum of LINES[].LINE = {line_sum}")
    tender_sum = sum(tender.amount for tender in tenders)
    if tender_sum != total:
        raise ValidationError("TENDERS", f"sum of AMOUNT = {tender_sum} != TOTAL {total}")
    return Document(doc_type=doc_type, total=total, lines=lines, tenders=tenders, **header)


# --- posting ----------------------------------------------------------------

def next_doc_no(conn: Connection, seq_name: str, prefix: str) -> str:
    """Draw the next number; the UPDATE locks the counter row until commit."""
    result = conn.execute(
        DOC_SEQ.update().where(DOC_SEQ.c.SEQ_NAME == seq_name)
        .values(NEXT_NO=DOC_SEQ.c.NEXT_NO + 1)
    )
    if result.rowcount != 1:
        raise LookupError(f"DOC_SEQ row {seq_name!r} missing; run init")
    number = conn.execute(
        select(DOC_SEQ.c.NEXT_NO - 1).where(DOC_SEQ.c.SEQ_NAME == seq_name)
    ).scalar_one()
    return f"{prefix}{number:08d}"


def find_document(conn: Connection, store: str, doc_type: str, txn_id: str) -> str | None:
    """The first DOC_NO booked for this POS transaction, if any."""
    return conn.execute(
        select(func.min(SLS_HDR.c.DOC_NO)).where(
            SLS_HDR.c.STORE_NO == store,
            SLS_HDR.c.DOC_TYPE == doc_type,
            SLS_HDR.c.POS_TXN_ID == txn_id,
        )
    ).scalar()


def _move_stock(conn: Connection, store: str, sku: str, delta: int, now: str) -> None:
    result = conn.execute(
        STK_LVL.update()
        .where(STK_LVL.c.STORE_NO == store, STK_LVL.c.SKU == sku)
        .values(ON_HAND=STK_LVL.c.ON_HAND + delta, UPD_TS=now)
    )
    if result.rowcount == 0:
        # The legacy ERP books against stock it never heard of: negative on hand.
        conn.execute(STK_LVL.insert().values(STORE_NO=store, SKU=sku, ON_HAND=delta, UPD_TS=now))


def post_document(conn: Connection, doc: Document) -> Posted:
    """Book a validated document, or answer the DOC_NO it already has."""
    existing = find_document(conn, doc.store, doc.doc_type, doc.txn_id)
    if existing is not None:
        return Posted(existing, duplicate=True)
    sale = doc.doc_type == "S"
    doc_no = next_doc_no(conn, "SLS" if sale else "RTN", doc.doc_type)
    orig_doc_no = None
    if not sale and doc.orig_txn_id:
        orig_doc_no = find_document(conn, doc.orig_store, "S", doc.orig_txn_id)
    now = utc_stamp()
    conn.execute(SLS_HDR.insert().values(
        DOC_NO=doc_no, DOC_TYPE=doc.doc_type, STORE_NO=doc.store, TERM_NO=doc.terminal,
        POS_TXN_ID=doc.txn_id, TXN_DATE=doc.txn_date, TXN_TIME=doc.txn_time,
        TOTAL_CENTS=doc.total, CURRENCY=doc.currency, LOYALTY_CARD=doc.loyalty_card,
        CUST_NO=doc.cust_no, ORIG_DOC_NO=orig_doc_no, CHANNEL=CHANNEL, CREATED_TS=now,
    ))
    conn.execute(SLS_LIN.insert(), [
        {"DOC_NO": doc_no, "LINE_NO": no, "SKU": line.sku, "QTY": line.qty,
         "UNIT_PRICE_CENTS": line.price, "DISC_CENTS": line.disc, "LINE_CENTS": line.line}
        for no, line in enumerate(doc.lines, start=1)
    ])
    conn.execute(SLS_TND.insert(), [
        {"DOC_NO": doc_no, "SEQ": seq, "TND_TYPE": tender.type, "AMOUNT_CENTS": tender.amount}
        for seq, tender in enumerate(doc.tenders, start=1)
    ])
    for line in doc.lines:
        _move_stock(conn, doc.store, line.sku, -line.qty if sale else line.qty, now)
    conn.execute(GL_PST.insert(), _gl_rows(doc, doc_no))
    return Posted(doc_no, duplicate=False)


def _gl_rows(doc: Document, doc_no: str) -> list[dict]:
    """Sale: DR each tender account, CR revenue. Return: the mirror image."""
    sale = doc.doc_type == "S"

    def row(account: str, amount: int, debit: bool) -> dict:
        return {"DOC_NO": doc_no, "ACCOUNT": account, "POST_DATE": doc.txn_date,
                "DR_CENTS": amount if debit else 0, "CR_CENTS": 0 if debit else amount}

    rows = [row(TENDER_ACCOUNTS[t.type], t.amount, debit=sale) for t in doc.tenders]
    rows.append(row(REVENUE_ACCOUNT, doc.total, debit=not sale))
    return rows


def post_sale(conn: Connection, payload: Any) -> Posted:
    """Validate and book a ``POST /erp/sales`` payload."""
    return post_document(conn, parse_document(payload, "S"))


def post_return(conn: Connection, payload: Any) -> Posted:
    """Validate and book a ``POST /erp/returns`` payload."""
    return post_document(conn, parse_document(payload, "R"))


def stock_level(conn: Connection, store: str, sku: str) -> int | None:
    """ON_HAND for a store and SKU, or None when the ERP has no such row."""
    return conn.execute(
        select(STK_LVL.c.ON_HAND).where(STK_LVL.c.STORE_NO == store, STK_LVL.c.SKU == sku)
    ).scalar()


def stock_answer(conn: Connection, store: str, sku: str, now: datetime) -> dict | None:
    """``GET /erp/stock``: on hand, reserved for click-and-collect orders (live, unexpired) and
    what is left to sell; None when the ERP has no such row."""
    on_hand = stock_level(conn, store, sku)
    if on_hand is None:
        return None
    r = STK_RSV.c
    reserved = conn.execute(select(func.coalesce(func.sum(r.QTY), 0)).where(
        r.STORE_NO == store, r.SKU == sku, r.STATUS == "L",
        r.EXPIRES_TS > now.strftime("%Y-%m-%dT%H:%M:%S.%f"))).scalar()
    return {"STORE": store, "SKU": sku, "ON_HAND": on_hand, "RESERVED": int(reserved),
            "AVAILABLE": on_hand - int(reserved)}
