"""CUST_MST, the legacy customer table <-> our contracts: the one place for this table.

Legacy programs leave empty strings where the contract wants None (an empty
string is not an email) and keep consents as 'Y'/'N'. A captured row becomes
`customer.updated.v2` (origin `erp`) keyed by the row version: its timestamp
and a digest of its values, as two legacy writes may share one timestamp.

The customer hub's writes (`customer.mastered.v1`) are applied here: only the
columns whose value differs, the row stamped anew. Each write notes the row
version it left in RB_CUST_ECHO in the same transaction, so change capture
knows that version as the bus's own and never reports it back (the hub would
take it as no change anyway; this keeps it off the wire). A row a legacy
program changed since the bus's last write may not be captured yet: its
version is reported before the write overwrites it (in the erp's outbox,
under the key capture would give it), so no legacy edit is lost to capture.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from functools import lru_cache

from sqlalchemy import Column, MetaData, String, Table, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from contracts.customer import CustomerUpdatedV1, CustomerUpdatedV2, CustomerValues
from contracts.envelope import CloudEvent
from contracts.mastering import CustomerWrite
from legacy_wrappers.legacy_db import check_row
from legacy_wrappers.prepared import Prepared
from services.erp.stock import legacy_time

TABLE = "CUST_MST"
KEY = ("CUST_NO",)
SOURCE = "legacy/erp/CUST_MST"
ORIGIN = "erp"
SYSTEM = "erp"

# attribute -> column; consents are 'Y'/'N' there
COLUMNS = {"name": "NAME", "email": "EMAIL", "phone": "PHONE", "loyalty_card": "LOYALTY_CARD",
           "billing_address": "BILL_ADDR", "tax_id": "TAX_ID", "consent_marketing_email": "MKT_EMAIL",
           "consent_sms": "MKT_SMS", "consent_data_sharing": "DATA_SHARE"}
CONSENT_COLUMNS = {"MKT_EMAIL", "MKT_SMS", "DATA_SHARE"}
GOLDEN_COLUMN = "MASTER_ID"

metadata = MetaData()
ECHO = Table(
    "RB_CUST_ECHO", metadata,                      # the CUST_MST row version the bus wrote last
    Column("CUST_NO", String(12), primary_key=True),
    Column("UPD_TS", String(26), nullable=False),
)


def _blank_to_none(value: str | None) -> str | None:
    return value if value and value.strip() else None


def _from_column(column: str, value):
    if column in CONSENT_COLUMNS:
        return {"Y": True, "N": False}.get((value or "").strip().upper())
    return _blank_to_none(value)


def _to_column(column: str, value):
    if column in CONSENT_COLUMNS:
        return None if value is None else ("Y" if value else "N")
    return value


def stamp(ts: datetime) -> str:
    """The legacy UPD_TS format: ISO UTC with microseconds, 26 characters, sortable."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def customer(row) -> CustomerUpdatedV1:
    """The account as `customer_account` answers it (the RPC's shape)."""
    return CustomerUpdatedV1(
        customer_id=row["CUST_NO"], name=row["NAME"], email=_blank_to_none(row["EMAIL"]),
        phone=_blank_to_none(row["PHONE"]), loyalty_card=_blank_to_none(row["LOYALTY_CARD"]),
        updated_at=legacy_time(row["UPD_TS"]))


def customer_account(conn: Connection, cust: Table, customer_id: str) -> dict | None:
    check_row(cust, {"CUST_NO": customer_id})
    row = conn.execute(select(cust).where(cust.c.CUST_NO == customer_id)).mappings().first()
    return None if row is None else customer(row).model_dump(mode="json")


def _values(row: dict) -> CustomerValues:
    return CustomerValues(**{a: _from_column(c, row.get(c)) for a, c in COLUMNS.items() if c in row})


