"""The CRM's HTTP API: profiles, consent, engagement history and segments.

Every profile change (by whom: the API client) is in the change feed
(`GET /changes`), with the profile as it then was; a write that changes nothing
is no change. `POST /customers/batch` writes many profiles at once, as CRMs'
bulk APIs do.
"""
from __future__ import annotations

from demo.json_api import (ApiError, JsonApiServer, Request, add_columns, list_changes, now, record_change,
                           require)

SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    customer_id TEXT PRIMARY KEY, email TEXT, phone TEXT, name TEXT, loyalty_tier TEXT, golden_id TEXT,
    consent_marketing_email INTEGER NOT NULL DEFAULT 0, consent_sms INTEGER NOT NULL DEFAULT 0,
    consent_data_sharing INTEGER NOT NULL DEFAULT 0, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, customer_id TEXT NOT NULL REFERENCES customers(customer_id),
    type TEXT NOT NULL, reference TEXT NOT NULL, store TEXT, amount_minor INTEGER NOT NULL,
    at TEXT NOT NULL, created TEXT NOT NULL, UNIQUE (customer_id, type, reference));
CREATE TABLE IF NOT EXISTS segments (
    customer_id TEXT NOT NULL, segment TEXT NOT NULL, PRIMARY KEY (customer_id, segment))
