"""The customer hub's unit of work on a real SQLite file, without a broker: linking, deciding,
merging once, steward cases, echoes recognised, consent that stays withdrawn, writes per system."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import orjson
import pytest
from sqlalchemy import create_engine, text

from contracts.envelope import CloudEvent
from legacy_wrappers import inbox
from services.customers import hub, matching, tables
from services.customers.config import load
from services.customers.mastering import Statement
from services.customers.store import Workspace
from services.erp.outbox import metadata as outbox_tables

pytestmark = pytest.mark.unit

CONFIG = load(Path(__file__).parents[2] / "config" / "customers.yaml")


class Hub:
    """The hub's tables in a database (`where`: a SQLite file, or a DSN), mastered as the service does."""

    def __init__(self, where: Path | str):
        self.engine = create_engine(where if isinstance(where, str) else f"sqlite:///{where}")
        for metadata in (tables.metadata, inbox.metadata, outbox_tables):
            metadata.create_all(self.engine)
        self.keys = 0

    def master(self, *statements: Statement):
        with self.engine.begin() as conn:
            return hub.master(conn, CONFIG, [(s, "01J0TEST") for s in statements])[0]

    def rows(self, sql: str, **args) -> list:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), args).all()

    def golden(self, record: str) -> dict:
        """{attribute: value} of the golden record `<system>:<id>` belongs to."""
        system, record_id = record.split(":")
        [(values,)] = self.rows('SELECT g."VALUES_JSON" FROM "CUS_GOLDEN" g JOIN "CUS_RECORD" r USING ("GOLDEN_ID") '
                                'WHERE r."SYSTEM" = :s AND r."RECORD_ID" = :r', s=system, r=record_id)
        return {a: v[0] for a, v in orjson.loads(values).items()}

    def golden_id(self, record: str) -> str:
        system, record_id = record.split(":")
        return self.rows('SELECT "GOLDEN_ID" FROM "CUS_RECORD" WHERE "SYSTEM" = :s AND "RECORD_ID" = :r',
                         s=system, r=record_id)[0][0]

    def events(self) -> list[str]:
        """The types of the events queued; each one's data is its contract's (assembled ones too)."""
        bodies = [r[0] for r in self.rows('SELECT "BODY" FROM "RB_OUTBOX" ORDER BY "ID"')]
        return [type(CloudEvent.from_json(body).payload()).TYPE for body in bodies]


@pytest.fixture
def customers(tmp_path):
    return Hub(tmp_path / "customers.db")


def said(origin: str, record_id: str, day: int, key: str | None = None, **values) -> Statement:
    system = CONFIG.origins[origin]
    what = f"{origin}:{record_id}:{day}:{sorted(values.items())}"
    return Statement(system, origin, record_id, f"2026-12-{day:02d}T10:00:00.000000Z", values,
                     key or hashlib.sha256(what.encode()).hexdigest())


def writes(outcome, system: str) -> dict:
    return {w.record_id: {**w.values, **({"golden_id": w.golden_id} if w.write_golden_id else {})}
            for w in outcome.writes if w.system == system}


def test_a_file_row_makes_a_golden_record_and_the_erp_an_account(customers):
    """(and the events queued are their contracts': Hub.events parses each)"""
    out = customers.master(said("crm_file", "C1", 1, name="Ada", email="ada@x.org", phone=None,
                                loyalty_card="L1", consent_sms=True))
    golden = customers.golden_id("crm:C1")
    assert golden == "G00000000001"
    assert writes(out, "crm") == {"C1": {"golden_id": golden}}  # the CRM holds its own values already
    assert writes(out, "erp") == {"C1": {"name": "Ada", "email": "ada@x.org", "loyalty_card": "L1",
                                         "consent_sms": True, "golden_id": golden}}
    assert [w.create for w in out.writes if w.system == "erp"] == [True]
    assert writes(out, "loyalty") == {}  # no member: the platform enrols at the till only
    assert customers.golden_id("erp:C1") == golden
    assert customers.events() == ["customer.mastered.v1"] * 2  # one per system, each routed to it alone:
    assert sorted(customers.rows('SELECT "TYPE" FROM "RB_OUTBOX"')) == [("customer.mastered.v1.crm",),
                                                                         ("customer.mastered.v1.erp",)]


def test_a_systems_own_change_coming_back_is_no_change(customers):
    customers.master(said("crm_file", "C1", 1, name="Ada", email="ada@x.org", consent_sms=True))
    # the ERP reports the account the hub wrote (an echo): nothing new, nothing sent
    out = customers.master(said("erp", "C1", 2, name="Ada", email="ada@x.org", phone=None, consent_sms=True))
    assert out.writes == [] and out.consents == []
    # the CRM edits by its API, and the nightly file repeats it later: one change, sent once
    edit = customers.master(said("crm", "C1", 3, name="Ada Lovelace", email="ada@x.org", consent_sms=True))
    assert writes(edit, "erp") == {"C1": {"name": "Ada Lovelace"}} and writes(edit, "crm") == {}
    again = customers.master(said("crm_file", "C1", 3, name="Ada Lovelace", email="ada@x.org", consent_sms=True))
    assert again.writes == []
    # the same statement delivered twice is taken once (the inbox)
    first = said("erp", "C1", 4, tax_id="DE1")
    assert writes(customers.master(first), "erp") == {}  # the ERP's own value: not sent back to it
    with customers.engine.begin() as conn:
        assert hub.master(conn, CONFIG, [(first, "01J0AGAIN")])[1] == [False]
    assert customers.golden("crm:C1")["tax_id"] == "DE1"


