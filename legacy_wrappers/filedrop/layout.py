"""Records of a CSV or fixed-width file, streamed, typed by the declared layout.

A pass reads the file once, hashes every byte and hands on good rows, already
written as the JSON items a chunk carries, `batch` at a time, so memory stays
flat whatever the file size. A bad row is reported with the list of (column,
value, reason) problems that make it bad. Rows are converted by a loop
generated from the layout (rowcode.py; the layout is validated by pydantic,
see config.py) rather than by a pydantic model per row: at ~300k rows/s a model
per row would cost more than the rest of the pipeline together. `Layout.row`
is the reference that explains a row the loop refused.

A pass may skip conversion (`validate=False`): it then only hashes and counts
records, which is all the first look at a file needs when its trailer checks
a count only and bad rows are skipped rather than rejecting the file.

Per-row cost is the whole story at 100k+ rows/s, so records reach the row
loop in blocks (records.py), and a clean block of a plain CSV file (JSON-safe,
nothing to refuse, strip or doubt) is validated and written a column at a
time, with no Python per row (columns.py).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from legacy_wrappers.filedrop.columns import column_function
from legacy_wrappers.filedrop.config import DropIn, FieldSpec
from legacy_wrappers.filedrop.count import quick_count
from legacy_wrappers.filedrop.records import (Digests, FileProblemError, HashingReader, VerifiedReader, blocks,
                                              plain_csv_blocks, records)
from legacy_wrappers.filedrop.rowcode import GoodRows, day, json_text, row_function

RECORD = "<record>"  # the column name a whole-record problem is reported under


def _integer(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError("not an integer") from None


def _stamp(v: str) -> str:
    try:
        parsed = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError("not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        raise ValueError("timestamp needs a UTC offset")
    return parsed.isoformat()


# Applied to the stripped, non-empty text; "str" needs nothing beyond the length check.
_CONVERTERS: dict[str, Callable[[str], object] | None] = {
    "str": None, "int": _integer, "date": day, "timestamp": _stamp}


def _compiled(spec: FieldSpec) -> tuple[str, bool, int, Callable[[str], object] | None]:
    return spec.name, spec.required, spec.max_length or 0, _CONVERTERS[spec.type]


@dataclass
class Outcome:
    """What a full pass found: the content hash, counts, and file-level problems.

    `records` counts every data record; `rows`/`bad_rows` only when validated."""

    sha256: str = ""
    bytes: int = 0
    records: int = 0
    rows: int = 0
    bad_rows: int = 0
    total: int = 0
    problems: list[str] = field(default_factory=list)
    # A plain file's line end (pass 1 read it on blocks, count.py): pass 2 may read it on blocks too.
    line_end: str | None = field(default=None, compare=False)
    marks: list[bytes] = field(default_factory=list, compare=False)  # records.Digests.marks


class Layout:
    """`values_schema`: the JSON schema a consumer checks row values against
    (rowcode.py: rows that break it are reported as doubtful, not refused);
    `name_fields`: the fields whose values, joined by "/", name a row."""

    def __init__(self, drop: DropIn, values_schema: dict | None = None, name_fields: tuple[str, ...] = ()):
        self.drop = drop
        self._fields = tuple(_compiled(f) for f in drop.fields)
        # (records are unsplit lines, every value is JSON-safe) -> the generated row loop
        forms = (False, True) if drop.format == "csv" else (False,)
        self.row_loops = {(lines, safe): row_function(drop, values_schema, name_fields, lines, safe)
                          for lines in forms for safe in (False, True)}
        if drop.format == "csv":  # a plain file's clean blocks a column at a time (columns.py)
            self.row_loops[True, True] = column_function(drop, values_schema, name_fields,
                                                         self.row_loops[True, True])
        if drop.format == "fixed":
            self.width = max(f.end for f in drop.fields)
            self._slices = tuple(slice(f.start - 1, f.end) for f in drop.fields)

    @property
    def needs_validation_first(self) -> bool:
        """Whether the first look at a file must validate every row: to reject the
        whole file on a bad row, or to check a control total (a sum of good values)."""
        trailer = self.drop.trailer
        return self.drop.on_bad_rows == "reject_file" or bool(trailer and trailer.total is not None)

    # -- one record -------------------------------------------------------------

    def row(self, rec) -> tuple[dict | None, list[tuple[str, str, str]]]:
        """(values, []) for a good record, (None, problems) for a bad one."""
        if rec.__class__ is list:
            if len(rec) != len(self._fields):
                return None, [(RECORD, "", f"{len(rec)} columns, layout has {len(self._fields)}")]
            raw = rec
        else:
            if len(rec) != self.width:
                return None, [(RECORD, "", f"record is {len(rec)} characters, layout needs {self.width}")]
            raw = [rec[s] for s in self._slices]
        values, problems = {}, None
        for (name, required, max_length, convert), text in zip(self._fields, raw):
            v = text.strip()
            if not v:
                if required:
                    problems = (problems or []) + [(name, text, "missing")]
                values[name] = None
                continue
            if max_length and len(v) > max_length:
                problems = (problems or []) + [(name, text, f"longer than {max_length} characters")]
                continue
            if convert is None:
                values[name] = v
                continue
            try:
                values[name] = convert(v)
            except ValueError as exc:
                problems = (problems or []) + [(name, text, str(exc))]
        return (None, problems) if problems else (values, [])

    # -- the pass -----------------------------------------------------------------

    def _control(self, prefix: str | None):
        """A test for a header/trailer record: CSV by its first column, fixed by its start."""
        if prefix is None:
            return lambda rec: False
        if self.drop.format == "csv":
            return lambda rec: rec[0] == prefix
        return lambda rec: rec.startswith(prefix)

    def scan(self, binary, on_rows=None, on_bad=None, validate: bool = True, batch: int = 500,
             line_end: str | None = None, key_prefix: str = "", expect: Outcome | None = None) -> Outcome:
        """Read `binary` once: `on_rows(rows, doubtful)` per `batch` good rows (the last
        may be fewer): `GoodRows` whose items are `{"row", "idempotencykey": key_prefix
        + row, "data": values}` as JSON text, and `doubtful` the numbers of those rows
        whose values break the `values_schema`; `on_bad(n, problems)` per bad row.

        Records go to the generated row loop (rowcode.py) a block at a time; what it
        does not take (bad rows, header- and trailer-looking records) is judged here,
        in file order. A trailer-looking record is the trailer only when it is the
        last record; anywhere else it is a bad row. A pass that only counts reads a
        plain file as blocks of bytes (count.py); any other file from the start
        again. `line_end`: the file is a plain CSV file with these line ends (the
        first pass's `Outcome.line_end`), read as blocks of text (`records.plain_csv_blocks`).
        `expect`: the first pass's Outcome; no byte is read that differs from what it hashed
        (`records.VerifiedReader`: FileChangedError instead).
        """
        if not validate and on_rows is None:
            out = self._quick_scan(binary)
            if out is not None:
                return out
            binary.seek(0)
        out = Outcome()
        raw = VerifiedReader(binary, expect.sha256, expect.marks) if expect else HashingReader(binary, Digests())
        digest = raw.digest
        text = io.TextIOWrapper(io.BufferedReader(raw, 1 << 16), encoding=self.drop.encoding, newline="")
        header, trailer = self.drop.header, self.drop.trailer
        is_header = self._control(header.prefix if header else None)
        is_trailer = self._control(trailer.prefix if trailer else None)
        lines = bool(line_end) and validate
        numbered = plain_csv_blocks(self.drop, text, line_end) if lines else blocks(self.drop, records(self.drop, text))
        prefix = json_text(key_prefix)[1:-1]  # written into the items' JSON as it is
        held = None  # (n, record) of a trailer-looking last record
        good, others, doubtful = GoodRows(), [], []
        first, count, rows, total = True, 0, 0, 0

        def hand_over(chunk: GoodRows):
            nonlocal doubtful
            last = chunk.numbers[-1]
            on_rows(chunk, [n for n in doubtful if n <= last])
            doubtful = [n for n in doubtful if n > last]

        try:
            for numbers, recs, safe in numbered:
                if first and recs:
                    first = False
                    if header is not None:
                        rec = recs[0].split(self.drop.csv.delimiter) if lines else recs[0]
                        if is_header(rec):
                            header, numbers, recs = None, numbers[1:], recs[1:]  # seen, not a record
                if not recs:
                    continue
                if held is not None:
                    count += 1
                    self._bad(out, on_bad, held[0], "trailer record in the middle of the file")
                    held = None
                count += len(recs)
                if validate:
                    total += self.row_loops[lines, safe](numbers, recs, prefix, good, others, doubtful)
                else:
                    others = [(n, rec) for n, rec in zip(numbers, recs) if is_trailer(rec)]
                last = numbers[-1]
                for n, rec in others:
                    if is_trailer(rec):
                        if n == last:
                            held, count = (n, rec), count - 1
                        else:
                            self._bad(out, on_bad, n, "trailer record in the middle of the file")
                    elif is_header(rec):
                        self._bad(out, on_bad, n, "header record in the middle of the file")
                    else:
                        out.bad_rows += 1
                        if on_bad is not None:
                            on_bad(n, self.row(rec)[1])
                others.clear()
                if on_rows is None:
                    rows += len(good)
                    good, doubtful = GoodRows(), []
                while on_rows is not None and len(good) >= batch:
                    rows += batch
                    hand_over(good.cut(batch))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise FileProblemError(f"unreadable content: {exc}") from None
        if good:
            rows += len(good)
            hand_over(good)
        out.records, out.rows, out.total = count, rows, total
        if held is not None:
            self._check_trailer(out, held[1], validate)
        elif trailer is not None:
            out.problems.append("trailer record missing")
        if header is not None:
            out.problems.append("header record missing")
        out.sha256, out.bytes, out.marks = digest.hexdigest(), raw.bytes, digest.marks
        return out

    def _quick_scan(self, binary) -> Outcome | None:
        """The Outcome `scan(validate=False)` finds, for a plain file; None for another."""
        d, header, trailer = self.drop, self.drop.header, self.drop.trailer
        csv_format = d.format == "csv"
        try:
            q = quick_count(binary, d.encoding, d.csv.quotechar if csv_format else None,
                            trailer.prefix if trailer else None)
        except UnicodeDecodeError as exc:
            raise FileProblemError(f"unreadable content: {exc}") from None
        if q is None:
            return None
        column_names = csv_format and d.csv.header_row
        first, last = (q.second if column_names else q.first), q.last
        if csv_format:
            first, last = first.split(d.csv.delimiter), last.split(d.csv.delimiter)
        is_trailer = self._control(trailer.prefix if trailer else None)
        if trailer is not None and (is_trailer(first) or q.marked != is_trailer(last)):
            return None  # a trailer-looking record before the last: a bad row, counted exactly
        has_header = header is not None and self._control(header.prefix)(first)
        held = trailer is not None and is_trailer(last)
        out = Outcome(sha256=q.sha256, bytes=q.bytes, records=q.lines - column_names - has_header - held,
                      line_end=q.line_end if csv_format else None, marks=q.marks)
        if held:
            self._check_trailer(out, last, False)
        elif trailer is not None:
            out.problems.append("trailer record missing")
        if header is not None and not has_header:
            out.problems.append("header record missing")
        return out

    @staticmethod
    def _bad(out: Outcome, on_bad, n: int, reason: str):
        out.bad_rows += 1
        if on_bad is not None:
            on_bad(n, [(RECORD, "", reason)])

    @staticmethod
    def _pick(rec, where) -> str:
        if isinstance(where, int):
            return rec[where] if where < len(rec) else ""
        return rec[where[0] - 1:where[1]]

    def _check_trailer(self, out: Outcome, rec, validated: bool):
        t = self.drop.trailer
        if t.count is not None:
            v = self._pick(rec, t.count).strip()
            if not v.isdigit() or int(v) != out.records:
                out.problems.append(f"trailer count {v!r} does not match {out.records} data rows")
        if t.total is not None and validated:
            v = self._pick(rec, t.total).strip()
            try:
                ok = int(v) == out.total
            except ValueError:
                ok = False
            if not ok and not out.bad_rows:  # with bad rows the total cannot be checked
                out.problems.append(
                    f"trailer control total {v!r} does not match {out.total} (sum of {t.total_of})")
