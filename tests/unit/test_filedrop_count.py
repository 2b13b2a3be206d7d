"""Pass 1 on blocks of bytes (count.py) finds what the exact line-by-line pass finds."""
from __future__ import annotations

import csv
import io

import pytest

from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop import count
from legacy_wrappers.filedrop.layout import FileProblemError, Layout

pytestmark = pytest.mark.unit

COLUMNS = "customer_id,name,email,phone,loyalty_card,updated_at,consent_marketing_email,consent_sms,consent_data_sharing"


def customers(n: int, start: int = 1, name: str = "Customer") -> list[str]:
    return [f"C{i:08d},{name} {i},c{i}@example.com,,LC{i:010d},2026-11-27T06:00:00+00:00,Y,,N"
            for i in range(start, start + n)]


def stock_line(i: int) -> str:
    return f"S001    SKU{i:<17d}{i:9d}2026-11-27T06:00:00+00:00"


def csv_file(rows: list[str], trailer: str | None = "TRL,{n},,,,,,,", end: str = "\r\n", last_end: bool = True) -> bytes:
    lines = [COLUMNS, *rows] + ([trailer.format(n=len(rows))] if trailer else [])
    return (end.join(lines) + (end if last_end else "")).encode()


PLAIN = {  # files count.py counts itself
    "crlf": csv_file(customers(1200)),
    "lf": csv_file(customers(1200), end="\n"),
    "no final line end": csv_file(customers(1200), last_end=False),
    "utf-8 names": csv_file(customers(1200, name="Zoë Müller")),
    "wrong trailer count": csv_file(customers(1200), trailer="TRL,7,,,,,,,"),
    "trailer missing": csv_file(customers(1200), trailer=None),
    "three lines": csv_file(customers(1)),
}
EXACT = {  # files it leaves to the exact pass
    "a quoted value spanning lines": csv_file(customers(600) + ['C1,"two\r\nlines",,,,2026-11-27T06:00:00Z,,,']
                                              + customers(600, start=700)),
    "an empty line": csv_file(customers(600) + [""] + customers(600, start=700)),
    "a lone carriage return": csv_file(customers(600), end="\r"),
    "mixed line ends": csv_file(customers(600)) + csv_file(customers(600, start=700), end="\n", trailer=None),
    "a trailer in the middle": csv_file(customers(600) + ["TRL,600,,,,,,,"] + customers(600, start=700)),
    "a trailer first": csv_file(["TRL,0,,,,,,,"] + customers(600)),
    "two lines": csv_file([], trailer="TRL,0,,,,,,,"),
    "empty": b"",
    "a line beyond the field size limit": csv_file(customers(600) + ["C1," + "x" * 200_000 + ",,,,,,,"]),
}


def outcomes(layout: Layout, data: bytes):
    """(quick pass's Outcome, exact pass's Outcome); an on_rows callback forces the exact pass."""
    quick = layout.scan(io.BytesIO(data), validate=False)
    exact = layout.scan(io.BytesIO(data), lambda rows, doubtful: None, validate=False)
    return quick, exact


@pytest.fixture(params=[count.BLOCK, 256], ids=["1MiB-blocks", "small-blocks"])
def blocks(request, monkeypatch):
    """Also with blocks of 256 bytes (and a field limit to match), so lines, line ends
    and trailers straddle block boundaries."""
    small = request.param < count.BLOCK
    monkeypatch.setattr(count, "BLOCK", request.param)
    if small:
        saved = csv.field_size_limit(480)  # lines up to 120 bytes (the customer header is 113)
        yield request.param
        csv.field_size_limit(saved)
    else:
        yield request.param


@pytest.mark.parametrize("case", PLAIN)
def test_a_plain_file_is_counted_on_blocks_as_the_exact_pass_counts_it(case, blocks):
    layout, data = Layout(fd_config.load(fd_config.DEFAULT_PATH).inbound["customers"]), PLAIN[case]
    d = layout.drop
    assert count.quick_count(io.BytesIO(data), d.encoding, d.csv.quotechar, "TRL") is not None
    quick, exact = outcomes(layout, data)
    assert quick == exact
    assert exact.sha256 and exact.bytes == len(data)