def test_the_hubs_own_write_coming_back_in_the_owners_file_does_not_become_the_owners_word(customers):
    """The CRM (owner of phone) holds none; the ERP's phone wins and is written to the CRM. The
    next nightly file repeats it as the CRM's: still the ERP's value, so when the ERP changes it
    the new one wins everywhere (an echo taken as the owner's word would pin the old one)."""
    customers.master(said("crm_file", "C1", 1, name="Ada", phone=None))
    out = customers.master(said("erp", "C1", 2, name="Ada", phone="+44 1"))
    assert writes(out, "crm") == {"C1": {"phone": "+44 1"}}
    assert customers.master(said("crm_file", "C1", 3, name="Ada", phone="+44 1")).writes == []
    out = customers.master(said("erp", "C1", 4, name="Ada", phone="+44 2"))
    assert writes(out, "crm") == {"C1": {"phone": "+44 2"}} and writes(out, "erp") == {}
    assert customers.golden("crm:C1")["phone"] == "+44 2"


def test_a_change_goes_to_each_system_only_for_what_it_consumes(customers):
    customers.master(said("crm_file", "C1", 1, name="Ada", email="ada@x.org", loyalty_card="L1"),
                     said("loyalty", "L1", 1, loyalty_card="L1", email="ada@x.org"))
    out = customers.master(said("erp", "C1", 2, tax_id="DE1", billing_address="1 Main St"),
                           said("loyalty", "L1", 2, loyalty_card="L1", email="ada@x.org", household_id="H7"))
    assert writes(out, "crm") == {}                       # consumes neither billing, tax nor households
    assert writes(out, "loyalty") == {"L1": {"name": "Ada"}} or writes(out, "loyalty") == {}
    assert "household_id" not in writes(out, "erp").get("C1", {})
    assert customers.golden("loyalty:L1")["household_id"] == "H7"


def test_one_person_with_two_cards_is_merged_once_and_every_system_learns_the_survivor(customers):
    customers.master(said("crm_file", "C1", 1, name="Ada", email="ada@x.org", loyalty_card="L1"))
    customers.master(said("loyalty", "L2", 1, loyalty_card="L2", phone="+44 1"))  # no email yet: on its own
    survivor, retired = customers.golden_id("crm:C1"), customers.golden_id("loyalty:L2")
    assert survivor != retired
    out = customers.master(said("loyalty", "L2", 2, loyalty_card="L2", phone="+44 1", email="ADA@x.org"))
    assert out.merges == [{"survivor": survivor, "retired": retired, "matched_on": ["email"], "origin": "loyalty"}]
    assert customers.golden_id("loyalty:L2") == survivor and customers.golden_id(f"erp:{retired}") == survivor
    assert writes(out, "loyalty")["L2"]["golden_id"] == survivor
    assert writes(out, "erp")[retired]["golden_id"] == survivor and writes(out, "erp")["C1"]["phone"] == "+44 1"
    assert customers.rows('SELECT "STATUS", "SURVIVOR" FROM "CUS_GOLDEN" WHERE "GOLDEN_ID" = :g', g=retired) == [
        ("retired", survivor)]
    # the same evidence again, and more of it: no second merge
    for day in (3, 4):
        again = customers.master(said("loyalty", "L2", day, loyalty_card="L2", phone="+44 1", email="ada@x.org",
                                      household_id=f"H{day}"),
                                 said("crm", "C1", day, name="Ada", email="ada@x.org"))
        assert again.merges == []
    assert customers.events().count("customer.merged.v1") == 1


def test_an_uncertain_match_opens_one_case_and_merges_nothing(customers):
    customers.master(said("crm_file", "C1", 1, name="Ada", email="ada@x.org", phone="+44 1"))
    out = customers.master(said("crm_file", "C9", 1, name="Ada L", email="ada@x.org", phone="+44 2"))
    assert out.merges == [] and [c["case_id"] for c in out.cases] == ["customer_match:G00000000001:G00000000002"]
    assert customers.golden_id("crm:C9") != customers.golden_id("crm:C1")
    assert "agree on email but differ on phone" in out.cases[0]["summary"]
    again = customers.master(said("crm", "C9", 2, name="Ada L", email="ada@x.org", phone="+44 2", consent_sms=True))
    assert again.cases == [] and again.merges == []
    assert customers.events().count("case.opened.v1") == 1
    assert customers.rows('SELECT count(*) FROM "CUS_GOLDEN" WHERE "STATUS" = \'active\'') == [(2,)]


