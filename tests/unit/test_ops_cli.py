"""Command-line paper cuts ops hit (CliRunner on real files, no broker): a terminal key
is never replaced by accident, `broker status` lists queues by service, the demo
does not point at a folder it deleted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from services.cli import main
from services.cli.broker import _table, queue_owner

pytestmark = pytest.mark.unit


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config" / "bus.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"RETAILBUS": {"root": str(tmp_path),
                                                  "stores": [{"id": "S001", "http": "127.0.0.1:1"}]}}))
    return path


def keys(config: Path) -> dict:
    return json.loads((config.parents[1] / "var" / "stores" / "S001" / "terminal_keys.json").read_text())


def test_a_terminal_key_is_replaced_only_with_rotate(config):
    def add(*extra):
        return CliRunner().invoke(main, ["agent", "keys", "add", "--store", "S001", "--terminal", "07",
                                         "--config", str(config), *extra])
    first = add()
    assert first.exit_code == 0, first.output
    key = keys(config)["07"]
    assert first.output.splitlines()[0] == key

    again = add()
    assert again.exit_code == 1
    assert "terminal 07 of store S001 already has a key" in again.output and "--rotate" in again.output
    assert keys(config)["07"] == key  # the till keeps working

    rotated = add("--rotate")
    assert rotated.exit_code == 0 and keys(config)["07"] != key
    assert rotated.output.splitlines()[0] == keys(config)["07"]


def test_broker_status_groups_queues_by_service_and_sorts_them():
    rows = [{"name": n, "messages": i, "consumers": 1} for i, n in enumerate([
        "rpc-erp", "evt-store_agent-pos.sale.v1--erp.on_pos_sale.dlq", "routes.S002",
        "evt-erp-erp.posted.v1--files.on_posted", "evt-store_agent-pos.sale.v1--erp.on_pos_sale",
        "routes.S001", "evt-store_agent-pos.sale.v1--erp.on_pos_sale.retry.1000ms", "mystery"])]
    lines = [" ".join(line.split()) for line in _table(rows)]
    assert lines == [
        "queue messages consumers",
        "erp:",
        "evt-store_agent-pos.sale.v1--erp.on_pos_sale 4 1",
        "evt-store_agent-pos.sale.v1--erp.on_pos_sale.dlq 1 1",
        "evt-store_agent-pos.sale.v1--erp.on_pos_sale.retry.1000ms 6 1",
        "rpc-erp 0 1",
        "files:",
        "evt-erp-erp.posted.v1--files.on_posted 3 1",
        "store agents:",
        "routes.S001 5 1",
        "routes.S002 2 1",
        "other:",
        "mystery 7 1",
    ]
    assert queue_owner("store_agent-S001.stock_changed") == "store agents"