"""

PROFILE_FIELDS = ("email", "phone", "name", "loyalty_tier", "golden_id")
MAX_BATCH = 500
CONSENTS = ("marketing_email", "sms", "data_sharing")
INTERACTIONS = ("purchase", "return", "service")
# Segment rules, the CRM's own (not retailbus's): recomputed from the whole history.
FREQUENT_PURCHASES = 3
HIGH_VALUE_MINOR = 50_000


def segments_for(purchases: int, returns: int, net_spend_minor: int, tier: str | None) -> list[str]:
    found = []
    if purchases:
        found.append("active")
    if purchases >= FREQUENT_PURCHASES:
        found.append("frequent")
    if net_spend_minor >= HIGH_VALUE_MINOR:
        found.append("high_value")
    if returns >= 2 and returns * 2 >= purchases:
        found.append("returner")
    if tier:
        found.append(f"tier_{tier.lower()}")
    return sorted(found)


def _customer(conn, customer_id: str):
    row = conn.execute("SELECT * FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
    if row is None:
        raise ApiError(404, "unknown_customer", f"customer_id: no customer {customer_id}")
    return row


def _recompute(conn, customer_id: str) -> list[str]:
    return _segments(conn, customer_id, _customer(conn, customer_id)["loyalty_tier"])


def _segments(conn, customer_id: str, tier: str | None, new: bool = False) -> list[str]:
    """The profile's segments again; a new profile's from its tier alone: it has no history yet
    (an interaction needs its profile) and no segments to take away (for a bulk load of new
    profiles, the statements that tell so were ~15 % of the platform's work)."""
    if new:
        found = segments_for(0, 0, 0, tier)
    else:
        stats = conn.execute(
            "SELECT COALESCE(SUM(type = 'purchase'), 0), COALESCE(SUM(type = 'return'), 0), "
            "COALESCE(SUM(CASE type WHEN 'purchase' THEN amount_minor WHEN 'return' THEN -amount_minor ELSE 0 END), "
            "0) FROM interactions WHERE customer_id = ?", (customer_id,)).fetchone()
        found = segments_for(stats[0], stats[1], stats[2], tier)
        conn.execute("DELETE FROM segments WHERE customer_id = ?", (customer_id,))
    conn.executemany("INSERT INTO segments (customer_id, segment) VALUES (?, ?)", [(customer_id, s) for s in found])
    return found


def _view(conn, customer_id: str) -> dict:
    row = _customer(conn, customer_id)
    segs = [r[0] for r in conn.execute("SELECT segment FROM segments WHERE customer_id = ? ORDER BY segment",
                                       (customer_id,))]
    return {"customer_id": customer_id, **{f: row[f] for f in PROFILE_FIELDS},
            "consent": {c: bool(row[f"consent_{c}"]) for c in CONSENTS}, "segments": segs,
            "updated": row["updated"]}


def _upsert(conn, cid: str, body: dict, actor: str) -> bool:
    """Create or update; only the fields given change (`null` clears a profile field). True when
    the profile changed (noted in the change feed); segments follow a new profile or tier."""
    unknown = set(body) - set(PROFILE_FIELDS) - {"consent"}
    if unknown:
        raise ApiError(400, "invalid_field", f"{sorted(unknown)[0]}: unknown field")
    for field in PROFILE_FIELDS:
        if field in body and body[field] is not None and not isinstance(body[field], str):
            raise ApiError(400, "invalid_field", f"{field}: a string or null")
    consent = body.get("consent", {})
    if not isinstance(consent, dict) or any(k not in CONSENTS or not isinstance(v, bool) for k, v in consent.items()):
        raise ApiError(400, "invalid_field", f"consent: an object of booleans among {', '.join(CONSENTS)}")
    row = conn.execute("SELECT * FROM customers WHERE customer_id = ?", (cid,)).fetchone()
    before = dict(row) if row is not None else {**{f: None for f in PROFILE_FIELDS},
                                                **{f"consent_{c}": 0 for c in CONSENTS}}
    after = {**before, **{f: body[f] for f in PROFILE_FIELDS if f in body},
             **{f"consent_{k}": int(v) for k, v in consent.items()}}
    if row is not None and after == before:
        return False
    columns = [*PROFILE_FIELDS, *(f"consent_{c}" for c in CONSENTS)]
    values = {c: after[c] for c in columns}
    if row is None:
        conn.execute(f"INSERT INTO customers (customer_id, {', '.join(columns)}, updated) "
                     f"VALUES (:cid, {', '.join(':' + c for c in columns)}, :updated)",
                     {**values, "cid": cid, "updated": now()})
    else:
        conn.execute(f"UPDATE customers SET {', '.join(f'{c} = :{c}' for c in columns)}, updated = :updated "
                     "WHERE customer_id = :cid", {**values, "cid": cid, "updated": now()})
    record_change(conn, cid, actor, {**{f: after[f] for f in PROFILE_FIELDS},
                                     "consent": {c: bool(after[f"consent_{c}"]) for c in CONSENTS}})
    if row is None or before["loyalty_tier"] != after["loyalty_tier"]:
        _segments(conn, cid, after["loyalty_tier"], new=row is None)
    return True


def put_customer(req: Request) -> tuple[int, dict]:
    _upsert(req.conn, req.params["customer_id"], req.body, req.actor)
    return 200, _view(req.conn, req.params["customer_id"])


def put_customers(req: Request) -> tuple[int, dict]:
    """Many profiles in one call and one transaction: {"customers": [{"customer_id", ...fields}]}."""
    items = req.body.get("customers")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH or not all(
            isinstance(i, dict) and isinstance(i.get("customer_id"), str) and i["customer_id"] for i in items):
        raise ApiError(400, "invalid_field", f"customers: 1..{MAX_BATCH} objects each with a customer_id")
    return 200, {"customers": [{"customer_id": item["customer_id"], "changed": _upsert(
        req.conn, item["customer_id"], {k: v for k, v in item.items() if k != "customer_id"}, req.actor)}
        for item in items]}


def get_customer(req: Request) -> tuple[int, dict]:
    return 200, _view(req.conn, req.params["customer_id"])


def add_interaction(req: Request) -> tuple[int, dict]:
    """One engagement entry per (customer, type, reference): a repeat changes nothing."""
    cid, body = req.params["customer_id"], req.body
    _customer(req.conn, cid)
    kind, reference = require(body, "type", str), require(body, "reference", str)
    if kind not in INTERACTIONS:
        raise ApiError(400, "invalid_field", f"type: one of {', '.join(INTERACTIONS)}")
    amount = body.get("amount_minor", 0)
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise ApiError(400, "invalid_field", "amount_minor: an integer >= 0")
    cursor = req.conn.execute(
        "INSERT OR IGNORE INTO interactions (customer_id, type, reference, store, amount_minor, at, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)", (cid, kind, reference, body.get("store"), amount, body.get("at") or now(), now()))
    segments = _recompute(req.conn, cid)
    return (201 if cursor.rowcount else 200), {"customer_id": cid, "type": kind, "reference": reference,
                                               "recorded": bool(cursor.rowcount), "segments": segments}


def list_interactions(req: Request) -> tuple[int, dict]:
    cid = req.params["customer_id"]
    _customer(req.conn, cid)
    rows = req.conn.execute("SELECT type, reference, store, amount_minor, at FROM interactions "
                            "WHERE customer_id = ? ORDER BY id", (cid,))
    return 200, {"interactions": [dict(r) for r in rows]}


ROUTES = [
    ("POST", "/customers/batch", put_customers, True),
    ("GET", "/changes", list_changes, False),
    ("PUT", "/customers/(?P<customer_id>[^/]+)", put_customer, True),
    ("GET", "/customers/(?P<customer_id>[^/]+)", get_customer, False),
    ("POST", "/customers/(?P<customer_id>[^/]+)/interactions", add_interaction, True),
    ("GET", "/customers/(?P<customer_id>[^/]+)/interactions", list_interactions, False),
]


def make_server(db_path: str, host: str = "127.0.0.1", port: int = 8092) -> JsonApiServer:
    return JsonApiServer((host, port), "crm", db_path, SCHEMA, ROUTES,
                         migrate=lambda conn: add_columns(conn, "customers", {"golden_id": "TEXT"}))
