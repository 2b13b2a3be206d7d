"""The accrual mode: decided per sale by its posting time, switched by `retailbus loyalty
mode` (only the accrual block rewritten, atomically, audited first, refused without an
audit), the `sale` rounding that equals the points file's rule, and the shadow
comparison naming the field with both sides."""
from __future__ import annotations

import json
import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from contracts.erp import ErpSalePostedV1
from services.cli import main
from services.files.mapping import points_for
from services.loyalty import shadow
from services.loyalty.rules import Accrual, Earning, load, sale_points
from services.loyalty.switch import SwitchRefusedError, history, switch_mode

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)


def test_a_sale_earns_by_the_mode_of_the_moment_it_was_posted():
    accrual = Accrual.model_validate({"mode": "api", "since": T0, "before": [
        {"mode": "shadow", "since": T0 - timedelta(hours=1)}, {"mode": "file"}]})
    assert accrual.mode_at(T0) == "api" and accrual.mode_at(T0 + timedelta(days=3)) == "api"
    assert accrual.mode_at(T0 - timedelta(microseconds=1)) == "shadow"
    assert accrual.mode_at(T0 - timedelta(hours=1, microseconds=1)) == "file"
    assert Accrual(mode="api").mode_at(T0) == "api"  # a hand-written mode without `since`: every sale


@pytest.mark.parametrize("accrual, field", [
    ({"mode": "api", "before": [{"mode": "file"}]}, "accrual.since: required"),
    ({"mode": "api", "since": T0, "before": [{"mode": "file", "since": T0}]}, "accrual.before.0.since"),
    ({"mode": "api", "since": T0, "before": [{"mode": "file"}, {"mode": "shadow"}]}, "only the oldest"),
])
def test_a_history_out_of_order_is_refused_naming_the_field(accrual, field):
    with pytest.raises(ValidationError, match=field):
        Accrual.model_validate(accrual)


def rules_copy(tmp_path: Path) -> Path:
    path = tmp_path / "loyalty.yaml"
    shutil.copy(ROOT / "config" / "loyalty.yaml", path)
    return path


def test_a_switch_rewrites_only_the_accrual_block_audits_it_and_keeps_the_earlier_mode(tmp_path):
    rules, audit = rules_copy(tmp_path), tmp_path / "audit" / "loyalty.jsonl"
    before = (ROOT / "config" / "loyalty.yaml").read_text()
    inode = rules.stat().st_ino
    done = switch_mode(rules, audit, "shadow", "compare before the move", "ana", lead=5, now=T0)
    assert (done.before.mode, done.after.mode, done.after.since) == ("file", "shadow", T0 + timedelta(seconds=5))
    assert rules.stat().st_ino != inode  # replaced by a rename, never written in place
    text = rules.read_text()
    assert text.split("earning:")[1] == before.split("earning:")[1]  # the rest stays as written, comments too
    assert text.startswith(before.split("accrual:")[0])
    config = load(rules)
    assert config.accrual.mode_at(T0) == "file" and config.accrual.mode_at(T0 + timedelta(seconds=5)) == "shadow"
    switch_mode(rules, audit, "api", "parity 1.0 for a week", "bo", lead=5, now=T0 + timedelta(hours=1))
    config = load(rules)
    assert [config.accrual.mode_at(T0 + timedelta(seconds=s)) for s in (0, 5, 3605)] == ["file", "shadow", "api"]
    [first, second] = history(audit)
    assert (first["user"], first["reason"], first["before"], first["after"]) == (
        "ana", "compare before the move", {"mode": "file", "since": None},
        {"mode": "shadow", "since": (T0 + timedelta(seconds=5)).isoformat()})
    assert second["before"]["mode"] == "shadow" and second["after"]["mode"] == "api"
    assert first["os_user"] and isinstance(first["os_uid"], int) and first["time"] == T0.isoformat()


def test_the_same_mode_again_is_refused_and_changes_nothing(tmp_path):
    rules, audit = rules_copy(tmp_path), tmp_path / "audit.jsonl"
    with pytest.raises(SwitchRefusedError, match="accrual mode is file already"):
        switch_mode(rules, audit, "file", "again", "ana", now=T0)
    assert rules.read_text() == (ROOT / "config" / "loyalty.yaml").read_text() and not audit.exists()


def test_without_an_audit_record_the_mode_is_not_switched(tmp_path):
    rules = rules_copy(tmp_path)
    (tmp_path / "audit.jsonl").mkdir()  # a folder where the file should be: no one can append to it
    with pytest.raises(SwitchRefusedError, match="the mode was not switched"):
        switch_mode(rules, tmp_path / "audit.jsonl", "api", "no audit", "ana", now=T0)
    assert load(rules).accrual.mode == "file" and not list(tmp_path.glob(".*.tmp"))


