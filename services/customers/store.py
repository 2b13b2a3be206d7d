"""The workspace of one mastering batch over the hub's tables (tables.py), in the worker's transaction.

It loads, in a few statements, what a batch of changes needs (the source
records they name, the golden records those belong to or share a key value
with, and those golden records' other records), keeps every object the batch
changes, and writes them back in a few statements (`save`): per statement
round trips would cap the hub far below a nightly file's pace. What the batch
did not load yet (a merge reaching a golden record no change named) is loaded
when asked for.

Mastering transactions run one at a time: SQLite's `BEGIN IMMEDIATE` takes
the write lock first; on PostgreSQL a transaction-scoped advisory lock does
(two transactions matching new records on one e-mail address must not each
create a golden record).
"""
from __future__ import annotations

from collections import defaultdict

import orjson
from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.engine import Connection

from legacy_wrappers.prepared import Prepared, run_together
from services.customers import matching
from services.customers.config import CustomersConfig
from services.customers.model import AttrState, Decided, Golden, Record, states_json
from services.customers.tables import CASES, GOLDEN, HISTORY, KEYS, RECORDS, SEQUENCE

CHUNK = 400          # values per IN list
ADVISORY_LOCK = 21_2100  # PostgreSQL: the customer hub's mastering lock
FIRST_GOLDEN = 1


def golden_name(number: int) -> str:
    return f"G{number:011d}"


