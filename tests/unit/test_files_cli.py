"""`retailbus files status|reprocess` on real folders and a real ledger (CliRunner, no broker)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from demo.batch.jobs import customer_rows, write_customer_export
from legacy_wrappers.filedrop.ledger import Ledger, identity
from services.cli import main

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).parents[2] / "config" / "filedrops.yaml"


@pytest.fixture
def estate(tmp_path):
    """The shipped drops config with its folders and ledger under tmp_path."""
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg["ledger"] = str(tmp_path / "var" / "filedrops.db")
    for name, drop in {**cfg["inbound"], **cfg["outbound"]}.items():
        drop["folder"] = str(tmp_path / "drops" / name)
    path = tmp_path / "config" / "filedrops.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    for name in cfg["inbound"]:
        (tmp_path / "drops" / name / "error").mkdir(parents=True)
    ledger = Ledger(tmp_path / "var" / "filedrops.db")
    yield tmp_path, path, ledger
    ledger.close()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def table(output: str) -> dict[str, list[int]]:
    rows = [line.split() for line in output.splitlines()[1:] if not line.startswith(" ")]
    return {r[0]: [int(x) for x in r[1:5]] for r in rows}


def test_status_counts_waiting_in_progress_done_today_and_rejected(estate):
    root, drops, ledger = estate
    customers = root / "drops" / "customers"
    write_customer_export(customers / "customers_a.csv", customer_rows(2))   # waiting, complete
    write_customer_export(customers / "customers_b.csv", customer_rows(2), marker=False)  # waiting
    (customers / "notes.txt").write_text("not a drop file")                  # not counted
    refused = customers / "customers_c.csv"
    refused.write_text("x")
    ledger.remember("customers", refused.name, identity(os.lstat(refused)), "unmovable")
    ledger.begin("customers", "1" * 64, "customers_d.csv", 10, 0)
    ledger.begin("customers", "2" * 64, "customers_e.csv", 10, 0)
    ledger.finish("customers", "2" * 64, "customers_e.csv", "done")
    (customers / "error" / "customers_f.csv").write_text("bad")
    (customers / "error" / "customers_f.csv.rejects.csv").write_text("row,column,value,reason\n")
    result = run("files", "status", "--drops", drops)
    assert result.exit_code == 0, result.output
    assert table(result.output) == {"customers": [2, 1, 1, 1], "stock": [0, 0, 0, 0]}


def test_status_says_why_each_file_was_rejected(estate):
    root, drops, ledger = estate
    error = root / "drops" / "customers" / "error"
    bad = error / "customers_g.csv"
    bad.write_text("customer_id,name\nC1,x\nTRL,9\n")
    (error / "customers_g.csv.rejects.csv").write_text("row,column,value,reason\n")
    sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    ledger.begin("customers", sha, bad.name, 1, 1)
    ledger.finish("customers", sha, bad.name, "rejected", "trailer count 9 != 1 data rows", 1, 1)
    (error / "customers_h.csv").write_text("moved here by hand")
    result = run("files", "status", "--drops", drops)
    assert result.exit_code == 0, result.output
    assert (f"  error/customers_g.csv: rejected: 1 bad row(s), trailer count 9 != 1 data rows "
            f"(rows in {error / 'customers_g.csv.rejects.csv'})") in result.output, result.output
    assert "  error/customers_h.csv: rejected: no reason recorded (moved by hand?)" in result.output


def test_reprocess_moves_a_fixed_file_back_and_the_ledger_forgets_it(estate):
    root, drops, ledger = estate
    customers = root / "drops" / "customers"
    parked = customers / "error" / "customers_a.csv"
    write_customer_export(parked, customer_rows(2), marker=False)
    sha = hashlib.sha256(parked.read_bytes()).hexdigest()
    ledger.finish("customers", sha, parked.name, "rejected", "2 bad rows")
    ledger.remember("customers", parked.name, "1:2:3", "unmovable")
    result = run("files", "reprocess", "--drops", drops, parked)
    assert result.exit_code == 0, result.output
    assert not parked.exists() and (customers / "customers_a.csv").is_file()
    assert (customers / "customers_a.csv.done").is_file()  # the customers drop takes marked files
    assert ledger.file("customers", sha) is None
    assert ledger.seen("customers", "customers_a.csv", "1:2:3") is None
    assert table(run("files", "status", "--drops", drops).output)["customers"] == [1, 0, 0, 0]


def test_reprocess_refuses_paths_outside_an_error_folder_symlinks_and_reports(estate, tmp_path):
    root, drops, ledger = estate
    customers = root / "drops" / "customers"
    outside = tmp_path / "customers_x.csv"
    outside.write_text("x")
    in_drop = customers / "customers_y.csv"
    in_drop.write_text("y")
    link = customers / "error" / "customers_z.csv"
    link.symlink_to(outside)
    escape = customers / "error" / ".." / ".." / ".." / "customers_x.csv"
    report = customers / "error" / "customers_y.csv.rejects.csv"
    report.write_text("row\n")
    for path, reason in [(outside, "not in the error/ folder"), (in_drop, "not in the error/ folder"),
                         (escape, "not in the error/ folder"), (link, "not a regular file"),
                         (report, "reject report"), (customers / "error" / "nope.csv", "No such file")]:
        result = run("files", "reprocess", "--drops", drops, path)
        assert result.exit_code != 0 and reason in result.output, (path, result.output)
    assert outside.read_text() == "x" and link.is_symlink() and in_drop.read_text() == "y"
    assert sorted(p.name for p in customers.iterdir()) == ["customers_y.csv", "error"]


def test_reprocess_refuses_content_already_published(estate):
    root, drops, ledger = estate
    parked = root / "drops" / "customers" / "error" / "customers_a.csv"
    parked.write_text("same content\n")
    ledger.finish("customers", hashlib.sha256(b"same content\n").hexdigest(), "customers_old.csv", "done")
    result = run("files", "reprocess", "--drops", drops, parked)
    assert result.exit_code != 0 and "published before" in result.output
    assert parked.exists()
