"""The loyalty platform's HTTP API: routes and the rules behind them (see the package)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from ulid import ULID

from demo.json_api import (ApiError, JsonApiServer, Request, add_columns, list_changes, now, record_change,
                           require)

SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    card TEXT PRIMARY KEY, customer_id TEXT NOT NULL, tier TEXT NOT NULL, status TEXT NOT NULL,
    created TEXT NOT NULL, name TEXT, email TEXT, phone TEXT, household_id TEXT, reward_preference TEXT,
    consent_marketing_email INTEGER, consent_sms INTEGER, consent_data_sharing INTEGER, golden_id TEXT,
    updated TEXT);
CREATE TABLE IF NOT EXISTS ledger (
    txn_id TEXT PRIMARY KEY, card TEXT NOT NULL REFERENCES members(card), type TEXT NOT NULL,
    points INTEGER NOT NULL, reference TEXT NOT NULL, store TEXT, hold_id TEXT, created TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_card ON ledger (card);
CREATE INDEX IF NOT EXISTS ledger_reference ON ledger (reference);
CREATE TABLE IF NOT EXISTS holds (
    hold_id TEXT PRIMARY KEY, card TEXT NOT NULL REFERENCES members(card), points INTEGER NOT NULL,
    reference TEXT NOT NULL, store TEXT, status TEXT NOT NULL, expires_at TEXT NOT NULL,
    created TEXT NOT NULL, settled TEXT);
CREATE INDEX IF NOT EXISTS holds_card ON holds (card, status)
"""

TYPES = {"EARN": 1, "REFUND": 1, "REDEEM": -1, "EXPIRE": -1, "ADJUST": 0}  # sign; ADJUST is signed itself
TIERS = ("BASE", "SILVER", "GOLD")
# What a member holds about the customer besides card, tier and status: the till asks at enrolment,
# the customer hub keeps it in step (household and reward preferences are the programme's own).
PROFILE = {"name": str, "email": str, "phone": str, "household_id": str, "reward_preference": str,
           "consent_marketing_email": bool, "consent_sms": bool, "consent_data_sharing": bool, "golden_id": str}
NEW_COLUMNS = {**{f: "INTEGER" if kind is bool else "TEXT" for f, kind in PROFILE.items()}, "updated": "TEXT"}
MAX_BATCH = 500
DEFAULT_HOLD_TTL = 900
MAX_HOLD_TTL = 7 * 24 * 3600


def _member(conn, card: str):
    row = conn.execute("SELECT * FROM members WHERE card = ?", (card,)).fetchone()
    if row is None:
        raise ApiError(404, "unknown_member", f"card: no member with card {card}")
    return row


def balance(conn, card: str) -> dict:
    """Ledger points, points on live holds and what is left to spend."""
    ledger = conn.execute("SELECT COALESCE(SUM(points), 0) FROM ledger WHERE card = ?", (card,)).fetchone()[0]
    held = conn.execute("SELECT COALESCE(SUM(points), 0) FROM holds WHERE card = ? AND status = 'held' "
                        "AND expires_at > ?", (card, now())).fetchone()[0]
    return {"ledger_points": ledger, "held_points": held, "balance": ledger - held}


def _member_view(conn, row) -> dict:
    return {**_member_record(row), **balance(conn, row["card"])}


def _member_record(row) -> dict:
    """The member without its points: what a change of the member is."""
    return {"card": row["card"], "customer_id": row["customer_id"], "tier": row["tier"], "status": row["status"],
            **{f: (None if row[f] is None else bool(row[f])) if kind is bool else row[f]
               for f, kind in PROFILE.items()}}


def _profile(body: dict) -> dict:
    """The profile fields given in `body` as columns; 400 naming a field of the wrong type."""
    found = {}
    for field, kind in PROFILE.items():
        if field not in body:
            continue
        value = body[field]
        if value is not None and (not isinstance(value, kind) or (kind is str and not value.strip())):
            raise ApiError(400, "invalid_field", f"{field}: a {'boolean' if kind is bool else 'string'} or null")
        found[field] = int(value) if kind is bool and value is not None else value
    return found


def _change_member(conn, card: str, changes: dict, actor: str) -> dict:
    """Apply column `changes` to member `card`; noted in the change feed when something changed."""
    before = _member_record(_member(conn, card))
    if changes:
        assignments = ", ".join(f"{column} = :{column}" for column in changes)
        conn.execute(f"UPDATE members SET {assignments} WHERE card = :card", {**changes, "card": card})
    after = _member_record(_member(conn, card))
    if after != before:
        conn.execute("UPDATE members SET updated = ? WHERE card = ?", (now(), card))
        record_change(conn, card, actor, after)
    return after


