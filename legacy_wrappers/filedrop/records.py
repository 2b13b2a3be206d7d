"""How a dropped file's bytes become numbered records, streamed and hashed.

Per-record cost is the whole story at 100k+ rows/s, so: a CSV line without the
quote character is split with `str.split` (exactly what `csv.reader` makes of
it; quoted lines, which may span lines, still go through `csv.reader`), and
records reach the row loop in blocks. A file the first pass found plain
(count.py) is read in pass 2 as blocks of text split at its line end, without
a test or a generator step per line: the row loop splits each line itself.
"""
from __future__ import annotations

import csv
import io
from itertools import islice

from contracts.errors import RetailbusError
from legacy_wrappers.filedrop.config import DropIn
from legacy_wrappers.filedrop.rowcode import json_safe

TEXT_BLOCK = 1 << 16  # characters a plain file's pass 2 reads at a time
RECORD_BLOCK = 512  # records of any other file handed to the row function at a time


class FileProblemError(RetailbusError):
    """The file as a whole cannot be taken (undecodable, bad trailer, ...)."""


class HashingReader(io.RawIOBase):
    """A binary file read through, every byte fed to `digest` and counted."""

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


def records(drop: DropIn, text):
    """(record number, record) of every non-empty record but a CSV column-name line."""
    if drop.format == "fixed":
        return ((n, line.rstrip("\r\n")) for n, line in enumerate(text, start=1)
                if line not in ("\n", "\r\n", "\r"))
    return _csv_records(drop, text)


def _csv_records(drop: DropIn, text):
    """CSV records numbered as `enumerate(csv.reader(...), 1)` numbers them, empty ones
    left out. `text` splits lines where csv.reader does (newline=""); a line without
    the quote character is one record whose fields are its `split(delimiter)`, and
    one with it (or too long for csv's field limit) is parsed by csv.reader, which
    may take the following lines too (a quoted field spanning lines)."""
    d = drop.csv
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


def plain_csv_blocks(drop: DropIn, text, line_end: str):
    """What `records` reads from a plain file (no quote character, no empty line, no
    line near csv's field size limit, every line ended by `line_end`: pass 1 found it
    so), read as blocks of text split at `line_end`: (row numbers, lines) per block,
    each line a record the row loop splits, and whether the block is `json_safe`. A
    block that is not plain means the file changed after pass 1: FileProblemError (the
    pass's sha256 would not match either)."""
    d = drop.csv
    quotechar, limit = d.quotechar, csv.field_size_limit()
    crlf = line_end == "\r\n"
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
                raise FileProblemError("the file changed while it was being read (not plain any more)")
            body, rest = block[:cut - crlf], block[cut + 1:]
        elif rest:  # the last line, without a line end
            body, rest = rest, ""
        else:
            return
        lines = body.split(line_end)
        # A lone \r or \n (or, in a \n file, any \r) is not plain. `in` runs at memchr
        # speed, 8x faster than counting them (and the joined text costs less than a count).
        if crlf:
            joined = "".join(lines)
            other_ends = "\r" in joined or "\n" in joined
        else:
            other_ends = "\r" in body
        if other_ends or quotechar in body or "" in lines \
                or (len(body) > limit and max(map(len, lines)) > limit):
            raise FileProblemError("the file changed while it was being read (not plain any more)")
        start = n + 1
        n += len(lines)
        if first:
            first, lines, start = False, lines[1:], start + 1
        yield range(start, n + 1), lines, json_safe(body, lines=True)


def blocks(drop: DropIn, numbered):
    """(row numbers, records, json-safe) of up to RECORD_BLOCK `(n, record)` pairs at a time."""
    text = "".join if drop.format == "fixed" else lambda recs: "".join(map("".join, recs))
    while block := list(islice(numbered, RECORD_BLOCK)):
        numbers, recs = zip(*block)
        yield numbers, recs, json_safe(text(recs))
