"""Customer mastering's rules as plain Python: survivorship, matching keys, the config file."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from services.customers import matching, survivorship
from services.customers.config import CustomersConfig, CustomersConfigError, load, parse
from services.customers.model import AttrState, Record, Said

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).parents[2] / "config" / "customers.yaml"
CONFIG = load(SHIPPED)


def said(record: Record, attribute: str, value, at: str, origin: str | None = None) -> Record:
    """`record` said `value` at `at` (as mastering's _absorb keeps it)."""
    state = record.attrs.setdefault(attribute, AttrState())
    statement = Said(value, at, origin or record.system)
    if state.latest is None or at >= state.latest.at:
        state.latest = statement
    if value is not None and (state.filled is None or at >= state.filled.at):
        state.filled = statement
    return record


def t(n: int) -> str:
    return f"2026-12-0{n}T10:00:00.000000Z"


def test_the_owner_wins_over_a_newer_value_of_higher_priority_elsewhere():
    crm, erp = Record("crm", "C1", "G1"), Record("erp", "C1", "G1")
    said(crm, "email", "old@x.org", t(1))
    said(erp, "email", "new@x.org", t(5))
    decided = survivorship.decide(CONFIG, "email", [crm, erp])
    assert (decided.value, decided.record, decided.rule) == ("old@x.org", "crm:C1", "owner")
    said(erp, "tax_id", "DE1", t(1))  # the ERP owns billing and tax
    said(crm, "tax_id", "FR9", t(9))
    assert survivorship.decide(CONFIG, "tax_id", [crm, erp]).value == "DE1"


def test_without_the_owner_priority_decides_then_the_most_recent():
    erp, loyalty, loyalty2 = Record("erp", "C1", "G1"), Record("loyalty", "L1", "G1"), Record("loyalty", "L2", "G1")
    said(loyalty, "phone", "+1", t(9))
    said(erp, "phone", "+2", t(1))
    decided = survivorship.decide(CONFIG, "phone", [loyalty, erp])
    assert (decided.value, decided.rule) == ("+2", "priority")
    assert survivorship.decide(CONFIG, "phone", [loyalty]).rule == "only"
    said(loyalty2, "phone", "+3", t(8))
    decided = survivorship.decide(CONFIG, "phone", [loyalty, loyalty2])
    assert (decided.value, decided.rule) == ("+1", "most_recent")


def test_an_empty_value_never_overwrites_unless_the_owner_clears():
    crm, erp = Record("crm", "C1", "G1"), Record("erp", "C1", "G1")
    said(erp, "phone", "+49 1", t(1))
    said(erp, "phone", None, t(3))            # the ERP blanked it: its last value still counts
    said(crm, "phone", None, t(4))            # the owner holds none: not a word about the value
    assert survivorship.decide(CONFIG, "phone", [crm, erp]).value == "+49 1"
    shipped = CONFIG.model_dump()
    shipped["groups"]["contact"]["owner_clears"] = True
    clearing = CustomersConfig.model_validate(shipped)
    decided = survivorship.decide(clearing, "phone", [crm, erp])
    assert (decided.value, decided.rule) == (None, "owner")


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_a_withdrawal_stays_whatever_order_the_statements_come_in(order):
    """The CRM withdrew at t4; its nightly file (t2) and the loyalty till (t6, not the owner)
    say granted: withdrawn, in every arrival order."""
    statements = [("crm", "crm", True, t(1)), ("crm", "crm_file", True, t(2)), ("crm", "crm", False, t(4)),
                  ("loyalty", "loyalty", True, t(6))]
    crm, loyalty = Record("crm", "C1", "G1"), Record("loyalty", "L1", "G1")
    for i in order:
        system, origin, value, at = statements[i]
        said(crm if system == "crm" else loyalty, "consent_sms", value, at, origin)
    decided = survivorship.decide(CONFIG, "consent_sms", [crm, loyalty])
    assert (decided.value, decided.at, decided.rule) == (False, t(4), "owner")


def test_keys_are_normalised_and_a_card_or_number_differing_is_no_conflict():
    assert matching.normalise("email", " Ada@Example.ORG ") == "ada@example.org"
    assert matching.normalise("phone", "+49 (30) 123-45") == "+493012345"
    assert matching.normalise("card", "lc-0001 23") == "LC000123"
    assert matching.normalise("phone", "n/a") is None
    one = matching.value_keys(CONFIG, "crm", "C1", {"email": "ada@x.org", "loyalty_card": "L1"})
    two = matching.value_keys(CONFIG, "loyalty", "L2", {"email": "ADA@x.org", "loyalty_card": "L2"})
    assert one == {"email": {"ada@x.org"}, "card": {"L1"}, "customer_number": {"C1"}}
    verdict = matching.evaluate(CONFIG, one, two)
    assert (verdict.kind, verdict.agree, verdict.conflict) == ("match", ("email",), ())
    three = matching.value_keys(CONFIG, "loyalty", "L3", {"email": "ada@x.org", "phone": "+1 555"})
    four = {**one, "phone": {"+2666"}}
    verdict = matching.evaluate(CONFIG, three, four)
    assert (verdict.kind, verdict.agree, verdict.conflict) == ("uncertain", ("email",), ("phone",))
    assert matching.evaluate(CONFIG, {"phone": {"+1"}}, {"email": {"a@b.c"}}).kind == "none"


def test_the_shipped_config_is_valid_and_names_its_systems():
    assert set(CONFIG.systems) == {"crm", "erp", "loyalty"}
    assert CONFIG.owner_of("consent_sms").owner == "crm" and CONFIG.owner_of("tax_id").owner == "erp"
    assert CONFIG.origins["crm_file"] == "crm"


@pytest.mark.parametrize(("change", "message"), [
    (("owner: erp", "owner: ledger"), "customers.yaml:24: groups.billing.owner: unknown system 'ledger'"),
    (("  crm_file: crm ", "  crm_file: crmx"), "customers.yaml:17: origins.crm_file: unknown system 'crmx'"),
    (("attributes: [loyalty_card]", "attributes: [loyalty_card, email]"),
     "customers.yaml:26: groups.cards.attributes: 'email' is in group contact already"),
    (("priority: [crm, erp, loyalty]", "priority: [crm, erp]"), "customers.yaml:28: priority: must list every"),
    (("normalise: phone", "normalise: digits"), "customers.yaml:33: matching.keys[phone].normalise: Input should"),
    (("    create: true", "    creates: true"), "customers.yaml:10: systems.erp: unknown key 'creates'"),
    (("groups:", "groups:\n  rewards: {owner: loyalty, attributes: []}"),
     "customers.yaml:26: groups: key 'rewards' is given twice (first on line 22)"),
])
def test_an_invalid_file_is_refused_naming_its_line(change, message):
    text = SHIPPED.read_text().replace(*change)
    with pytest.raises(CustomersConfigError) as info:
        parse(text)
    assert message in str(info.value), str(info.value)


def test_a_file_that_is_not_yaml_is_refused_with_its_line():
    with pytest.raises(CustomersConfigError, match=r"customers.yaml:3: .*indentation"):
        parse("systems:\n  crm: {consumes: [name]}\n   erp: x\n")


def test_the_customers_service_does_not_start_on_a_file_it_refuses(tmp_path, container_factory):
    from services.customers.service import CustomersService

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "customers.yaml").write_text(SHIPPED.read_text().replace("owner: erp", "owner: ledger"))
    container = container_factory(CustomersService, {"AMQP_URI": "amqp://127.0.0.1:9",
                                                     "CUSTOMERS_DB_URI": f"sqlite:///{tmp_path / 'c.db'}",
                                                     "RETAILBUS": {"root": str(tmp_path)}})
    with pytest.raises(CustomersConfigError, match=r"customers.yaml:24: groups.billing.owner: unknown system"):
        container.start()