def test_a_bad_rules_file_is_not_switched(tmp_path):
    rules = tmp_path / "loyalty.yaml"
    rules.write_text("accrual: {mode: file}\nearning: {points_per_unit: -1}\n")
    with pytest.raises(SwitchRefusedError, match="points_per_unit"):
        switch_mode(rules, tmp_path / "audit.jsonl", "api", "x", "ana", now=T0)
    assert rules.read_text() == "accrual: {mode: file}\nearning: {points_per_unit: -1}\n"


def test_the_cli_switches_shows_and_lists_the_history(tmp_path):
    (tmp_path / "config").mkdir()
    rules = rules_copy(tmp_path / "config")
    bus = tmp_path / "config" / "bus.yaml"
    bus.write_text(yaml.safe_dump({"AMQP_URI": "amqp://unused", "RETAILBUS": {"root": str(tmp_path)}}))
    runner = CliRunner()
    refused = runner.invoke(main, ["loyalty", "mode", "api", "--config", str(bus)])
    assert refused.exit_code == 2 and "--reason is required" in refused.output
    done = runner.invoke(main, ["loyalty", "mode", "api", "--reason", "go", "--user", "ops1", "--config", str(bus)])
    assert done.exit_code == 0, done.output
    assert "accrual mode file -> api for sales posted from" in done.output
    assert load(rules).accrual.mode == "api"
    shown = runner.invoke(main, ["loyalty", "mode", "--config", str(bus)])
    assert shown.output.startswith("accrual mode api since ") and "before: file since the start" in shown.output
    [record] = [json.loads(line) for line in (tmp_path / "var" / "loyalty" / "audit.jsonl").read_text().splitlines()]
    assert record["user"] == "ops1" and record["reason"] == "go"
    listed = runner.invoke(main, ["loyalty", "history", "--config", str(bus)])
    assert "ops1" in listed.output and "file -> api" in listed.output


FILE_RULE = Earning(points_per_unit=1, tier_multipliers={}, rounding="sale")


@pytest.mark.parametrize("totals", [[150, 150], [1999, 1, 50], [99], [10_000, 333, 333, 334], [5]])
def test_sale_rounding_with_the_files_rule_gives_the_files_points_and_lines_add_up(totals):
    lines = [("100001", 1, t) for t in totals]
    points = sale_points(FILE_RULE, "GOLD", date(2026, 12, 7), lines)
    assert sum(points) == points_for(sum(totals))
    assert all(p >= 0 for p in points)


def test_sale_rounding_shares_by_largest_remainder():
    rule = Earning(points_per_unit=1, tier_multipliers={"GOLD": 1.5}, rounding="sale")
    # exact 2.25 + 2.25 + 1.5 = 6: floors 2 + 2 + 1, one more point to the largest remainder (the third)
    assert sale_points(rule, "GOLD", date(2026, 12, 7), [("1", 1, 150), ("2", 1, 150), ("3", 1, 100)]) == [2, 2, 2]


def posted(lines: list[tuple[str, int]]) -> ErpSalePostedV1:
    return ErpSalePostedV1(store_id="S001", pos_txn_id="S001-01-1", doc_no="S1", business_day=date(2026, 12, 7),
                           posted_at=T0, currency="EUR", total_minor=sum(t for _, t in lines), loyalty_card="C1",
                           lines=[{"sku": s, "quantity": 1, "line_total_minor": t} for s, t in lines])


def test_shadow_names_each_differing_field_with_both_sides():
    doc = posted([("100001", 1000), ("990001", 500)])
    assert shadow.compare(FILE_RULE, doc, sale_points(FILE_RULE, "BASE", doc.business_day,
                                                      [(s.sku, 1, s.line_total_minor) for s in doc.lines])) == []
    gold = Earning(points_per_unit=1, tier_multipliers={"GOLD": 2.0}, excluded_sku_prefixes=("99",))
    points = sale_points(gold, "GOLD", doc.business_day, [(s.sku, 1, s.line_total_minor) for s in doc.lines])
    differences = shadow.compare(gold, doc, points)
    assert differences == [shadow.Difference("points", 15, 20), shadow.Difference("basis_minor", 1500, 1000)]
    assert shadow.describe(differences, "GOLD") == "points: file 15, api 20; basis_minor: file 1500, api 1000 (tier GOLD)"
