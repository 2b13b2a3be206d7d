"""Records of a CSV or fixed-width file, streamed, typed by the declared layout.

A pass reads the file once, hashes every byte and yields rows, so memory
stays flat whatever the file size. A row comes out either as its values or as
the list of (column, value, reason) problems that make it bad. Conversion is a
converter per field compiled from the layout (which pydantic validates, see
config.py) rather than a pydantic model per row: at ~300k rows/s a model per
row would cost more than the rest of the pipeline together.

A pass may skip conversion (`validate=False`): it then only hashes and counts
records, which is all the first look at a file needs when its trailer checks
a count only and bad rows are skipped rather than rejecting the file.

Per-row cost is the whole story at 100k+ rows/s, so: a CSV line without the
quote character is split with `str.split` (exactly what `csv.reader` makes of
it; quoted lines, which may span lines, still go through `csv.reader`), the
converter is straight-line code with the timestamp check inlined, and good
rows leave the pass in lists of `batch` rather than one call per row. A file
the first pass found plain (count.py) is read in pass 2 as blocks of text
split at its line end, without a test or a generator step per line.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from datetime import date, datetime
from itertools import repeat
from typing import Callable

from legacy_wrappers.filedrop.config import DropIn, FieldSpec
from legacy_wrappers.filedrop.count import quick_count

RECORD = "<record>"  # the column name a whole-record problem is reported under
TEXT_BLOCK = 1 << 16  # characters a plain file's pass 2 reads at a time


class FileProblem(Exception):
    """The file as a whole cannot be taken (undecodable, bad trailer, ...)."""


class _HashingRaw(io.RawIOBase):
    def __init__(self, raw, digest):
        self._raw, self.digest, self.bytes = raw, digest, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self._raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.bytes += n
        return n


def _integer(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError("not an integer") from None


def _day(v: str) -> str:
    try:
        if len(v) != 8 or not v.isdigit():
            raise ValueError
        return date(int(v[:4]), int(v[4:6]), int(v[6:])).isoformat()
    except ValueError:
        raise ValueError("not a date (YYYYMMDD)") from None


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
    "str": None, "int": _integer, "date": _day, "timestamp": _stamp}


def _compiled(spec: FieldSpec) -> tuple[str, bool, int, Callable[[str], object] | None]:
    return spec.name, spec.required, spec.max_length or 0, _CONVERTERS[spec.type]


def _canonical_stamp(v: str) -> str:
    """The test that `v`, a value `datetime.fromisoformat` took with an offset, is
    already what `.isoformat()` would give (`YYYY-MM-DDTHH:MM:SS+HH:MM`, hour < 24,
    not `-00:00`): then the value is kept as it is, saving the isoformat call (the
    dearest step of a row). Anything else (fractions, `Z`, a space) is rewritten."""
    return (f"len({v}) == 25 and {v}[4] == {v}[7] == '-' and {v}[10] == 'T' and {v}[13] == {v}[16] == ':'"
            f" and {v}[22] == ':' and ({v}[11] < '2' or {v}[12] < '4')"
            f" and ({v}[19] == '+' or ({v}[19] == '-' and {v}[20:] != '00:00'))")


def _fast_converter(drop: DropIn) -> Callable[[object], dict | None]:
    """A row function generated from the layout: the values of a good record, None for a bad one.

    Straight-line code, one block per field, no per-field calls for text,
    integers and timestamps. It only says *whether* a record is good;
    `Layout.row` (the reference) explains a bad one, and a unit test keeps the
    two in agreement. Field names are identifiers (config.py), used via repr().
    """
    fixed = drop.format == "fixed"
    width = max(f.end for f in drop.fields) if fixed else 0
    lines = ["def convert(rec):",
             f"    if len(rec) != {width if fixed else len(drop.fields)}:", "        return None",
             "    try:"]
    env: dict[str, object] = {"fromiso": datetime.fromisoformat}
    for i, spec in enumerate(drop.fields):
        source = f"rec[{spec.start - 1}:{spec.end}]" if fixed else f"rec[{i}]"
        v = f"v{i}"
        lines.append(f"        {v} = {source}.strip()")
        lines.append(f"        if not {v}:")
        lines.append("            return None" if spec.required else f"            {v} = None")
        if spec.max_length:
            lines.append(f"        elif len({v}) > {spec.max_length}:")
            lines.append("            return None")
        if spec.type == "int":
            lines += ["        else:", f"            {v} = int({v})"]
        elif spec.type == "timestamp":
            lines += ["        else:", f"            d = fromiso({v})", "            if d.tzinfo is None:",
                      "                return None", f"            if not ({_canonical_stamp(v)}):",
                      f"                {v} = d.isoformat()"]
        elif spec.type == "date":
            env[f"c{i}"] = _day
            lines += ["        else:", f"            {v} = c{i}({v})"]
    lines.append("    except ValueError:")
    lines.append("        return None")
    pairs = ", ".join(f"{spec.name!r}: v{i}" for i, spec in enumerate(drop.fields))
    lines.append(f"    return {{{pairs}}}")
    exec(compile("\n".join(lines), f"<layout {drop.folder.name}>", "exec"), env)
    return env["convert"]


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


class Layout:
    def __init__(self, drop: DropIn):
        self.drop = drop
        self._fields = tuple(_compiled(f) for f in drop.fields)
        self.convert = _fast_converter(drop)
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

    def _records(self, text):
        """(record number, record) of every non-empty record but a CSV column-name line."""
        if self.drop.format == "fixed":
            return ((n, line.rstrip("\r\n")) for n, line in enumerate(text, start=1)
                    if line not in ("\n", "\r\n", "\r"))
        return self._csv_records(text)

    def _csv_records(self, text):
        """CSV records numbered as `enumerate(csv.reader(...), 1)` numbers them, empty ones
        left out. `text` splits lines where csv.reader does (newline=""); a line without
        the quote character is one record whose fields are its `split(delimiter)`, and
        one with it (or too long for csv's field limit) is parsed by csv.reader, which
        may take the following lines too (a quoted field spanning lines)."""
        d = self.drop.csv
        delimiter, quotechar = d.delimiter, d.quotechar
        pending: list[str] = []

        def feed():
            while True:
                line = pending.pop() if pending else next(text, None)
                if line is None:
                    return
                yield line

        reader = csv.reader(feed(), delimiter=delimiter, quotechar=quotechar, strict=True)
        limit = csv.field_size_limit()
        n = 0
        if d.header_row:  # record 1, whatever it holds, is the column-name line
            line = next(text, None)
            if line is None:
                return
            n = 1
            if quotechar in line or len(line) > limit:
                pending.append(line)
                next(reader, None)
        for line in text:
            n += 1
            if quotechar in line or len(line) > limit:
                pending.append(line)
                rec = next(reader)
                if rec:
                    yield n, rec
                continue
            line = line.rstrip("\r\n")
            if line:
                yield n, line.split(delimiter)

    def _plain_csv_records(self, text, line_end: str):
        """What `_csv_records` reads from a plain file (no quote character, no empty line,
        no line near csv's field size limit, every line ended by `line_end`: pass 1 found
        it so), read as blocks of text split at `line_end`: no per-line tests and no
        per-line generator step. A block that is not plain means the file changed after
        pass 1: FileProblem (the pass's sha256 would not match either)."""
        d = self.drop.csv
        delimiter, quotechar, limit = d.delimiter, d.quotechar, csv.field_size_limit()
        crlf, split = line_end == "\r\n", str.split
        n, rest, first = 0, "", d.header_row  # record 1, the column-name line, is not a record
        while True:
            block = text.read(TEXT_BLOCK)
            if block:
                block = rest + block
                cut = block.rfind("\n")
                if cut < 0:
                    rest = block
                    continue
                if crlf and (cut == 0 or block[cut - 1] != "\r"):
                    raise FileProblem("the file changed while it was being read (not plain any more)")
                body, rest = block[:cut - crlf], block[cut + 1:]
            elif rest:  # the last line, without a line end
                body, rest = rest, ""
            else:
                return
            lines = body.split(line_end)
            seps = len(lines) - 1  # a lone \r or \n (or, in a \n file, any \r) is not plain
            other_ends = body.count("\r") != seps or body.count("\n") != seps if crlf else "\r" in body
            if other_ends or quotechar in body or "" in lines \
                    or (len(body) > limit and max(map(len, lines)) > limit):
                raise FileProblem("the file changed while it was being read (not plain any more)")
            start = n + 1
            n += len(lines)
            if first:
                first, lines, start = False, lines[1:], start + 1
            yield from zip(range(start, n + 1), map(split, lines, repeat(delimiter)))

    def _control(self, prefix: str | None):
        """A test for a header/trailer record: CSV by its first column, fixed by its start."""
        if prefix is None:
            return lambda rec: False
        if self.drop.format == "csv":
            return lambda rec: rec[0] == prefix
        return lambda rec: rec.startswith(prefix)

    def scan(self, binary, on_rows=None, on_bad=None, validate: bool = True, batch: int = 500,
             line_end: str | None = None) -> Outcome:
        """Read `binary` once: `on_rows([(n, values), ...])` per `batch` good rows (the
        last list may be shorter), `on_bad(n, problems)` per bad one.

        Header and trailer records are recognised and checked here. A trailer-
        looking record is held back until the next record shows it was not the
        last one (then it is a bad row). A pass that only counts reads a plain
        file as blocks of bytes (count.py); any other file from the start again.
        `line_end`: the file is a plain CSV file with these line ends (the first
        pass's `Outcome.line_end`), read as blocks of text (`_plain_csv_records`).
        """
        if not validate and on_rows is None:
            out = self._quick_scan(binary)
            if out is not None:
                return out
            binary.seek(0)
        out = Outcome()
        digest = hashlib.sha256()
        raw = _HashingRaw(binary, digest)
        text = io.TextIOWrapper(io.BufferedReader(raw, 1 << 16), encoding=self.drop.encoding, newline="")
        header, trailer = self.drop.header, self.drop.trailer
        check_header = header is not None
        is_header = self._control(header.prefix if header else None)
        is_trailer = self._control(trailer.prefix if trailer else None)
        total_of = trailer.total_of if trailer else None
        held = None  # (n, record) of a trailer-looking record
        convert = self.convert
        records = self._plain_csv_records(text, line_end) if line_end else self._records(text)
        good: list[tuple[int, dict]] = []
        count = rows = total = 0
        try:
            if header is not None:
                first = next(records, None)
                if first is not None and is_header(first[1]):
                    header = None  # seen
                elif first is not None:
                    records = _chain(first, records)
            for n, rec in records:
                if held is not None:
                    count += 1
                    self._bad(out, on_bad, held[0], "trailer record in the middle of the file")
                    held = None
                if is_trailer(rec):
                    held = (n, rec)
                    continue
                count += 1
                if not validate:
                    continue
                if check_header and is_header(rec):
                    self._bad(out, on_bad, n, "header record in the middle of the file")
                    continue
                values = convert(rec)
                if values is None:
                    out.bad_rows += 1
                    if on_bad is not None:
                        on_bad(n, self.row(rec)[1])
                    continue
                rows += 1
                if total_of:
                    total += values[total_of] or 0
                if on_rows is not None:
                    good.append((n, values))
                    if len(good) >= batch:
                        on_rows(good)
                        good = []
        except (UnicodeDecodeError, csv.Error) as exc:
            raise FileProblem(f"unreadable content: {exc}") from None
        if good:
            on_rows(good)
        out.records, out.rows, out.total = count, rows, total
        if held is not None:
            self._check_trailer(out, held[1], validate)
        elif trailer is not None:
            out.problems.append("trailer record missing")
        if header is not None:
            out.problems.append("header record missing")
        out.sha256, out.bytes = digest.hexdigest(), raw.bytes
        return out

    def _quick_scan(self, binary) -> Outcome | None:
        """The Outcome `scan(validate=False)` finds, for a plain file; None for another."""
        d, header, trailer = self.drop, self.drop.header, self.drop.trailer
        csv_format = d.format == "csv"
        try:
            q = quick_count(binary, d.encoding, d.csv.quotechar if csv_format else None,
                            trailer.prefix if trailer else None)
        except UnicodeDecodeError as exc:
            raise FileProblem(f"unreadable content: {exc}") from None
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
                      line_end=q.line_end if csv_format else None)
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


def _chain(first, rest):
    yield first
    yield from rest