def test_a_withdrawn_consent_is_not_granted_again_by_an_older_row(customers):
    customers.master(said("crm_file", "C1", 1, name="Ada", loyalty_card="L1", consent_marketing_email=True))
    out = customers.master(said("crm", "C1", 5, name="Ada", consent_marketing_email=False))
    assert [(c["consent"], c["granted"]) for c in out.consents] == [("marketing_email", False)]
    assert writes(out, "erp") == {"C1": {"consent_marketing_email": False}}
    late = customers.master(said("crm_file", "C1", 3, name="Ada", consent_marketing_email=True),
                            said("loyalty", "L1", 9, loyalty_card="L1", consent_marketing_email=True))
    assert late.consents == [] and customers.golden("crm:C1")["consent_marketing_email"] is False
    assert customers.golden_id("loyalty:L1") == customers.golden_id("crm:C1")  # the member's card: one customer
    assert writes(late, "loyalty")["L1"]["consent_marketing_email"] is False  # the member is told, not asked


def test_any_order_of_the_same_changes_gives_the_same_golden_records(tmp_path):
    rng = random.Random(21)
    changes = []
    for n in range(1, 61):
        c, card = f"C{n:04d}", f"L{n:04d}"
        changes += [said("crm_file", c, 1, name=f"N{n}", email=f"c{n}@x.org", loyalty_card=card, consent_sms=True),
                    said("crm", c, rng.randint(2, 9), name=f"N{n} b", email=f"c{n}@x.org", consent_sms=False),
                    said("erp", c, rng.randint(2, 9), name=f"N{n} erp", phone=f"+1{n}", tax_id=f"T{n}"),
                    said("loyalty", card, rng.randint(2, 9), loyalty_card=card, email=f"C{n}@X.org",
                         reward_preference="points")]
    results = []
    for attempt in range(3):
        shuffled = changes[:]
        random.Random(attempt).shuffle(shuffled)
        customers = Hub(tmp_path / f"hub{attempt}.db")
        for start in range(0, len(shuffled), 37):
            customers.master(*shuffled[start:start + 37])
        results.append({r: customers.golden(f"crm:{r}") for r in (f"C{n:04d}" for n in range(1, 61))})
        assert customers.rows('SELECT count(*) FROM "CUS_GOLDEN" WHERE "STATUS" = \'active\'') == [(60,)]
    assert results[0] == results[1] == results[2]
    assert results[0]["C0007"]["consent_sms"] is False and results[0]["C0007"]["tax_id"] == "T7"


def test_the_matching_index_holds_each_golden_records_keys_as_its_records_give_them(customers):
    """CUS_KEY, kept up as batches go (a new customer's keys taken from its record, an account
    the hub makes adding only its number), equals the keys taken afresh from what is stored,
    after each batch: members (their ERP accounts keyed by golden id), the file, ERP changes
    (one before its customer's row: a golden record of its own until the row merges it)."""
    rng = random.Random(7)
    batches = [[said("loyalty", f"L{n}", 1, loyalty_card=f"L{n}", email=f"c{n}@x.org") for n in range(0, 40, 3)]]
    rows = [said("crm_file", f"C{n}", 2, name=f"N{n}", email=f"c{n}@x.org", phone=f"+1 {n}" if n % 4 else None,
                 loyalty_card=f"L{n}" if n % 2 else None, consent_sms=True) for n in range(40)]
    rows += [said("erp", f"C{n}", 3, tax_id=f"T{n}", phone=f"+1 {n}") for n in range(0, 40, 5)]
    rows += [said("loyalty", "L90", 4, loyalty_card="L90", email="c7@x.org")]
    rng.shuffle(rows)
    batches += [rows[start:start + 25] for start in range(0, len(rows), 25)]
    for batch in batches:
        customers.master(*batch)
        stored: dict[str, set] = {}
        for name, value, golden_id in customers.rows('SELECT "KEY_NAME", "KEY_VALUE", "GOLDEN_ID" FROM "CUS_KEY"'):
            stored.setdefault(golden_id, set()).add((name, value))
        with customers.engine.connect() as conn:
            workspace = Workspace(conn, CONFIG)
            goldens = [workspace.golden(g) for (g,) in customers.rows(
                'SELECT "GOLDEN_ID" FROM "CUS_GOLDEN" WHERE "STATUS" = \'active\'')]
            expected = {g.golden_id: {(name, value) for name, values in matching.golden_keys(
                CONFIG, g, workspace.records_of(g)).items() for value in values} for g in goldens}
        assert stored == expected
        assert any(name == "customer_number" and value.startswith("G") for keys in stored.values()
                   for name, value in keys)  # an account keyed by its golden id
    assert customers.rows('SELECT count(*) FROM "CUS_GOLDEN" WHERE "STATUS" = \'retired\'') == [(1,)]