def row_key(row: dict) -> str:
    """The idempotency key of a row version: its account, timestamp and a digest of its values."""
    digest = hashlib.sha256(json.dumps(_values(row).model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return f"{CustomerUpdatedV2.TYPE}:{row['CUST_NO']}:{row['UPD_TS']}:{digest[:16]}"


def customer_updated(row: dict) -> CloudEvent:
    """A captured row version as `customer.updated.v2`; a row the contract refuses raises ValueError."""
    data = CustomerUpdatedV2(origin=ORIGIN, record_id=row["CUST_NO"], changed_at=legacy_time(row["UPD_TS"]),
                             values=_values(row))
    return CloudEvent.new(CustomerUpdatedV2.TYPE, SOURCE, data, subject=row["CUST_NO"], idempotencykey=row_key(row))


# look-ups by many account numbers, built once: an IN list of literals is coerced value by value
# each time (a thousand numbers a batch of change capture or of the hub's writes)
_ECHOED = select(ECHO.c.CUST_NO, ECHO.c.UPD_TS).where(ECHO.c.CUST_NO.in_(bindparam("numbers", expanding=True)))


@lru_cache(maxsize=8)
def _accounts(cust: Table):
    return select(cust).where(cust.c.CUST_NO.in_(bindparam("numbers", expanding=True)))


def not_ours(conn: Connection, rows: list[dict]) -> list[dict]:
    """The captured rows whose version is not one the bus wrote."""
    if not rows:
        return []
    ours = dict(conn.execute(_ECHOED, {"numbers": [r["CUST_NO"] for r in rows]}).all())
    return [r for r in rows if ours.get(r["CUST_NO"]) != r["UPD_TS"]]


_NOTE = {name: insert(ECHO) for name, insert in (("sqlite", sqlite.insert), ("postgresql", postgresql.insert))}


@lru_cache(maxsize=8)
def _insert(cust: Table) -> Prepared:
    """INSERT into CUST_MST as the database has it (reflected), compiled once."""
    return Prepared(cust.insert())


@lru_cache(maxsize=256)
def _update(cust: Table, columns: tuple[str, ...]) -> Prepared:
    """UPDATE of `columns` of one account (`k_CUST_NO`), compiled once per set of columns."""
    return Prepared(cust.update().where(cust.c.CUST_NO == bindparam("k_CUST_NO")).values(
        {c: bindparam(c) for c in columns}))


def apply_writes(conn: Connection, cust: Table, writes: list[CustomerWrite]) -> tuple[int, list[dict]]:
    """The hub's writes to CUST_MST in the caller's transaction: (rows written, the earlier versions
    of rows a legacy program changed since the bus last wrote them, to report before they go)."""
    if not writes:
        return 0, []
    now = stamp(datetime.now(timezone.utc))
    numbers = list(dict.fromkeys(w.record_id for w in writes))
    current = {r["CUST_NO"]: dict(r) for r in conn.execute(_accounts(cust), {"numbers": numbers}).mappings()}
    unseen = {r["CUST_NO"] for r in not_ours(conn, list(current.values()))}
    overwritten, written, inserted, updated = [], {}, [], {}
    for write in writes:
        columns = {COLUMNS[a]: _to_column(COLUMNS[a], v) for a, v in write.values.given().items() if a in COLUMNS}
        if write.write_golden_id:
            columns[GOLDEN_COLUMN] = write.golden_id
        check_row(cust, {"CUST_NO": write.record_id, **{k: v for k, v in columns.items() if isinstance(v, str)}})
        row = current.get(write.record_id)
        if row is None:
            row = current[write.record_id] = {c.name: None for c in cust.columns}
            row.update(CUST_NO=write.record_id, NAME=columns.get("NAME") or "", UPD_TS=now)
            row.update(columns)
            inserted.append(row)
            written[write.record_id] = now
            continue
        changed = {k: v for k, v in columns.items() if row.get(k) != v}
        if not changed:
            continue
        if write.record_id in unseen:
            overwritten.append(dict(row))
            unseen.discard(write.record_id)
        row.update(changed, UPD_TS=now)
        updated.setdefault(write.record_id, {}).update(changed, UPD_TS=now)
        written[write.record_id] = now
    if inserted:  # new accounts in one statement (a new customer's row is written once above)
        _insert(cust)(conn, [dict(row) for row in inserted])
    by_columns: dict[tuple, list[dict]] = {}  # changed accounts: one statement per set of columns, not per row
    for number, changed in updated.items():   # (a Core UPDATE each: ~a fifth of the erp's CPU in a nightly file)
        by_columns.setdefault(tuple(sorted(changed)), []).append({**changed, "k_CUST_NO": number})
    for columns, rows in by_columns.items():
        _update(cust, columns)(conn, rows)
    if written:
        rows = [{"CUST_NO": n, "UPD_TS": ts} for n, ts in written.items()]
        statement = _NOTE[conn.dialect.name]
        conn.execute(statement.on_conflict_do_update(index_elements=["CUST_NO"],
                                                     set_={"UPD_TS": statement.excluded.UPD_TS}), rows)
    return len(written), overwritten
