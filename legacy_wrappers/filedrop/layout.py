"""Records of a CSV or fixed-width file, streamed, typed by the declared layout.

One pass reads the file once, hashes every byte and yields rows, so memory
stays flat whatever the file size. A row comes out either as its values or as
the list of (column, value, reason) problems that make it bad. Conversion is a
compiled converter per field rather than a pydantic model per row: at ~300k
rows/s the per-row model cost would be most of the budget; the layout itself
is validated by pydantic (config.py).
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Callable, Iterator

from legacy_wrappers.filedrop.config import ControlRecord, DropIn, FieldSpec

RECORD = "<record>"  # the column name a whole-record problem is reported under


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


class _Missing(ValueError):
    pass


def _converter(spec: FieldSpec) -> Callable[[str], object]:
    def text(v: str):
        v = v.strip()
        if not v:
            if spec.required:
                raise _Missing("missing")
            return None
        if spec.max_length and len(v) > spec.max_length:
            raise ValueError(f"longer than {spec.max_length} characters")
        return v

    def integer(v: str):
        v = text(v)
        if v is None:
            return None
        try:
            return int(v)
        except ValueError:
            raise ValueError("not an integer") from None

    def day(v: str):
        v = text(v)
        if v is None:
            return None
        try:
            if len(v) != 8 or not v.isdigit():
                raise ValueError
            return date(int(v[:4]), int(v[4:6]), int(v[6:])).isoformat()
        except ValueError:
            raise ValueError("not a date (YYYYMMDD)") from None

    def stamp(v: str):
        v = text(v)
        if v is None:
            return None
        try:
            parsed = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError("not an ISO 8601 timestamp") from None
        if parsed.tzinfo is None:
            raise ValueError("timestamp needs a UTC offset")
        return parsed.isoformat()

    return {"str": text, "int": integer, "date": day, "timestamp": stamp}[spec.type]


@dataclass
class Outcome:
    """What a full pass found: the content hash, counts, and file-level problems."""

    sha256: str = ""
    bytes: int = 0
    rows: int = 0
    bad_rows: int = 0
    total: int = 0
    problems: list[str] = field(default_factory=list)


class Layout:
    def __init__(self, drop: DropIn):
        self.drop = drop
        self._conv = [(f.name, _converter(f)) for f in drop.fields]
        if drop.format == "fixed":
            self.width = max(f.end for f in drop.fields)
            self._slices = [(f.start - 1, f.end) for f in drop.fields]

    # -- records ------------------------------------------------------------

    def _records(self, text) -> Iterator[tuple[int, list[str] | str]]:
        if self.drop.format == "csv":
            d = self.drop.csv
            reader = csv.reader(text, delimiter=d.delimiter, quotechar=d.quotechar, strict=True)
            for n, rec in enumerate(reader, start=1):
                if n == 1 and d.header_row:
                    continue
                if rec:
                    yield n, rec
        else:
            for n, line in enumerate(text, start=1):
                line = line.rstrip("\r\n")
                if line:
                    yield n, line

    def _is(self, rec, control: ControlRecord | None) -> bool:
        if control is None:
            return False
        head = rec[0] if isinstance(rec, list) else rec
        return head.startswith(control.prefix) if isinstance(rec, str) else head == control.prefix

    @staticmethod
    def _pick(rec, where) -> str:
        if where is None:
            return ""
        if isinstance(where, int):
            return rec[where] if where < len(rec) else ""
        return rec[where[0] - 1:where[1]]

    def row(self, rec) -> tuple[dict | None, list[tuple[str, str, str]]]:
        """(values, []) for a good record, (None, problems) for a bad one."""
        if isinstance(rec, list):
            if len(rec) != len(self._conv):
                return None, [(RECORD, "", f"{len(rec)} columns, layout has {len(self._conv)}")]
            raw = rec
        else:
            if len(rec) != self.width:
                return None, [(RECORD, "", f"record is {len(rec)} characters, layout needs {self.width}")]
            raw = [rec[a:b] for a, b in self._slices]
        values, problems = {}, []
        for (name, conv), v in zip(self._conv, raw):
            try:
                values[name] = conv(v)
            except ValueError as exc:
                problems.append((name, v, str(exc)))
        return (None, problems) if problems else (values, [])

    # -- the pass -------------------------------------------------------------

    def scan(self, binary, on_row, on_bad) -> Outcome:
        """Read `binary` once: `on_row(n, values)` per good row, `on_bad(n, problems)` per bad one.

        Header and trailer records are recognised and checked here; the trailer
        is only known at the end, so records are yielded one behind.
        """
        out = Outcome()
        digest = hashlib.sha256()
        raw = _HashingRaw(binary, digest)
        text = io.TextIOWrapper(io.BufferedReader(raw, 1 << 16), encoding=self.drop.encoding, newline="")
        total_of = self.drop.trailer.total_of if self.drop.trailer else None
        header, trailer, pending, first = self.drop.header, self.drop.trailer, None, True
        try:
            for n, rec in self._records(text):
                if first:
                    first = False
                    if self._is(rec, header):
                        header = None  # seen
                        continue
                if pending is not None:
                    self._data(out, *pending, on_row, on_bad, total_of)
                pending = (n, rec)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise FileProblem(f"unreadable content: {exc}") from None
        if pending is not None and self._is(pending[1], trailer):
            self._check_trailer(out, pending[1])
        else:
            if pending is not None:
                self._data(out, *pending, on_row, on_bad, total_of)
            if trailer is not None:
                out.problems.append("trailer record missing")
        if header is not None:
            out.problems.append("header record missing")
        out.sha256, out.bytes = digest.hexdigest(), raw.bytes
        return out

    def _data(self, out, n, rec, on_row, on_bad, total_of):
        if self._is(rec, self.drop.trailer) or self._is(rec, self.drop.header):
            out.bad_rows += 1
            on_bad(n, [(RECORD, "", "header/trailer record in the middle of the file")])
            return
        values, problems = self.row(rec)
        if problems:
            out.bad_rows += 1
            on_bad(n, problems)
            return
        out.rows += 1
        if total_of:
            out.total += values[total_of] or 0
        on_row(n, values)

    def _check_trailer(self, out: Outcome, rec):
        t = self.drop.trailer
        counted = out.rows + out.bad_rows
        if t.count is not None:
            v = self._pick(rec, t.count).strip()
            if not v.isdigit() or int(v) != counted:
                out.problems.append(f"trailer count {v!r} does not match {counted} data rows")
        if t.total is not None:
            v = self._pick(rec, t.total).strip()
            try:
                ok = int(v) == out.total
            except ValueError:
                ok = False
            if not ok and not out.bad_rows:  # with bad rows the total cannot be checked
                out.problems.append(
                    f"trailer control total {v!r} does not match {out.total} (sum of {t.total_of})")
