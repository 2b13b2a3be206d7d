"""Layouts and config errors of file drops (no broker)."""
from __future__ import annotations

import csv
import io
import time
from datetime import datetime

import orjson
import pytest

from contracts.batch import EventBatchV1
from contracts.envelope import CloudEvent
from contracts.journal import FileRows
from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop.layout import FileProblemError, Layout
from legacy_wrappers.filedrop.records import records
from legacy_wrappers.filedrop.rowcode import CANONICAL_STAMP, GoodRows, json_safe
from legacy_wrappers.filedrop.wakeup import FolderWakeup

pytestmark = pytest.mark.unit


def drops():
    """The shipped drops, the customer export without its consent columns: the rows below were
    written for its first six columns (test_filedrop_count.py reads the whole layout)."""
    shipped = fd_config.load(fd_config.DEFAULT_PATH)
    customers = shipped.inbound["customers"]
    return shipped.model_copy(update={"inbound": {**shipped.inbound, "customers": customers.model_copy(
        update={"fields": customers.fields[:6]})}})


def test_config_errors_name_the_field_path(tmp_path):
    bad = tmp_path / "config" / "filedrops.yaml"
    bad.parent.mkdir()
    bad.write_text("inbound:\n  x:\n    folder: a\n    format: fixed\n    completion: {rule: marker}\n"
                   "    fields: [{name: a, start: 5, end: 2}]\n")
    with pytest.raises(fd_config.FileDropConfigError, match=r"filedrops.yaml:6: inbound\.x\.fields\[a\]: Value error, end must not be before start"):
        fd_config.load(bad)


def test_fixed_width_scan_checks_types_widths_and_trailer():
    layout = Layout(drops().inbound["stock"])
    good = f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00"
    data = "\n".join(["HDR", good, good[:-1], good.replace("000000005", "00000000X"),
                      "TRL000000003000000000000005"]) + "\n"
    rows, bad = [], []
    out = Layout.scan(layout, io.BytesIO(data.encode()), lambda good, doubtful: rows.extend(good.items),
                      lambda n, p: bad.append((n, [c for c, _, _ in p])), key_prefix="f:")
    assert list(map(orjson.loads, rows)) == [{"row": 2, "idempotencykey": "f:2", "data": {
        "store_id": "S001", "sku": "100001", "on_hand": 5, "changed_at": "2026-11-27T06:00:00+00:00"}}]
    assert bad == [(3, ["<record>"]), (4, ["on_hand"])]
    assert out.problems == [] and len(out.sha256) == 64


def test_wrong_trailer_count_is_a_file_problem():
    layout = Layout(drops().inbound["stock"])
    good = f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00"
    out = layout.scan(io.BytesIO(f"HDR\n{good}\nTRL000000002000000000000005\n".encode()),
                      lambda *a: None, lambda *a: None)
    assert out.problems == ["trailer count '000000002' does not match 1 data rows"]