def _chunks(items: list, size: int = CHUNK):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Workspace:
    def __init__(self, conn: Connection, config: CustomersConfig):
        self.conn, self.config = conn, config
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})
        self._records: dict[tuple[str, str], Record | None] = {}
        self._by_golden: dict[str, list[Record]] = {}
        self._goldens: dict[str, Golden] = {}
        self._key_hits: dict[tuple[str, str], set[str]] = {}
        self._keys_now: dict[str, matching.Keys] = {}       # goldens changed in this batch: their keys now
        self._overlay: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._stale: set[str] = set()                       # changed since their keys were taken
        self._touched_records: dict[tuple[str, str], Record] = {}
        self._touched_goldens: dict[str, Golden] = {}
        self._cases: dict[tuple[str, str], bool] = {}
        self._new_cases: list[dict] = []
        self._history: list[dict] = []
        self._next_number: int | None = None

    # ------------------------------------------------------------------ loading
    def preload(self, pairs: list[tuple[str, str]], key_pairs: list[tuple[str, str]]) -> None:
        """The records `pairs` name, the golden records sharing `key_pairs`, and theirs; and who
        else holds those golden records' key values (what a merge check after a change asks:
        asked one golden record at a time, those look-ups were a tenth of a nightly file's CPU)."""
        self._load_records([p for p in dict.fromkeys(pairs) if p not in self._records])
        self._query_keys(key_pairs)
        wanted = {r.golden_id for r in self._records.values() if r is not None}
        wanted |= {gid for hits in self._key_hits.values() for gid in hits}
        loaded = [g for g in wanted if g not in self._goldens]
        self._load_goldens(loaded)
        self._query_keys([pair for g in loaded for pair in _pairs(
            matching.golden_keys(self.config, self._goldens[g], self.records_of(self._goldens[g])))])

    def _load_records(self, pairs: list[tuple[str, str]]) -> None:
        for pair in pairs:
            self._records.setdefault(pair, None)
        for system, ids in _by_first(pairs).items():  # `SYSTEM = ? AND RECORD_ID IN (..)`: the primary key's order
            for chunk in _chunks(ids):
                for row in self.conn.execute(_RECORDS_BY_ID, {"system": system, "ids": chunk}):
                    self._records[(row.SYSTEM, row.RECORD_ID)] = _record(row)

    def _load_goldens(self, ids: list[str]) -> None:
        for chunk in _chunks(ids):
            for row in self.conn.execute(_GOLDENS, {"ids": chunk}):
                self._goldens[row.GOLDEN_ID] = _golden(row)
                self._by_golden.setdefault(row.GOLDEN_ID, [])
            for row in self.conn.execute(_RECORDS_OF_GOLDENS, {"ids": chunk}):
                pair = (row.SYSTEM, row.RECORD_ID)
                record = self._records.get(pair) or _record(row)
                self._records[pair] = record
                if record not in self._by_golden[row.GOLDEN_ID]:
                    self._by_golden[row.GOLDEN_ID].append(record)

    def _query_keys(self, pairs) -> None:
        fresh = [p for p in pairs if p not in self._key_hits]
        if not fresh:  # most often: the batch's key values were asked for when it was loaded
            return
        fresh = list(dict.fromkeys(fresh))
        for pair in fresh:
            self._key_hits[pair] = set()
        for name, values in _by_first(fresh).items():
            for chunk in _chunks(values):
                for row in self.conn.execute(_HOLDERS, {"name": name, "values": chunk}):
                    self._key_hits[(name, row.KEY_VALUE)].add(row.GOLDEN_ID)

    # ------------------------------------------------------------------ what Master asks
    def record(self, system: str, record_id: str) -> Record | None:
        pair = (system, record_id)
        if pair not in self._records:
            self._load_records([pair])
        return self._records[pair]

    def golden(self, golden_id: str) -> Golden:
        if golden_id not in self._goldens:
            self._load_goldens([golden_id])
        return self._goldens[golden_id]

    def records_of(self, golden: Golden) -> list[Record]:
        return self._by_golden.setdefault(golden.golden_id, [])

    def golden_keys(self, golden: Golden) -> matching.Keys:
        self._refresh()
        found = self._keys_now.get(golden.golden_id)
        if found is None:
            found = matching.golden_keys(self.config, golden, self.records_of(golden))
        return found

    def goldens_with(self, keys: matching.Keys) -> list[Golden]:
        """The active golden records holding any of `keys`' values, as they are now."""
        self._refresh()
        pairs = _pairs(keys)
        self._query_keys(pairs)
        ids = set()
        for pair in pairs:
            hits, overlay = self._key_hits[pair], self._overlay.get(pair)
            if hits:
                ids.update(g for g in hits if g not in self._keys_now)
            if overlay:
                ids |= overlay
        if not ids:  # a new customer's: asked once a record, so kept short
            return []
        self._load_goldens([g for g in ids if g not in self._goldens])
        return [self._goldens[g] for g in sorted(ids) if self._goldens[g].status == "active"]

    def new_golden(self, now: str) -> Golden:
        if self._next_number is None:
            self._next_number = self.conn.execute(select(SEQUENCE.c.NEXT_NO).where(
                SEQUENCE.c.NAME == "golden")).scalar() or FIRST_GOLDEN
        golden = Golden(golden_name(self._next_number), created=now, new=True)
        self._next_number += 1
        self._goldens[golden.golden_id] = golden
        self._by_golden[golden.golden_id] = []
        self.touch_golden(golden)
        return golden

    def add_record(self, record: Record) -> None:
        golden = self.golden(record.golden_id)
        self._records[(record.system, record.record_id)] = record
        self.records_of(golden).append(record)
        self.touch_record(record)
        known = self._keys_now.get(golden.golden_id)
        if record.attrs or known is None or golden.golden_id in self._stale:
            self.touch_golden(golden)
            return
        # a record the hub makes holds no values yet: the golden record's keys gain at most its
        # number (taking them all again, for every new customer's ERP account, was ~9 % of the hub)
        self._touched_goldens[golden.golden_id] = golden
        numbers = known.get(matching.CUSTOMER_NUMBER, set())
        if record.system in self.config.matching.customer_number and record.record_id not in numbers:
            self.keys_are(golden, {**known, matching.CUSTOMER_NUMBER: numbers | {record.record_id}})

    def move_record(self, record: Record, survivor: Golden) -> None:
        self._by_golden[record.golden_id].remove(record)
        record.golden_id = survivor.golden_id
        self.records_of(survivor).append(record)
        self.touch_record(record)
        self.touch_golden(survivor)

    def touch_record(self, record: Record) -> None:
        self._touched_records[(record.system, record.record_id)] = record

    def touch_golden(self, golden: Golden) -> None:
        """`golden` changed (values, records or status): its keys are taken again before the next look-up."""
        self._touched_goldens[golden.golden_id] = golden
        self._stale.add(golden.golden_id)

    def keys_are(self, golden: Golden, keys: matching.Keys) -> None:
        """`golden`'s keys are `keys` (a new golden record of one record has its record's): taken
        as they are, not computed again."""
        golden_id, overlay = golden.golden_id, self._overlay
        self._stale.discard(golden_id)
        for name, values in self._keys_now.get(golden_id, {}).items():
            for value in values:
                overlay[(name, value)].discard(golden_id)
        self._keys_now[golden_id] = keys
        for name, values in keys.items():
            for value in values:
                overlay[(name, value)].add(golden_id)

    def _refresh(self) -> None:
        """The keys of the golden records changed since they were last taken, in the index overlay."""
        if not self._stale:
            return
        for golden_id in self._stale:
            golden = self._goldens[golden_id]
            for pair in _pairs(self._keys_now.get(golden_id, {})):
                self._overlay[pair].discard(golden_id)
            keys = {} if golden.status != "active" else \
                matching.golden_keys(self.config, golden, self.records_of(golden))
            self._keys_now[golden_id] = keys
            for pair in _pairs(keys):
                self._overlay[pair].add(golden_id)
        self._stale.clear()

    def changed_goldens(self) -> list[Golden]:
        return list(self._touched_goldens.values())

    def has_case(self, a: str, b: str) -> bool:
        pair = tuple(sorted((a, b)))
        if pair not in self._cases:
            self._cases[pair] = self.conn.execute(select(CASES.c.CASE_ID).where(
                CASES.c.GOLDEN_A == pair[0], CASES.c.GOLDEN_B == pair[1])).first() is not None
        return self._cases[pair]

    def add_case(self, case_id: str, a: str, b: str, summary: str, now: str) -> None:
        self._cases[(a, b)] = True
        self._new_cases.append(dict(CASE_ID=case_id, GOLDEN_A=a, GOLDEN_B=b, DETAIL=summary[:2000], OPENED_AT=now))

    def add_history(self, golden_id: str, now: str, kind: str, origin: str, ref: str | None, detail: dict) -> None:
        self._history.append({"GOLDEN_ID": golden_id, "AT": now, "KIND": kind, "ORIGIN": origin, "RECORD": ref,
                              "EVENT_ID": None, "DETAIL_JSON": detail})  # written as JSON when saved

    # ------------------------------------------------------------------ saving
    def save(self, now: str) -> None:
        """Write back what the batch changed, in the worker's transaction (a statement per table
        and kind of change, each compiled once: `Prepared`)."""
        self._refresh()
        dumps = orjson.dumps
        records = list(self._touched_records.values())
        rows = [{"SYSTEM": r.system, "RECORD_ID": r.record_id, "GOLDEN_ID": r.golden_id, "UPDATED_AT": now,
                 "STATE_JSON": dumps(states_json(r.attrs)).decode()} for r in records]
        goldens = list(self._touched_goldens.values())
        golden_rows = [{"GOLDEN_ID": g.golden_id, "VERSION": g.version, "STATUS": g.status, "SURVIVOR": g.survivor,
                        "VALUES_JSON": dumps({a: d.to_json() for a, d in g.values.items()}).decode(),
                        "CREATED_AT": g.created or now, "UPDATED_AT": now} for g in goldens]
        old = [{"g": g.golden_id} for g in goldens if not g.new]  # a new one has no keys to take away yet
        keys = [{"KEY_NAME": name, "KEY_VALUE": value[:254], "GOLDEN_ID": g.golden_id} for g in goldens
                for name, value in _pairs(self._keys_now.get(g.golden_id, {}))]
        run_together(self.conn, [
            (_INSERT[RECORDS], [row for r, row in zip(records, rows) if r.new]),
            (_INSERT[GOLDEN], [row for g, row in zip(goldens, golden_rows) if g.new]),
            (_INSERT[HISTORY], [{**h, "DETAIL_JSON": dumps(h["DETAIL_JSON"]).decode()} for h in self._history]),
            (_INSERT[CASES], self._new_cases)])
        for prepared, changed in (
                (_UPDATE_RECORD, _keyed([row for r, row in zip(records, rows) if not r.new], ("SYSTEM", "RECORD_ID"))),
                (_UPDATE_GOLDEN, _keyed([row for g, row in zip(goldens, golden_rows) if not g.new], ("GOLDEN_ID",))),
                (_DELETE_KEYS, old)):
            if changed:
                prepared(self.conn, changed)
        if keys:
            _INSERT[KEYS](self.conn, keys)
        if self._next_number is not None:
            done = self.conn.execute(update(SEQUENCE).where(SEQUENCE.c.NAME == "golden").values(
                NEXT_NO=self._next_number)).rowcount
            if not done:
                self.conn.execute(insert(SEQUENCE).values(NAME="golden", NEXT_NO=self._next_number))
        for record in records:
            record.new = False
        for golden in goldens:
            golden.new = False


