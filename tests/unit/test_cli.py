"""services/cli/__init__.py: `retailbus contracts list|schema` (click's CliRunner, no broker)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from contracts import registry
from services.cli import main

pytestmark = pytest.mark.unit


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_contracts_list_names_every_registered_type():
    result = run("contracts", "list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    listed = [line.split()[0] for line in lines if line.strip()]
    assert listed == registry.types()
    assert len(listed) >= 9
    by_type = dict((line.split()[0], line) for line in lines)
    assert "PosSaleV1" in by_type["pos.sale.v1"]
    assert "PosReturnV1" in by_type["pos.return.v1"]


@pytest.mark.parametrize("type_name", registry.types())
def test_contracts_schema_for_every_type(type_name):
    result = run("contracts", "schema", type_name)
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema == registry.json_schema(type_name)
    assert schema["type"] == "object" and schema["properties"]


def test_contracts_schema_pos_sale_has_lines():
    result = run("contracts", "schema", "pos.sale.v1")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "PosSaleV1"
    assert "lines" in schema["properties"] and "lines" in schema["required"]
    assert {"total_minor", "tenders", "store_id"} <= set(schema["properties"])


def test_contracts_schema_unknown_type_fails_naming_known_types():
    result = run("contracts", "schema", "pos.sale.v9")
    assert result.exit_code != 0
    assert "pos.sale.v9" in result.output
    for name in registry.types():
        assert name in result.output
    assert "Traceback" not in result.output


def test_contracts_schema_needs_a_type():
    result = run("contracts", "schema")
    assert result.exit_code == 2
    assert "TYPE_NAME" in result.output


def test_help_lists_the_command_groups():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("contracts", "up", "broker"):
        assert command in result.output