@pytest.mark.parametrize("drop, records", [
    ("customers", [["C1", "Ann", "a@b.c", "", "", "2026-11-27T06:00:00+00:00"],
                   ["", "Ann", "", "", "", "2026-11-27T06:00:00+00:00"],            # missing id
                   ["C1", "Ann", "", "", "", "2026-11-27T06:00:00"],                # no offset
                   ["C1", "Ann", "", "", "", "yesterday"],                          # not a timestamp
                   ["C1234567890123", "Ann", "", "", "", "2026-11-27T06:00:00+00:00"],  # too long
                   ["C1", "Ann", "", "", "2026-11-27T06:00:00+00:00"]]),           # a column short
    ("stock", [f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00",
               f"{'S001':<8}{'100001':<20}{'5X':>9}2026-11-27T06:00:00+00:00",  # not an integer
               f"{'':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00",        # missing store
               f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:0"]),   # a character short
])
def test_generated_row_loop_agrees_with_the_reference_row(drop, records):
    layout = Layout(drops().inbound[drop])
    for rec in records:
        values, problems = layout.row(rec)
        assert fast_row(layout, rec) == values, rec
        assert (values is None) == bool(problems)
    assert fast_row(layout, records[0]) is not None and all(fast_row(layout, r) is None for r in records[1:])


def fast_row(layout: Layout, rec, doubts: list | None = None) -> dict | None:
    """What the generated row loop makes of one record: its values, or None when it
    leaves the record to `scan` (refused, or a header/trailer look-alike). Its item is
    the JSON orjson writes of the item's dict, from the loop for JSON-safe blocks too."""
    good, others, doubtful = GoodRows(), [], []
    layout.row_loops[False, False]([7], [rec], "k:", good, others, doubtful)
    assert len(good) + len(others) == 1 and (others == [] or others == [(7, rec)])
    if doubts is not None:
        doubts.extend(doubtful)
    if not good:
        return None
    item = orjson.loads(good.items[0])
    assert good.items[0] == orjson.dumps(item).decode() and good.numbers == [7]
    if json_safe("".join(rec)):
        safe = GoodRows()
        layout.row_loops[False, True]([7], [rec], "k:", safe, [], [])
        assert safe == good
    return item["data"]


CUSTOMER_ROWS = [  # the layout takes every one; the contract only the first two
    ["C1", "Ann", "a@b.c", "", "", "2026-11-27T06:00:00+00:00"],
    ["C1", "Ann", "", "+49 30 1", "LC1", "2026-11-27T06:00:00Z"],
    ["C1", "Ann", "not-an-email", "", "", "2026-11-27T06:00:00+00:00"],
    ["C1", "Ann", "x@y", "", "", "2026-11-27T06:00:00+00:00"],
    ["C1", "Ann", "a b@c.d", "", "", "2026-11-27T06:00:00+00:00"],
]
STOCK_ROWS = [  # the contract's store id: ^[A-Z0-9]{1,8}$
    f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00",
    f"{'s001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00",
    f"{'S0-1':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00",
]


@pytest.mark.parametrize("drop, records", [("customers", CUSTOMER_ROWS), ("stock", STOCK_ROWS)])
def test_the_row_loop_doubts_exactly_the_values_the_contract_refuses(drop, records):
    from pydantic import ValidationError
    from services.files.mapping import ROW_TYPES, drop_options
    layout = Layout(drops().inbound[drop], drop_options(drop)["values_schema"])
    for rec in records:
        doubts: list[int] = []
        values = fast_row(layout, rec, doubts)
        try:
            ROW_TYPES[drop].model_validate(values)
            valid = True
        except ValidationError:
            valid = False
        assert doubts == ([] if valid else [7]), rec
    doubts = []
    assert fast_row(Layout(drops().inbound[drop]), records[-1], doubts) and doubts == []  # no schema, no doubt


@pytest.mark.parametrize("prop, layout_field, tests, patterned", [
    ({"type": "string"}, {"required": False}, ["v0 is not None"], []),  # an empty value, a field not nullable
    ({"type": "string", "maxLength": 3}, {"max_length": 5}, ["(len(v0) <= 3)"], []),
    ({"type": "string", "maxLength": 9}, {"max_length": 5}, [], []),     # the layout proves it
    ({"type": "string", "minLength": 1, "pattern": r"\S"}, {}, [], []),  # a stripped required value has both
    ({"type": "string", "minLength": 3}, {}, ["(len(v0) >= 3)"], []),
    ({"anyOf": [{"type": "string", "pattern": "^a"}, {"type": "null"}]}, {"required": False}, [], [0]),  # per block
    ({"type": "string", "format": "date-time"}, {}, ["False"], []),      # a str layout cannot prove a format
    ({"type": "string", "format": "date-time"}, {"type": "timestamp"}, [], []),
    ({"type": "integer", "minimum": 0}, {"type": "int"}, ["False"], []),  # an unknown constraint: doubt every row
    ({"type": "integer"}, {"type": "str"}, ["False"], []),                # another type
])
def test_schema_constraints_the_layout_does_not_prove_are_tested(prop, layout_field, tests, patterned):
    from legacy_wrappers.filedrop.rowcode import _schema_checks
    spec = fd_config.FieldSpec(name="v", **layout_field)
    env = {}
    assert _schema_checks([spec], {"properties": {"v": prop}}, env) == (tests, patterned)
    assert sorted(env) == [f"p{i}" for i in patterned]


def test_a_pattern_is_tested_on_a_block_and_names_exactly_the_rows_that_break_it():
    from legacy_wrappers.filedrop.rowcode import BlockPattern
    email = BlockPattern(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    numbers, doubtful = [1, 2, 3, 4, 5, 6], [3]  # rows 1-2 from an earlier block; 3 doubted for another test
    email(["a@b.c", None, "not-an-email", "x y@z.c"], numbers, 2, doubtful)
    assert doubtful == [3, 5, 6]
    email(["a@b.c", None], numbers, 4, doubtful)
    assert doubtful == [3, 5, 6]
    look_around = BlockPattern(r"^(?!tmp)[a-z]+$")  # Rust's engine has no look-around: Python's
    doubtful = []
    look_around(["abc", "tmpx", "ABC"], [7, 8, 9], 0, doubtful)
    assert doubtful == [8, 9]


def test_the_row_loop_doubts_the_rows_of_a_block_whose_values_break_the_pattern():
    from services.files.mapping import drop_options
    layout = Layout(drops().inbound["customers"], drop_options("customers")["values_schema"])
    stamp = "2026-11-27T06:00:00+00:00"
    recs = [["C1", "Ann", "a@b.c", "", "", stamp], ["", "Bob", "bad", "", "", stamp],  # refused: no id
            ["C3", "Cy", "not-an-email", "", "", stamp], ["C4", "Di", "", "", "", stamp],
            ["C5", "Ed", "e@f", "", "", stamp]]
    good, others, doubtful = GoodRows(["earlier"], [1], ["C0"]), [], []
    layout.row_loops[False, False]([2, 3, 4, 5, 6], recs, "k:", good, others, doubtful)
    assert good.numbers == [1, 2, 4, 5, 6] and [n for n, _ in others] == [3] and doubtful == [4, 6]


@pytest.mark.parametrize("text, lines, safe", [
    ("C1,Zoë Müller,a@b.c\r\nC2,Ann,", True, True),  # line ends between lines are cut away
    ("C1,Ann\r\n", False, False), ('C1,"Ann"', True, False), ("C1,A\\nn", True, False),
    ("C1,A\tnn", True, False), ("C1,A\x1fnn", True, False), ("C1,A\x7fnn 😀", True, True),
])
def test_json_safe_text_is_what_orjson_writes_between_quotes(text, lines, safe):
    assert json_safe(text, lines) == safe
    values = text.replace("\r\n", ",").split(",") if lines else [text]
    assert safe == all(orjson.dumps(v) == f'"{v}"'.encode() for v in values)


def test_a_plain_file_is_read_by_the_loop_for_json_safe_blocks(monkeypatch):
    layout = Layout(drops().inbound["customers"])
    taken = []
    for key, loop in list(layout.row_loops.items()):
        monkeypatch.setitem(layout.row_loops, key, lambda *a, key=key, loop=loop: taken.append(key) or loop(*a))
    data = ("customer_id,name,email,phone,loyalty_card,updated_at\r\n"
            + "".join(f"C{i},Zoë {i},,,,2026-11-27T06:00:00+00:00\r\n" for i in range(5)) + "TRL,5,,,,\r\n")
    first = layout.scan(io.BytesIO(data.encode()), validate=False)
    out = layout.scan(io.BytesIO(data.encode()), lambda good, doubtful: None, line_end=first.line_end)
    assert out.rows == 5 and set(taken) == {(True, True)}


def test_a_doubted_chunk_is_validated_in_full_naming_the_rows():
    from contracts.errors import ContractError
    from legacy_wrappers.filedrop.inbound import RowChunk
    from services.files.mapping import batch_event, drop_options
    layout = Layout(drops().inbound["customers"], **drop_options("customers"))
    good = GoodRows()
    recs = [["C1", "Ann", "", "", "", "2026-11-27T06:00:00+00:00"],
            ["C2", "Bo", "x@y", "", "", "2026-11-27T06:00:00Z"]]  # not an email the contract takes
    doubtful = []
    layout.row_loops[False, False]([2, 3], recs, "k:", good, [], doubtful)
    assert doubtful == [3] and good.names == ["C1", "C2"]
    chunk = RowChunk("customers", "f.csv", "a" * 64, 0, good, doubtful)
    with pytest.raises(ContractError, match=r"f.csv: rows \[3\].*email"):
        batch_event(chunk, "legacy/filedrop/customers")


def test_a_cheap_first_look_counts_records_for_the_trailer_without_validating():
    layout = Layout(drops().inbound["customers"])
    assert not layout.needs_validation_first  # skip_rows, trailer count only
    assert Layout(drops().inbound["stock"]).needs_validation_first  # reject_file, control total
    data = ("customer_id,name,email,phone,loyalty_card,updated_at\n"
            "C1,Ann,,,,2026-11-27T06:00:00+00:00\nC2,,,,,bad\nTRL,2,,,,\n")
    first = layout.scan(io.BytesIO(data.encode()), validate=False)
    assert (first.records, first.rows, first.bad_rows, first.problems) == (2, 0, 0, [])
    rows, bad = [], []
    full = layout.scan(io.BytesIO(data.encode()), lambda good, doubtful: rows.extend(good.numbers),
                       lambda n, p: bad.append(n))
    assert (full.sha256, rows, bad) == (first.sha256, [2], [3])
    wrong = layout.scan(io.BytesIO(data.replace("TRL,2", "TRL,3").encode()), validate=False)
    assert wrong.problems == ["trailer count '3' does not match 2 data rows"]


def test_csv_lines_without_quotes_are_split_as_csv_reader_reads_them():
    layout = Layout(drops().inbound["customers"])
    data = ('customer_id,name,email,phone,loyalty_card,updated_at\r\n'
            'C1,Ann,a@b.c,,,2026-11-27T06:00:00+00:00\r\n'
            '\r\n'                                                  # blank: no record, still numbered
            'C2,"Smith, Bob",,,,2026-11-27T06:00:00+00:00\n'        # quoted delimiter
            'C3,"two\nlines",,"say ""hi""",,2026-11-27T06:00:00+00:00\n'  # a quoted field spanning lines
            'C4,Cy,,,,2026-11-27T06:00:00+00:00\r'                  # a lone CR ends a line too
            '   \n'                                                 # blank-looking: one field
            'C5,Di,,,,2026-11-27T06:00:00+00:00\n'
            'TRL,6,,,,')                                            # no newline at the end
    reference = [(n, rec) for n, rec in enumerate(csv.reader(io.StringIO(data, newline="")), start=1)
                 if rec and n > 1]
    assert list(records(layout.drop, io.StringIO(data, newline=""))) == reference
    rows, bad = [], []
    out = layout.scan(io.BytesIO(data.encode()), lambda good, doubtful: rows.extend(map(orjson.loads, good.items)),
                      lambda n, p: bad.append(n))
    assert [i["row"] for i in rows] == [2, 4, 5, 6, 8] and bad == [7] and out.problems == []
    assert rows[2]["data"]["name"] == "two\nlines" and rows[2]["data"]["phone"] == 'say "hi"'


def test_a_quoted_field_left_open_makes_the_file_unreadable():
    layout = Layout(drops().inbound["customers"])
    data = 'customer_id,name,email,phone,loyalty_card,updated_at\nC1,"Ann,,,,2026-11-27T06:00:00+00:00\n'
    with pytest.raises(FileProblemError, match="unreadable content"):
        layout.scan(io.BytesIO(data.encode()), validate=False)


@pytest.mark.parametrize("stamp", [
    "2026-11-27T06:00:00+00:00", "2026-11-27T23:59:59-05:30", "2026-11-27T06:00:00-00:00",
    "2026-11-27T06:00:00.000000+01:00", "2026-11-27T06:00:00.5+01:00", "2026-11-27T06:00:00Z",
    "2026-11-27 06:00:00+01:00", "2026-W48-5T06:00:00+00:00", "2026-11-27T06:00:00+0100",
    "2026-11-27T24:00:00+00:00", "2026-11-27T06:00:00", "2026-13-27T06:00:00+00:00",
])
def test_the_inlined_timestamp_check_agrees_with_isoformat(stamp):
    layout = Layout(drops().inbound["customers"])
    rec = ["C1", "Ann", "", "", "", stamp]
    values, _ = layout.row(rec)
    assert fast_row(layout, rec) == values


@pytest.mark.parametrize("stamp", [
    "2026-11-27T00:00:00+00:00", "2026-11-27T09:59:59+23:59", "2026-11-27T10:00:00-23:59",
    "2026-11-27T19:00:00+05:30", "2026-11-27T20:00:00-00:01", "2026-11-27T23:59:59-01:00",
    "2026-11-27T06:00:00-00:00", "2026-11-27T06:00:00+00:00:00", "2026-11-27T06:00+00:00",
    "2026-11-27T06:00:00.100+00:00", "2026-11-27T06:00:00Z", "2026-11-27 06:00:00+00:00",
    "2026-11-27T06:00:00+0000", "20261127T060000+00:00", "2026-11-27T06:00:00",
])
def test_a_value_is_kept_as_it_is_exactly_when_isoformat_would_write_it_so(stamp):
    parsed = datetime.fromisoformat(stamp)  # what the row loop asks CANONICAL_STAMP about
    assert (CANONICAL_STAMP(stamp) is not None) == (parsed.tzinfo is not None and parsed.isoformat() == stamp)


def test_a_drop_folder_wakes_its_watcher_when_a_file_is_written_renamed_or_touched(tmp_path):
    folder, elsewhere = tmp_path / "drop", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    wakeup = FolderWakeup(folder)
    try:
        assert wakeup.wait(0.01) is False  # nothing changed
        (folder / "customers_1.csv").write_text("x\n")
        assert wakeup.wait(30) is True
        (elsewhere / "customers_2.csv").write_text("x\n")
        (elsewhere / "customers_2.csv").rename(folder / "customers_2.csv")
        assert wakeup.wait(30) is True
        (folder / "customers_1.csv.done").touch()
        assert wakeup.wait(30) is True
        assert wakeup.wait(0.01) is False  # the events were drained
    finally:
        wakeup.close()


def test_a_folder_inotify_cannot_watch_is_polled(tmp_path, caplog):
    """No watch (inotify_add_watch fails: ENOENT): a warning names the folder, and `wait`
    takes its whole timeout, so the caller's loop rescans every interval instead of spinning."""
    folder = tmp_path / "missing"
    with caplog.at_level("WARNING", logger="legacy_wrappers.filedrop.wakeup"):
        wakeup = FolderWakeup(folder)
    try:
        assert [r.getMessage() for r in caplog.records] == [
            f"file drop folder {folder} is polled (inotify: No such file or directory)"]
        folder.mkdir()
        (folder / "customers_1.csv").write_text("x\n")  # not watched: no wake-up, the poll finds it
        started = time.monotonic()
        assert wakeup.wait(0.2) is False
        assert time.monotonic() - started >= 0.2
    finally:
        wakeup.close()


def test_a_chunk_envelope_is_the_json_pydantic_would_write():
    from legacy_wrappers.filedrop.inbound import RowChunk
    from services.files.mapping import batch_event, drop_options
    layout = Layout(drops().inbound["customers"], **drop_options("customers"))
    data = ("customer_id,name,email,phone,loyalty_card,updated_at\n"
            'C1,"Zoë ""Q"" Müller\\",,+49 30 1,,2026-11-27T06:00:00+00:00\n'  # quotes, a backslash
            "C0,,,,,2026-11-27T06:00:00+00:00\n"                                 # skipped
            "C2,Ann\tTab,a@b.c,,,2026-11-27T07:00:00Z\n")                       # a tab, another form
    chunks = []
    layout.scan(io.BytesIO(data.encode()), lambda good, doubtful: chunks.append(RowChunk(
        "customers", "customers_x.csv", "a" * 64, 3, good, doubtful)), key_prefix=f"{'a' * 64}:")
    event, trace = batch_event(chunks[0], "legacy/filedrop/customers")
    assert not chunks[0].rows  # taken: they live as long as the event, not the worker
    parsed = CloudEvent.from_json(event.to_json())
    assert event.to_json() == parsed.to_json()  # byte for byte what pydantic writes of it
    batch = EventBatchV1.model_validate(parsed.data)
    assert [i.idempotencykey for i in batch.items] == [f"{'a' * 64}:2", f"{'a' * 64}:4"]
    assert [(c.customer_id, c.name, c.updated_at.isoformat()) for c in batch.typed_items()] == [
        ("C1", 'Zoë "Q" Müller\\', "2026-11-27T06:00:00+00:00"), ("C2", "Ann\tTab", "2026-11-27T07:00:00+00:00")]
    assert trace == {"sha256": "a" * 64, "runs": [(2, 2), (4, 4)], "names": ["C1", "C2"]}  # a row skipped
    assert [i.model_dump() for i in FileRows.model_validate(trace).items()] == [
        {"key": f"{'a' * 64}:2", "row": 2, "refs": ["C1"]}, {"key": f"{'a' * 64}:4", "row": 4, "refs": ["C2"]}]


def test_the_ledger_keeps_checkpoints_and_outcomes_across_reopening(tmp_path):
    from legacy_wrappers.filedrop.ledger import Ledger
    path = tmp_path / "var" / "filedrops.db"
    ledger = Ledger(path)
    assert ledger.begin("customers", "a" * 64, "c1.csv", 1000, 2)["ROWS_DONE"] == 0
    ledger.checkpoint("customers", "a" * 64, 301)
    ledger.remember("customers", "evil.csv", "1:2:3", "refused")
    ledger.remember("customers", "evil.csv", "1:2:3", "refused")  # once, not twice
    ledger.out_pending("loyalty_points", "POINTS_1.dat", ["k1", "k2"])
    with pytest.raises(ZeroDivisionError), ledger._write() as conn:  # a failed write leaves nothing
        conn.execute('UPDATE "FD_FILE" SET "ROWS_DONE" = 999')
        1 / 0
    ledger.close()

    again = Ledger(path)  # a restarted wrapper resumes after the last checkpoint
    record = again.begin("customers", "a" * 64, "c1.csv", 1000, 2)
    assert (record["ROWS_DONE"], record["ATTEMPTS"], record["STATE"]) == (301, 2, "in_progress")
    again.finish("customers", "a" * 64, "c1.csv", "done", rows=998)
    done = again.file("customers", "a" * 64)
    assert (done["ROWS"], done["BAD_ROWS"]) == (998, 2)
    assert again.seen("customers", "evil.csv", "1:2:3") == "refused"
    assert again.seen("customers", "evil.csv", "x") is None
    assert again.counts_since("customers", "") == {"done": 1} and again.in_progress("customers") == 0
    assert again.forget_failure("customers", "a" * 64) == "done" and again.file("customers", "a" * 64)
    assert again.written_keys("loyalty_points", ["k1", "k3"]) == {"k1"}
    assert again.out_pending_files("loyalty_points") == ["POINTS_1.dat"]
    again.out_abandon("loyalty_points", "POINTS_1.dat")
    assert again.written_keys("loyalty_points", ["k1", "k2"]) == set()
    assert again.out_pending_files("loyalty_points") == []
    again.forget("customers", "evil.csv")
    assert again.seen("customers", "evil.csv", "1:2:3") is None
    again.close()


def test_the_ledger_commits_to_disk_before_it_returns(tmp_path):
    """An outbound file's keys must outlive a power cut after its rename (the legacy
    job may have taken the file): every commit is synced, not only the WAL's checkpoints."""
    from legacy_wrappers.filedrop.ledger import Ledger
    ledger = Ledger(tmp_path / "var" / "filedrops.db")
    try:
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        ledger.begin("customers", "a" * 64, "c1.csv", 1000, 0)
        ledger.checkpoint("customers", "a" * 64, 500)  # the one write that need not wait for the disk
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # and FULL again after it
        assert ledger.file("customers", "a" * 64)["ROWS_DONE"] == 500
    finally:
        ledger.close()