def _hold_view(row) -> dict:
    status = row["status"]
    if status == "held" and row["expires_at"] <= now():
        status = "expired"
    return {"hold_id": row["hold_id"], "card": row["card"], "points": row["points"],
            "reference": row["reference"], "store": row["store"], "status": status,
            "expires_at": row["expires_at"], "settled": row["settled"]}


def _hold(conn, hold_id: str):
    row = conn.execute("SELECT * FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
    if row is None:
        raise ApiError(404, "unknown_hold", f"hold_id: no hold {hold_id}")
    return row


def _spendable(conn, card: str, points: int) -> None:
    member = _member(conn, card)
    if member["status"] != "ACTIVE":
        raise ApiError(403, "member_inactive", f"card: member {card} is {member['status']}")
    left = balance(conn, card)["balance"]
    if points > left:
        raise ApiError(422, "insufficient_points", f"points: {points} asked, {left} available on card {card}")


def _record(conn, card: str, kind: str, points: int, reference: str, store, hold_id=None) -> dict:
    txn = {"txn_id": str(ULID()), "card": card, "type": kind, "points": points, "reference": reference,
           "store": store, "hold_id": hold_id, "created": now()}
    conn.execute("INSERT INTO ledger (txn_id, card, type, points, reference, store, hold_id, created) "
                 "VALUES (:txn_id, :card, :type, :points, :reference, :store, :hold_id, :created)", txn)
    return txn


def create_member(req: Request) -> tuple[int, dict]:
    card, customer = require(req.body, "card", str), require(req.body, "customer_id", str)
    tier = req.body.get("tier", "BASE")
    if tier not in TIERS:
        raise ApiError(400, "invalid_field", f"tier: one of {', '.join(TIERS)}")
    if req.conn.execute("SELECT 1 FROM members WHERE card = ?", (card,)).fetchone():
        raise ApiError(409, "member_exists", f"card: {card} is enrolled already")
    profile = _profile(req.body)
    columns = ["card", "customer_id", "tier", "status", "created", "updated", *profile]
    req.conn.execute(f"INSERT INTO members ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     (card, customer, tier, "ACTIVE", now(), now(), *profile.values()))
    record_change(req.conn, card, req.actor, _member_record(_member(req.conn, card)))
    return 201, _member_view(req.conn, _member(req.conn, card))


def _update(conn, card: str, body: dict, actor: str) -> dict:
    row = _member(conn, card)
    tier, status = body.get("tier", row["tier"]), body.get("status", row["status"])
    if tier not in TIERS:
        raise ApiError(400, "invalid_field", f"tier: one of {', '.join(TIERS)}")
    if status not in ("ACTIVE", "BLOCKED"):
        raise ApiError(400, "invalid_field", "status: ACTIVE or BLOCKED")
    return _change_member(conn, card, {"tier": tier, "status": status, **_profile(body)}, actor)


def update_member(req: Request) -> tuple[int, dict]:
    _update(req.conn, req.params["card"], req.body, req.actor)
    return 200, _member_view(req.conn, _member(req.conn, req.params["card"]))


def update_members(req: Request) -> tuple[int, dict]:
    """Many members in one call and one transaction: {"members": [{"card", ...fields}]}; an
    unknown card is reported in its place, the others are written."""
    items = req.body.get("members")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH or not all(
            isinstance(i, dict) and isinstance(i.get("card"), str) and i["card"] for i in items):
        raise ApiError(400, "invalid_field", f"members: 1..{MAX_BATCH} objects each with a card")
    results = []
    for item in items:
        try:
            results.append(_update(req.conn, item["card"], {k: v for k, v in item.items() if k != "card"},
                                   req.actor))
        except ApiError as exc:
            if exc.code != "unknown_member":
                raise
            results.append({"card": item["card"], "error": exc.code})
    return 200, {"members": results}


def get_member(req: Request) -> tuple[int, dict]:
    return 200, _member_view(req.conn, _member(req.conn, req.params["card"]))


def list_transactions(req: Request) -> tuple[int, dict]:
    """By card (`/members/{card}/transactions`) or by reference / day (`/transactions?...`)."""
    where, args = [], []
    if "card" in req.params:
        _member(req.conn, req.params["card"])
        where.append("card = ?"), args.append(req.params["card"])
    if req.query.get("reference"):
        where.append("reference = ?"), args.append(req.query["reference"])
    if req.query.get("day"):
        where.append("substr(created, 1, 10) = ?"), args.append(req.query["day"])
    if not where:
        raise ApiError(400, "invalid_query", "query: card, reference or day required")
    rows = req.conn.execute(f"SELECT * FROM ledger WHERE {' AND '.join(where)} ORDER BY created, txn_id", args)
    return 200, {"transactions": [dict(r) for r in rows]}


def post_transaction(req: Request) -> tuple[int, dict]:
    body = req.body
    card, kind = require(body, "card", str), require(body, "type", str)
    reference, points = require(body, "reference", str), require(body, "points", int)
    if kind not in TYPES:
        raise ApiError(400, "invalid_field", f"type: one of {', '.join(TYPES)}")
    if points == 0 or (kind != "ADJUST" and points < 0):
        raise ApiError(400, "invalid_field", "points: > 0 (ADJUST: non-zero, signed)")
    signed = points if kind == "ADJUST" else TYPES[kind] * points
    if signed < 0:
        _spendable(req.conn, card, -signed)
    else:
        _member(req.conn, card)
    txn = _record(req.conn, card, kind, signed, reference, body.get("store"))
    return 201, {**txn, **balance(req.conn, card)}


def create_hold(req: Request) -> tuple[int, dict]:
    body = req.body
    card, points = require(body, "card", str), require(body, "points", int, positive=True)
    reference = require(body, "reference", str)
    ttl = body.get("ttl_seconds", DEFAULT_HOLD_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_HOLD_TTL:
        raise ApiError(400, "invalid_field", f"ttl_seconds: an integer within 1..{MAX_HOLD_TTL}")
    _spendable(req.conn, card, points)
    expires = (datetime.now(timezone.utc) + timedelta(seconds=ttl)).isoformat(timespec="microseconds")
    hold_id = str(ULID())
    req.conn.execute("INSERT INTO holds (hold_id, card, points, reference, store, status, expires_at, created) "
                     "VALUES (?, ?, ?, ?, ?, 'held', ?, ?)",
                     (hold_id, card, points, reference, body.get("store"), expires, now()))
    return 201, {**_hold_view(_hold(req.conn, hold_id)), **balance(req.conn, card)}


def get_hold(req: Request) -> tuple[int, dict]:
    return 200, _hold_view(_hold(req.conn, req.params["hold_id"]))


def capture_hold(req: Request) -> tuple[int, dict]:
    """REDEEM the held points, once; an expired or released hold cannot be captured."""
    view = _hold_view(_hold(req.conn, req.params["hold_id"]))
    if view["status"] == "captured":
        return 200, {**view, **balance(req.conn, view["card"])}
    if view["status"] != "held":
        raise ApiError(409, f"hold_{view['status']}", f"hold_id: {view['hold_id']} is {view['status']}")
    req.conn.execute("UPDATE holds SET status = 'captured', settled = ? WHERE hold_id = ?", (now(), view["hold_id"]))
    _record(req.conn, view["card"], "REDEEM", -view["points"], view["reference"], view["store"], view["hold_id"])
    return 200, {**_hold_view(_hold(req.conn, view["hold_id"])), **balance(req.conn, view["card"])}


def release_hold(req: Request) -> tuple[int, dict]:
    view = _hold_view(_hold(req.conn, req.params["hold_id"]))
    if view["status"] == "captured":
        raise ApiError(409, "hold_captured", f"hold_id: {view['hold_id']} is captured (refund it instead)")
    if view["status"] in ("held", "expired"):
        req.conn.execute("UPDATE holds SET status = 'released', settled = ? WHERE hold_id = ?",
                         (now(), view["hold_id"]))
    return 200, {**_hold_view(_hold(req.conn, view["hold_id"])), **balance(req.conn, view["card"])}


ROUTES = [  # method, path pattern, handler, is a write (Idempotency-Key required)
    ("POST", "/members", create_member, True),
    ("POST", "/members/batch", update_members, True),
    ("GET", "/changes", list_changes, False),
    ("GET", "/members/(?P<card>[^/]+)", get_member, False),
    ("PUT", "/members/(?P<card>[^/]+)", update_member, True),
    ("GET", "/members/(?P<card>[^/]+)/transactions", list_transactions, False),
    ("GET", "/transactions", list_transactions, False),
    ("POST", "/transactions", post_transaction, True),
    ("POST", "/holds", create_hold, True),
    ("GET", "/holds/(?P<hold_id>[^/]+)", get_hold, False),
    ("POST", "/holds/(?P<hold_id>[^/]+)/capture", capture_hold, True),
    ("POST", "/holds/(?P<hold_id>[^/]+)/release", release_hold, True),
]


def make_server(db_path: str, host: str = "127.0.0.1", port: int = 8091) -> JsonApiServer:
    return JsonApiServer((host, port), "loyalty-platform", db_path, SCHEMA, ROUTES,
                         migrate=lambda conn: add_columns(conn, "members", NEW_COLUMNS))
