"""The column path of a plain CSV block (columns.py) against the generated row loop:
the same good rows, items, names, doubts and control total for every block, and a
clean block really done by columns (an unfit one handed to the row loop)."""
from __future__ import annotations

import orjson
import pytest

from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop.columns import UnfitBlockError, _ColumnBlock, column_function
from legacy_wrappers.filedrop.rowcode import GoodRows, json_safe, row_function, value_rules
from services.files.mapping import drop_options

pytestmark = pytest.mark.unit

STAMP = "2026-11-27T06:00:00+00:00"
CLEAN = [f"C{i},Customer {i},c{i}@example.com,+49 30 {i},LC{i},{STAMP}" for i in range(1, 6)]
STOCK = fd_config.DropIn(  # a CSV layout with an integer, a date, a control total and a two-field name
    folder="/tmp/x", format="csv", completion={"rule": "marker"}, on_bad_rows="skip_rows",
    fields=[{"name": "store_id", "max_length": 8}, {"name": "sku"}, {"name": "on_hand", "type": "int"},
            {"name": "day", "type": "date"}, {"name": "note", "required": False}],
    header={"prefix": "HDR"}, trailer={"prefix": "TRL", "count": 1, "total": 2, "total_of": "on_hand"})
STOCK_CLEAN = ["S1,100,5,20261127,", "S1,101,007,20261127,ok", "S2,100,-3,20261128,"]


def customers():
    """The customer export's first six columns (the blocks below end at `updated_at`; the
    consent columns after it are optional and add nothing to what is compared here)."""
    drop = fd_config.load(fd_config.DEFAULT_PATH).inbound["customers"]
    return drop.model_copy(update={"fields": drop.fields[:6]})


def both(drop, lines, values_schema=None, name_fields=()):
    """(what the column path makes of `lines`, what the row loop makes of them)."""
    loop = row_function(drop, values_schema, name_fields, lines=True, safe=True)
    columns = column_function(drop, values_schema, name_fields, loop)
    results = []
    for rows in (columns, loop):
        good, others, doubtful = GoodRows(["earlier"], [1], ["C0"]), [], []
        total = rows(range(2, 2 + len(lines)), lines, "k:", good, others, doubtful)
        results.append((good, others, doubtful, total))
    return results


def by_columns(drop, lines, values_schema=None, name_fields=()) -> bool:
    """Whether the column path takes `lines` itself (not the row loop)."""
    try:
        _ColumnBlock(drop, value_rules(drop.fields, values_schema), name_fields).take(
            range(2, 2 + len(lines)), lines, "k:", GoodRows(), [])
        return True
    except UnfitBlockError:
        return False


CUSTOMER_BLOCKS = {
    "clean": (CLEAN, True),
    "optional values empty": (CLEAN[:2] + ["C3,Ann,,,," + STAMP, "C4,Bo,b@c.d,,LC4," + STAMP], True),
    "a stamp in another form": (CLEAN[:2] + ["C3,Ann,a@b.c,,,2026-11-27T06:00:00Z"], True),
    "stamps of every kind": ([f"C{i},Ann,,,,2026-11-{i:02d}T0{i}:00:00{tz}" for i, tz in
                              enumerate(["+00:00", ".5+01:00", "Z", "-00:00", " +02:00", "+00:00"], 1)], True),
    "not an email (doubtful)": (CLEAN[:2] + ["C3,Ann,not-an-email,,," + STAMP], True),
    "non-ASCII": (["C1,Zoë Müller,z@m.de,,," + STAMP, "C2,José,,,," + STAMP], True),
    "required value missing": (CLEAN[:2] + [",Ann,,,," + STAMP], False),
    "padded value": (CLEAN[:2] + ["C3, Ann,,,," + STAMP], False),
    "padded line end": (CLEAN[:2] + ["C3,Ann,,,," + STAMP + " "], False),
    "padded before a delimiter": (CLEAN[:2] + ["C3,Ann ,,,," + STAMP] + CLEAN[3:], False),
    "padded line start": (CLEAN[:2] + [" C3,Ann,,,," + STAMP] + CLEAN[3:], False),
    "padded by a wide space": (CLEAN[:2] + ["C3,Ann\u3000,,,," + STAMP], False),
    "no-break space inside": (CLEAN[:2] + ["C3,Ann\xa0Lee,,,," + STAMP], False),  # any wide space: rows
    "too few fields": (CLEAN[:2] + ["C3,Ann,,," + STAMP], False),
    "too many and too few": (CLEAN[:1] + ["C2,Ann,,,,,," + STAMP, "C3,Bo,," + STAMP] + CLEAN[3:], False),
    "too long": (CLEAN[:2] + ["C1234567890123,Ann,,,," + STAMP], False),
    "trailer look-alike": (CLEAN[:2] + ["TRL,2,,,,"], False),
    "not a timestamp": (CLEAN[:2] + ["C3,Ann,,,,yesterday"], False),
    "no offset": (CLEAN[:2] + ["C3,Ann,,,,2026-11-27T06:00:00"], False),
    "an empty line": (CLEAN[:2] + [""] + CLEAN[3:], False),
}


@pytest.mark.parametrize("schema", [False, True], ids=["no schema", "contract schema"])
@pytest.mark.parametrize("case", CUSTOMER_BLOCKS)
def test_a_customer_block_is_read_alike_by_columns_and_by_the_row_loop(case, schema):
    lines, clean = CUSTOMER_BLOCKS[case]
    options = drop_options("customers") if schema else {}
    assert json_safe("\r\n".join(lines), lines=True)
    columns, loop = both(customers(), lines, **options)
    assert columns == loop
    good = columns[0]
    assert all(item == orjson.dumps(orjson.loads(item)).decode() for item in good.items[1:])
    assert by_columns(customers(), lines, **options) == clean
    if case == "not an email (doubtful)" and schema:
        assert columns[2] == [4]


STOCK_BLOCKS = {
    "clean": (STOCK_CLEAN, True),
    "dates of every day": ([f"S1,{i},1,202611{i:02d}," for i in range(1, 31)], True),
    "not an integer": (STOCK_CLEAN[:2] + ["S2,100,x,20261128,"], False),
    "not a date": (STOCK_CLEAN[:2] + ["S2,100,1,20261131,"], False),
    "an integer missing": (STOCK_CLEAN[:2] + ["S2,100,,20261128,"], False),
    "header look-alike": (STOCK_CLEAN[:2] + ["HDR,1,1,20261128,"], False),
}


@pytest.mark.parametrize("case", STOCK_BLOCKS)
def test_integers_dates_totals_and_two_field_names_are_read_alike(case):
    lines, clean = STOCK_BLOCKS[case]
    columns, loop = both(STOCK, lines, name_fields=("store_id", "sku"))
    assert columns == loop
    assert by_columns(STOCK, lines, name_fields=("store_id", "sku")) == clean
    if case == "clean":
        good, _, _, total = columns
        assert total == 9 and good.names[1:3] == ["S1/100", "S1/101"]
        assert orjson.loads(good.items[2])["data"] == {"store_id": "S1", "sku": "101", "on_hand": 7,
                                                       "day": "2026-11-27", "note": "ok"}


def test_a_schema_without_a_fast_test_leaves_every_block_to_the_row_loop():
    schema = {"properties": {"email": {"type": "string", "format": "email"}}}  # no fast test of a format
    loop = row_function(customers(), schema, (), lines=True, safe=True)
    assert column_function(customers(), schema, (), loop) is loop