@pytest.mark.parametrize("case", EXACT)
def test_any_other_file_is_left_to_the_exact_pass(case, blocks):
    layout, data = Layout(fd_config.load(fd_config.DEFAULT_PATH).inbound["customers"]), EXACT[case]
    if case == "a line beyond the field size limit" and blocks == 256:
        pytest.skip("the small field limit makes every customer line too long")
    assert layout._quick_scan(io.BytesIO(data)) is None
    try:
        quick = layout.scan(io.BytesIO(data), validate=False)
    except FileProblemError as problem:
        with pytest.raises(FileProblemError, match=str(problem)[:20]):
            layout.scan(io.BytesIO(data), lambda rows, doubtful: None, validate=False)
        return
    assert quick == layout.scan(io.BytesIO(data), lambda rows, doubtful: None, validate=False)
    if case == "a trailer in the middle":
        assert quick.bad_rows == 1 and quick.records == 1201


def test_header_and_trailer_of_a_fixed_width_file(blocks):
    cfg = fd_config.load(fd_config.DEFAULT_PATH).inbound["stock"]
    layout = Layout(cfg.model_copy(update={"on_bad_rows": "skip_rows"}))
    body = [stock_line(i) for i in range(1, 800)]
    good = ["HDR20261127", *body, f"TRL{799:9d}{0:15d}"]
    for lines, problems in [(good, []), (good[1:], ["header record missing"]),
                            (good[:-1], ["trailer record missing"]),
                            (good[:1] + body[:5] + good[-1:], ["trailer count '799' does not match 5 data rows"])]:
        data = ("\n".join(lines) + "\n").encode()
        quick, exact = outcomes(layout, data)
        assert quick == exact and quick.problems == problems
        assert count.quick_count(io.BytesIO(data), "utf-8", None, "TRL") is not None


def test_an_undecodable_file_is_a_file_problem_in_either_pass():
    layout = Layout(fd_config.load(fd_config.DEFAULT_PATH).inbound["customers"])
    data = csv_file(customers(600) + ["C1,\xff\xfe,,,,2026-11-27T06:00:00Z,,,"]).replace(b"\xc3\xbf", b"\xff")
    for scan in (lambda: layout.scan(io.BytesIO(data), validate=False),
                 lambda: layout.scan(io.BytesIO(data), lambda rows, doubtful: None, validate=False)):
        with pytest.raises(FileProblemError, match="unreadable content"):
            scan()


def pass_two(layout: Layout, data: bytes, line_end: str | None):
    """Everything pass 2 hands on: good rows, bad rows with their problems, the Outcome."""
    rows, bad = [], []
    out = layout.scan(io.BytesIO(data), lambda good, doubtful: rows.append((good, doubtful)),
                      lambda n, problems: bad.append((n, problems)), batch=7, line_end=line_end, key_prefix="k:")
    return rows, bad, out


@pytest.fixture(params=[1 << 16, 97], ids=["64k-text-blocks", "97-character-blocks"])
def text_blocks(request, monkeypatch):
    from legacy_wrappers.filedrop import records
    monkeypatch.setattr(records, "TEXT_BLOCK", request.param)


BAD_ROWS = [f"C{i:08d},,c{i}@example.com,,,2026-11-27T06:00:00+00:00,,," for i in range(3)] + [
    "C9,Ann,,,,yesterday,,,", "C10,Bob,,,", "C1234567890123,Cy,,,,2026-11-27T06:00:00Z,,,"]  # no name, a bad time,
# 5 columns, an id too long


@pytest.mark.parametrize("case", [*PLAIN, "bad rows", "bad rows, lf"])
def test_pass_two_reads_a_plain_file_on_blocks_as_the_exact_pass_reads_it(case, blocks, text_blocks):
    layout = Layout(fd_config.load(fd_config.DEFAULT_PATH).inbound["customers"])
    data = PLAIN.get(case) or csv_file(customers(50) + BAD_ROWS + customers(50, start=60),
                                       end="\n" if "lf" in case else "\r\n")
    first = layout.scan(io.BytesIO(data), validate=False)
    assert first.line_end == ("\n" if case in ("lf", "bad rows, lf") else "\r\n")
    on_blocks, exact = pass_two(layout, data, first.line_end), pass_two(layout, data, None)
    assert on_blocks == exact and on_blocks[2].sha256 == first.sha256
    assert exact[0] and (exact[1] or case != "bad rows")


@pytest.mark.parametrize("case", EXACT)
def test_a_file_no_longer_plain_in_pass_two_is_a_file_problem_not_another_reading(case, text_blocks):
    layout = Layout(fd_config.load(fd_config.DEFAULT_PATH).inbound["customers"])
    data = EXACT[case]
    for line_end in ("\r\n", "\n"):
        try:
            on_blocks = pass_two(layout, data, line_end)
        except FileProblemError as problem:
            assert "changed while it was being read" in str(problem)
            continue
        assert on_blocks == pass_two(layout, data, None)  # e.g. a trailer in the middle: read alike