def _update(table, key: tuple[str, ...]) -> Prepared:
    """UPDATE of every other column of a row by its key (the key as `k_<column>`): the rows'
    dicts carry every column (`_keyed`)."""
    return Prepared(update(table).where(*[table.c[k] == bindparam(f"k_{k}") for k in key]).values(
        {c.name: bindparam(c.name) for c in table.columns if c.name not in key}))


def _keyed(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    return [{**{c: v for c, v in row.items() if c not in key}, **{f"k_{k}": row[k] for k in key}} for row in rows]


_INSERT = {table: Prepared(insert(table)) for table in (RECORDS, GOLDEN, KEYS, HISTORY, CASES)}
# the look-ups, built once: an IN list of literal values is coerced value by value each time (~1
# us a value, thousands of values a chunk of the nightly file); an expanding parameter is not
_RECORDS_BY_ID = select(RECORDS).where(RECORDS.c.SYSTEM == bindparam("system"),
                                       RECORDS.c.RECORD_ID.in_(bindparam("ids", expanding=True)))
_GOLDENS = select(GOLDEN).where(GOLDEN.c.GOLDEN_ID.in_(bindparam("ids", expanding=True)))
_RECORDS_OF_GOLDENS = select(RECORDS).where(RECORDS.c.GOLDEN_ID.in_(bindparam("ids", expanding=True)))
_HOLDERS = select(KEYS.c.KEY_VALUE, KEYS.c.GOLDEN_ID).where(KEYS.c.KEY_NAME == bindparam("name"),
                                                            KEYS.c.KEY_VALUE.in_(bindparam("values", expanding=True)))
_UPDATE_RECORD = _update(RECORDS, ("SYSTEM", "RECORD_ID"))
_UPDATE_GOLDEN = _update(GOLDEN, ("GOLDEN_ID",))
_DELETE_KEYS = Prepared(delete(KEYS).where(KEYS.c.GOLDEN_ID == bindparam("g")))


def _by_first(pairs) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for first, second in pairs:
        grouped[first].append(second)
    return grouped


def _pairs(keys: matching.Keys):
    return [(name, value) for name, values in keys.items() for value in values]


def _record(row) -> Record:
    state = orjson.loads(row.STATE_JSON)
    return Record(row.SYSTEM, row.RECORD_ID, row.GOLDEN_ID, {a: AttrState.from_json(s) for a, s in state.items()})


def _golden(row) -> Golden:
    values = {a: Decided(*d) for a, d in orjson.loads(row.VALUES_JSON).items()}
    return Golden(row.GOLDEN_ID, row.VERSION, row.STATUS, row.SURVIVOR, values, row.CREATED_AT)
