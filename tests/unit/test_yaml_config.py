"""bus/yaml_config.py: how every config file of the bus is refused (routes, cases,
customers, loyalty, returns, orders, file drops), said once."""
from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bus import yaml_config

pytestmark = pytest.mark.unit


class Refused(ValueError):
    pass


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sla_hours: int = Field(24, ge=1)


class Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = "crm"
    types: dict[str, Rule] = {}

    @model_validator(mode="after")
    def _known_owner(self):
        if self.owner not in ("crm", "erp"):
            raise ValueError(f"owner: {self.owner!r} is not a system; types: checked after the owner")
        return self


def refusal(text: str, **kwargs) -> str:
    with pytest.raises(Refused) as caught:
        yaml_config.parse_model(text, Rules, "rules.yaml", Refused, **kwargs)
    return str(caught.value)


def test_a_mapping_key_leads_to_the_model_of_its_values():
    said = refusal("types:\n  late:\n    sla_hour: 2\n")
    assert said == "rules.yaml:3: types.late: unknown key 'sla_hour' (did you mean 'sla_hours'?)"


def test_each_problem_is_on_its_own_line_with_its_field_path():
    said = refusal("owner: crm\ntypes:\n  a: {sla_hours: 0}\n  b: {sla_hours: x}\n")
    assert said.splitlines() == [
        "rules.yaml:3: types.a.sla_hours: Input should be greater than or equal to 1",
        "rules.yaml:4: types.b.sla_hours: Input should be a valid integer, unable to parse string as an integer"]


def test_a_model_wide_rule_is_said_at_each_key_it_names():
    said = refusal("types: {}\nowner: pos\n")
    assert said.splitlines() == ["rules.yaml:2: owner: 'pos' is not a system", "rules.yaml:1: types: checked after the owner"]


def test_a_section_is_read_alone_and_named_in_full():
    text = "other: {anything: 1}\nrules:\n  owner: crm\n  typos: {}\n"
    assert refusal(text, section="rules") == "rules.yaml:4: rules: unknown key 'typos' (did you mean 'types'?)"
    assert yaml_config.parse_model("other: 1\n", Rules, "r.yaml", Refused, section="rules") == Rules()


def test_a_missing_file_is_refused_unless_defaults_are_allowed(tmp_path):
    with pytest.raises(Refused, match=r"nothing.yaml: cannot read: No such file"):
        yaml_config.load_model(tmp_path / "nothing.yaml", Rules, Refused)
    assert yaml_config.load_model(tmp_path / "nothing.yaml", Rules, Refused, missing_ok=True) == Rules()


def test_an_empty_file_is_the_defaults_and_a_list_is_refused():
    assert yaml_config.parse_model("", Rules, "r.yaml", Refused) == Rules()
    assert refusal("- a\n") == "rules.yaml:1: expected a mapping with owner, types"
