"""CUST_MST read by the erp service: the account query and the change events.

Legacy programs leave empty strings where the contract wants None (an empty
string is not an email). The event key names the row version: its timestamp
and a digest of its values, as two legacy writes may share one timestamp.
(Writing CUST_MST from customer files is services/erp/customers.py.)
"""
from __future__ import annotations

import hashlib
import json

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection

from contracts.customer import CustomerUpdatedV1
from contracts.envelope import CloudEvent
from legacy_wrappers.legacy_db import check_row
from services.erp.stock import legacy_time

TABLE = "CUST_MST"
KEY = ("CUST_NO",)
SOURCE = "legacy/erp/CUST_MST"


def _blank_to_none(value: str | None) -> str | None:
    return value if value and value.strip() else None


def customer(row) -> CustomerUpdatedV1:
    return CustomerUpdatedV1(
        customer_id=row["CUST_NO"], name=row["NAME"], email=_blank_to_none(row["EMAIL"]),
        phone=_blank_to_none(row["PHONE"]), loyalty_card=_blank_to_none(row["LOYALTY_CARD"]),
        updated_at=legacy_time(row["UPD_TS"]))


def customer_account(conn: Connection, cust: Table, customer_id: str) -> dict | None:
    check_row(cust, {"CUST_NO": customer_id})
    row = conn.execute(select(cust).where(cust.c.CUST_NO == customer_id)).mappings().first()
    return None if row is None else customer(row).model_dump(mode="json")


def customer_updated(row: dict) -> CloudEvent:
    data = customer(row)
    digest = hashlib.sha256(json.dumps(data.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return CloudEvent.new(CustomerUpdatedV1.TYPE, SOURCE, data, subject=row["CUST_NO"],
                          idempotencykey=f"{CustomerUpdatedV1.TYPE}:{row['CUST_NO']}:{row['UPD_TS']}:{digest[:16]}")
