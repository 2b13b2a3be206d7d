"""The journal store and the path assembly (`retailbus trace`) on a real SQLite file."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from contracts.journal import JournalHopsV1
from services.cli import main
from services.journal import store
from services.journal.trace import table, trace

pytestmark = pytest.mark.unit

SHA = "ab" * 32


def hops(*records) -> JournalHopsV1:
    return JournalHopsV1.model_validate({"hops": list(records)})


@pytest.fixture
def journal_db(tmp_path):
    """A journal with a sale's path and a customer file's path, written as the services send them:
    the erp's hop of a chunk names its rows one by one, the files service's compactly."""
    (tmp_path / "var").mkdir()
    engine = store.open_engine(f"sqlite:///{tmp_path / 'var' / 'journal.db'}")
    sale, posted_event, chunk = "01SALE", "01POSTED", "01CHUNK"
    other_rows = [{"key": f"{SHA}:{n}", "row": n, "refs": [f"C{n:04d}"]} for n in range(2, 502)]
    with engine.begin() as conn:
        store.write(conn, hops(
            {"id": sale, "correlationid": sale, "subject": "S001-0001", "hop": "accepted", "outcome": "ok",
             "time": 10.0, "detail": {"store": "S001"}},
            {"id": sale, "hop": "forwarded", "outcome": "ok", "time": 10.2},
            {"id": "01OTHER", "correlationid": "01OTHER", "subject": "S001-0002", "hop": "accepted",
             "outcome": "ok", "time": 10.1}), "store_agent")
        store.write(conn, hops(
            {"id": sale, "correlationid": sale, "subject": "S001-0001", "hop": "consumed", "outcome": "ok",
             "time": 10.3, "detail": {"queue": "q"}},
            {"id": sale, "correlationid": sale, "subject": "S001-0001", "hop": "posted", "outcome": "ok",
             "time": 10.31, "detail": {"doc_no": "S00000001"}},
            {"id": chunk, "correlationid": chunk, "subject": "customer.updated.v1", "hop": "consumed",
             "outcome": "ok", "time": 20.5},
            {"id": chunk, "correlationid": chunk, "hop": "applied", "outcome": "ok", "time": 20.6,
             "detail": {"table": "CUST_MST", "file": "customers_1.csv"}, "items": other_rows}), "erp")
        store.write(conn, hops(
            {"hop": "written", "outcome": "ok", "time": 15.0, "detail": {"file": "POINTS_1.dat"},
             "items": [{"key": "erp.sale_posted.v1:S00000009", "row": 2, "refs": ["01ELSE"]},
                       {"key": "erp.sale_posted.v1:S00000001", "row": 3,
                        "refs": [sale, posted_event, "S001-0001", "S00000001"]}]},
            {"id": chunk, "correlationid": chunk, "hop": "read", "outcome": "ok", "time": 20.0,
             "detail": {"file": "customers_1.csv", "chunk": 0, "rows": "2-501"},  # compact, as the files service sends
             "file_rows": {"sha256": SHA, "runs": [[2, 501]], "names": [f"C{n:04d}" for n in range(2, 502)]}}),
            "files")
    yield tmp_path, engine
    engine.dispose()


def test_a_sale_is_traced_by_its_pos_txn_id_to_the_line_of_the_points_file(journal_db):
    _, engine = journal_db
    with engine.connect() as conn:
        path = trace(conn, "S001-0001")
        by_id = trace(conn, "01SALE")
    assert [(h.service, h.hop) for h in path] == [
        ("store_agent", "accepted"), ("store_agent", "forwarded"), ("erp", "consumed"), ("erp", "posted"),
        ("files", "written")]
    assert [h.pk for h in by_id] == [h.pk for h in path]
    written = path[-1]
    assert [r["row"] for r in written.rows] == [3]  # only the sale's record, not its neighbour
    assert written.where() == "POINTS_1.dat line 3"
    assert "doc_no S00000001" in path[3].where()
    text = table(path)
    assert text.splitlines()[0].split() == ["TIME", "(UTC)", "SERVICE", "HOP", "OUTCOME", "ID", "WHERE"]
    assert "1970-01-01 00:00:10.000" in text and "POINTS_1.dat line 3" in text


def test_a_file_row_is_traced_by_its_customer_id_across_the_chunk_boundary(journal_db):
    _, engine = journal_db
    with engine.connect() as conn:
        path = trace(conn, "C0007")
        by_key = trace(conn, f"{SHA}:7")
    assert [(h.service, h.hop) for h in path] == [("files", "read"), ("erp", "consumed"), ("erp", "applied")]
    read, _, applied = path
    assert read.rows == [{"key": f"{SHA}:7", "row": 7, "refs": ["C0007"]}]  # one row of the 500
    assert read.where().startswith("customers_1.csv line 7, chunk 0, rows 2-501")
    assert applied.where() == "customers_1.csv line 7, table CUST_MST"
    assert [h.pk for h in by_key] == [h.pk for h in path]
    # the chunk's row type is its subject: not followed, or every chunk ever read would join
    with engine.connect() as conn:
        assert trace(conn, "nobody") == []


def write_config(root, dsn: str):
    path = root / "config" / "bus.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"RETAILBUS": {"root": str(root), "journal": {"dsn": dsn}}}))
    return path


def test_the_trace_command_prints_the_path_or_says_nothing_is_known(journal_db):
    root, _ = journal_db
    config = str(write_config(root, "sqlite:///var/journal.db"))  # relative to the project root
    runner = CliRunner()
    shown = runner.invoke(main, ["trace", "S001-0001", "--config", config])
    assert shown.exit_code == 0, shown.output
    assert [line.split()[3] for line in shown.output.splitlines()[1:]] == [
        "accepted", "forwarded", "consumed", "posted", "written"]
    as_json = runner.invoke(main, ["trace", "C0007", "--config", config, "--json"])
    assert as_json.exit_code == 0
    first = json.loads(as_json.output.splitlines()[0])
    assert first["hop"] == "read" and first["rows"][0]["row"] == 7 and first["time"].startswith("1970-01-01T")
    unknown = runner.invoke(main, ["trace", "S999-0404", "--config", config])
    assert unknown.exit_code == 1 and "nothing is known about 'S999-0404'" in unknown.output
    missing = runner.invoke(main, ["trace", "X", "--config", str(write_config(root, "sqlite:///var/none.db"))])
    assert missing.exit_code == 1 and "no journal at" in missing.output


def test_compact_file_rows_are_stored_as_the_rows_they_stand_for(journal_db):
    _, engine = journal_db
    with engine.begin() as conn:  # a skipped bad row (4) splits the runs; a row without a name has only its key
        store.write(conn, hops({"id": "01GAPS", "hop": "read", "outcome": "ok", "time": 30.0,
                                "detail": {"file": "customers_2.csv"},
                                "file_rows": {"sha256": "cd" * 32, "runs": [[2, 3], [5, 5]],
                                              "names": ["C9002", None, "C9005"]}}), "files")
    with engine.connect() as conn:
        [read] = trace(conn, "C9005")
        assert read.rows == [{"key": f"{'cd' * 32}:5", "row": 5, "refs": ["C9005"]}]
        assert read.where() == "customers_2.csv line 5"
        assert [h.rows[0]["row"] for h in trace(conn, f"{'cd' * 32}:3")] == [3]
        assert trace(conn, f"{'cd' * 32}:4") == []


@pytest.mark.parametrize("file_rows, where", [
    ({"sha256": SHA, "runs": [[2, 3]], "names": ["C1"]}, "names: 1 names for 2 rows"),
    ({"sha256": SHA, "runs": [[5, 3]], "names": []}, "first row comes after its last"),
    ({"sha256": "x", "runs": [[2, 2]], "names": ["C1"]}, "sha256"),
])
def test_compact_file_rows_that_do_not_add_up_are_refused(file_rows, where):
    with pytest.raises(ValueError, match=where):
        hops({"hop": "read", "outcome": "ok", "time": 1.0, "file_rows": file_rows})
