"""Mastering a batch of statements: link each to a golden record, decide, merge, tell the systems.

A statement is one system's record after a change (`customer.updated.v2`, a
row of the CRM's nightly file). In the batch's order, each is:

1. taken into its source record: an attribute whose value the record holds
   already is no change (an echo of the hub's own write, a repeat) and is
   dropped here, so it is never re-applied nor re-emitted;
2. linked, if the record is new to the hub, to the golden record it matches
   (matching.py): a match links it, an uncertain match opens a steward case
   and gives it a golden record of its own, no match a new golden record;
3. decided: the golden attributes it touched are decided again from every
   linked record (survivorship.py), each change written to the history;
4. checked against other golden records sharing a key value: a match merges
   the younger into the older (`customer.merged.v1`), an uncertain one opens
   a case instead (`case.opened.v1`; one per pair, and a pair with a case is
   never merged automatically).

Then, for every golden record changed, each system's records are written the
attributes it consumes where they do not hold the golden value yet (what the
hub knows they hold: their own word or its earlier write), plus the golden id
(`customer.mastered.v1`), and systems that `create` get a record they lack.

The workspace (store.py) loads what a batch needs and keeps what changed; this
module decides, and never touches the database itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prometheus_client import Counter

from contracts.customer import ATTRIBUTES, CONSENTS
from services.customers import matching, survivorship
from services.customers.config import CustomersConfig
from services.customers.model import HUB, AttrState, Golden, Record, Said

GOLDEN_ID = "golden_id"  # a record's golden id, held like an attribute (only ever written by the hub)

MERGES = Counter("retailbus_customer_merges_total", "Golden records merged into another (customer.merged.v1)")
CASES = Counter("retailbus_customer_steward_cases_total", "Uncertain matches given to data stewards (case.opened.v1)")
CONFLICTS = Counter("retailbus_customer_conflicts_total",
                    "Values a system said that the survivorship rules overruled, by attribute", ["attribute"])
for _attribute in ATTRIBUTES:  # every attribute's series from the start: a dashboard shows 0, not "no data"
    CONFLICTS.labels(_attribute)
STATEMENTS = Counter("retailbus_customer_statements_total",
                     "Records' changes taken by the hub, by origin and outcome (changed: at least one attribute "
                     "new to the hub; unchanged: all held already, e.g. an echo of the hub's own write)",
                     ["origin", "outcome"])
WRITES = Counter("retailbus_customer_writes_total", "Record writes sent to a system (customer.mastered.v1)",
                 ["system"])


class Statement(NamedTuple):  # a tuple: made once a row of the nightly file (a frozen dataclass: 3x the time)
    system: str
    origin: str
    record_id: str
    at: str                      # the system's time of the change (model.stamp)
    values: dict[str, Any]       # the attributes the record holds
    key: str                     # the statement's idempotency key (for the journal)


@dataclass
class Write:
    system: str
    record_id: str
    golden_id: str
    origin: str
    create: bool
    write_golden_id: bool
    values: dict[str, Any]


@dataclass
class Outcome:
    """What a batch did, for the service to publish and journal."""

    writes: list[Write] = field(default_factory=list)
    merges: list[dict] = field(default_factory=list)       # survivor, retired, matched_on, origin
    consents: list[dict] = field(default_factory=list)     # golden_id, consent, granted, origin, source_record, at
    cases: list[dict] = field(default_factory=list)        # case_id, golden_a, golden_b, agree, conflict, summary
    traced: list[dict] = field(default_factory=list)       # journal items: key, refs


class Master:
    """One batch's decisions over a workspace (store.Workspace)."""

    def __init__(self, config: CustomersConfig, workspace, now: str):
        self.config, self.ws, self.now = config, workspace, now
        self.out = Outcome()
        self._cause: dict[str, str] = {}  # golden id -> origin of its latest change (for its writes)
        self._created: set[str] = set()   # refs of the records this batch creates in their systems
        self._fresh: dict[str, dict] = {}  # golden records this batch created -> their history entry
        self._keys: matching.Keys = {}     # the keys of the record `_link` matched last
        self._statements: dict[tuple[str, str], int] = {}  # (origin, outcome) -> statements, counted at the end
        self._writes: dict[str, int] = {}                   # system -> writes, likewise

    # ------------------------------------------------------------------ statements
    def take(self, statement: Statement, keys: matching.Keys) -> None:
        """`keys`: the key values of the statement's values (matching.value_keys): a new record's."""
        record = self.ws.record(statement.system, statement.record_id)
        new = record is None
        if new:
            record = Record(statement.system, statement.record_id, golden_id="", new=True)
        changed = _absorb(record, statement)
        counted = (statement.origin, "changed" if changed or new else "unchanged")
        self._statements[counted] = self._statements.get(counted, 0) + 1
        entry = None
        if new:
            golden, entry = self._link(record, statement, keys)
            changed = list(record.attrs)
        else:
            golden = self.ws.golden(record.golden_id)
            if changed:
                self.ws.touch_record(record)
        if changed:
            self._decide(golden, changed, statement.origin, record.ref, entry)
            if len(self.ws.records_of(golden)) > 1:  # one record cannot disagree, nor match another than by link
                self._conflicts(golden, record, changed)
                self._merge_check(golden, statement.origin)
            elif entry is None or entry.get("cases"):
                self._merge_check(golden, statement.origin)
            else:  # a new golden record of this one record: its keys are the record's, matched on already
                self.ws.keys_are(golden, self._keys)
        self.out.traced.append({"key": statement.key, "refs": [statement.record_id, self._active(golden).golden_id]})

    def _link(self, record: Record, statement: Statement, keys: matching.Keys) -> tuple[Golden, dict | None]:
        """The golden record a new record belongs to; and, if it is a new one, its history entry
        (the rest of the batch adds to it: its values, the records made for it)."""
        self._keys = keys  # a new record holds the statement's values: its keys are theirs
        agreeing = {g.golden_id: (g, v) for g in self.ws.goldens_with(keys)
                    for v in [matching.evaluate(self.config, keys, self.ws.golden_keys(g))] if v.kind != "none"}
        if agreeing and all(v.kind == "match" for _, v in agreeing.values()):
            golden, verdict = agreeing[min(agreeing)]  # the oldest; the others merge into it below
            record.golden_id = golden.golden_id
            self.ws.add_record(record)
            self._history(golden, "linked", statement.origin, record.ref, {"matched_on": list(verdict.agree)})
            return golden, None
        golden = self.ws.new_golden(self.now)
        record.golden_id = golden.golden_id
        self.ws.add_record(record)
        entry = self._fresh[golden.golden_id] = self._history(golden, "created", statement.origin, record.ref, {})
        for other, verdict in agreeing.values():  # any doubt: nothing is merged, a steward decides
            self._open_case(other, golden, verdict)
            entry.setdefault("cases", []).append(other.golden_id)
        return golden, entry

    # ------------------------------------------------------------------ deciding
    def _decide(self, golden: Golden, attributes, origin: str, ref: str | None, entry: dict | None = None) -> None:
        """Decide `attributes` again; their changes go to the history (into `entry`, a new golden
        record's own, when given)."""
        records = self.ws.records_of(golden)
        if entry is not None:  # a new golden record: every value is its first, no change to tell
            self._first(golden, attributes, records, entry)
            self._cause[golden.golden_id] = origin
            self.ws.touch_golden(golden)
            return
        changes = {}
        for attribute in attributes:
            before = golden.values.get(attribute)
            after = survivorship.decide(self.config, attribute, records)
            if after is None or (before is not None and before.to_json() == after.to_json()):
                continue
            golden.values[attribute] = after
            if before is None or before.value != after.value:
                changes[attribute] = {"from": None if before is None else before.value, "to": after.value,
                                      "rule": after.rule, "source": after.record, "at": after.at}
                if attribute in CONSENTS and before is not None:  # a consent first recorded is no change
                    self.out.consents.append({"golden_id": golden.golden_id, "consent": attribute[8:],
                                              "granted": after.value, "origin": after.origin,
                                              "source_record": after.record, "at": after.at})
        if changes or golden.new:
            golden.version += 1
        if changes:
            self._history(golden, "changed", origin, ref, changes)
        self._cause[golden.golden_id] = origin
        self.ws.touch_golden(golden)

    def _first(self, golden: Golden, attributes, records: list[Record], entry: dict) -> None:
        """A new golden record's values; its history entry keeps them, in short."""
        values = {}
        for attribute in attributes:
            after = survivorship.decide(self.config, attribute, records)
            if after is not None:
                golden.values[attribute] = values[attribute] = after
        golden.version += 1
        if values:
            entry["values"] = {a: d.value for a, d in values.items()}

    def _conflicts(self, golden: Golden, record: Record, attributes) -> None:
        """A value this record said that the rules overruled, counted per attribute."""
        for attribute in attributes:
            said = record.filled(attribute)
            if said is not None and golden.value(attribute) != said:
                _counted(CONFLICTS, attribute).inc()

    # ------------------------------------------------------------------ merging
    def _merge_check(self, golden: Golden, origin: str) -> None:
        while golden.status == "active":
            keys = self.ws.golden_keys(golden)
            others = sorted((g for g in self.ws.goldens_with(keys) if g.golden_id != golden.golden_id),
                            key=lambda g: g.golden_id)
            merged = None
            for other in others:
                if self.ws.has_case(golden.golden_id, other.golden_id):
                    continue
                verdict = matching.evaluate(self.config, keys, self.ws.golden_keys(other))
                if verdict.kind == "match":
                    merged = self._merge(golden, other, verdict, origin)
                    break
                if verdict.kind == "uncertain":
                    self._open_case(other, golden, verdict)
            if merged is None:
                return
            golden = merged  # the survivor may now match others

    def _merge(self, a: Golden, b: Golden, verdict: matching.Verdict, origin: str) -> Golden:
        survivor, retired = (a, b) if a.golden_id < b.golden_id else (b, a)
        for record in list(self.ws.records_of(retired)):
            self.ws.move_record(record, survivor)
        retired.status, retired.survivor = "retired", survivor.golden_id
        retired.version += 1
        survivor.version = max(survivor.version, retired.version)
        self.ws.touch_golden(retired)
        self._history(retired, "retired", origin, None, {"survivor": survivor.golden_id,
                                                         "matched_on": list(verdict.agree)})
        self._history(survivor, "merged", origin, None, {"retired": retired.golden_id,
                                                         "matched_on": list(verdict.agree)})
        self._decide(survivor, ATTRIBUTES, origin, None)
        self.out.merges.append({"survivor": survivor.golden_id, "retired": retired.golden_id,
                                "matched_on": list(verdict.agree), "origin": origin})
        MERGES.inc()
        return survivor

    def _open_case(self, a: Golden, b: Golden, verdict: matching.Verdict) -> None:
        first, second = sorted((a.golden_id, b.golden_id))
        if self.ws.has_case(first, second):
            return
        case_id = f"customer_match:{first}:{second}"
        summary = (f"golden records {first} and {second} agree on {', '.join(verdict.agree)} but differ on "
                   f"{', '.join(verdict.conflict) or 'nothing'}: one customer or two? Nothing was merged.")
        self.ws.add_case(case_id, first, second, summary, self.now)
        for golden in (a, b):
            self._history(golden, "case", "customers", None, {"case_id": case_id, "agree": list(verdict.agree),
                                                              "conflict": list(verdict.conflict)})
        self.out.cases.append({"case_id": case_id, "golden_a": first, "golden_b": second, "summary": summary})
        CASES.inc()

    def _active(self, golden: Golden) -> Golden:
        while golden.status == "retired":
            golden = self.ws.golden(golden.survivor)
        return golden

    def _history(self, golden: Golden, kind: str, origin: str, ref: str | None, detail: dict) -> dict:
        """Note an entry in the golden record's history; its detail (kept until the batch is saved)."""
        self.ws.add_history(golden.golden_id, self.now, kind, origin, ref, detail)
        return detail

    # ------------------------------------------------------------------ propagation
    def finish(self) -> Outcome:
        """The writes each system's records need after the batch (one per record, the final state)."""
        for golden in self.ws.changed_goldens():
            if golden.status != "active":
                continue
            origin = self._cause.get(golden.golden_id, "customers")
            records = self.ws.records_of(golden)
            for system, spec in self.config.systems.items():
                mine = [r for r in records if r.system == system]
                if not mine and spec.create:
                    mine = [self._create(golden, system, records)]
                for record in mine:
                    self._write(golden, record, spec, origin)
        for labels, count in self._statements.items():  # once a batch: a metric's lock taken per row cost ~2 %
            _counted(STATEMENTS, *labels).inc(count)
        for system, count in self._writes.items():
            _counted(WRITES, system).inc(count)
        return self.out

    def _create(self, golden: Golden, system: str, records: list[Record]) -> Record:
        """A record for a system that creates them: keyed by the customer's number, else its golden id."""
        numbers = sorted(r.record_id for r in records if r.system in self.config.matching.customer_number)
        record_id = next((n for n in numbers if self.ws.record(system, n) is None), golden.golden_id)
        record = Record(system, record_id, golden.golden_id, new=True)
        self.ws.add_record(record)
        self._created.add(record.ref)
        if golden.golden_id in self._fresh:
            self._fresh[golden.golden_id].setdefault("created_in", []).append(record.ref)
        else:
            self._history(golden, "linked", "customers", record.ref, {"created": True})
        return record

    def _write(self, golden: Golden, record: Record, spec, origin: str) -> None:
        """The attributes `record` consumes that it does not hold as the golden record has them."""
        decided = golden.values
        wanted = [(a, decided[a].value if a in decided else None) for a in spec.consumes]
        if spec.golden_id:
            wanted.append((GOLDEN_ID, golden.golden_id))
        attrs, values = record.attrs, {}
        for attribute, want in wanted:
            state = attrs.get(attribute)
            if state is None:
                if want is None:
                    continue
                attrs[attribute] = AttrState(Said(want, self.now, HUB))
            else:
                held = state.held
                if (want is None) if held is None else (held.value == want):
                    continue
                state.held = Said(want, self.now, HUB)
            values[attribute] = want
        if not values:
            return
        self.ws.touch_record(record)
        golden_id = values.pop(GOLDEN_ID, None)
        self.out.writes.append(Write(record.system, record.record_id, golden.golden_id, origin,
                                     record.ref in self._created, golden_id is not None, values))
        self._writes[record.system] = self._writes.get(record.system, 0) + 1


_CHILDREN: dict = {}


def _counted(metric, *labels):
    """`metric.labels(*labels)`, kept: taking a labelled child costs more than counting with it."""
    child = _CHILDREN.get((metric, labels))
    if child is None:
        child = _CHILDREN[(metric, labels)] = metric.labels(*labels)
    return child


def _absorb(record: Record, statement: Statement) -> list[str]:
    """Take the statement's values into the record; the attributes that changed (new to the hub)."""
    changed = []
    attrs, at, origin = record.attrs, statement.at, statement.origin
    for attribute, value in statement.values.items():
        state = attrs.get(attribute)
        if state is None:  # first said: held, latest and filled (unless empty) at once
            said = Said(value, at, origin)
            attrs[attribute] = AttrState(said, said, None if value is None else said)
            changed.append(attribute)
            continue
        if state.held is not None and state.held.value == value:
            continue
        said = Said(value, statement.at, statement.origin)
        if state.latest is None or statement.at >= state.latest.at:
            state.latest = said
        if value is not None and (state.filled is None or statement.at >= state.filled.at):
            state.filled = said
        if state.held is None or statement.at >= state.held.at:
            state.held = said
        changed.append(attribute)
    return changed

