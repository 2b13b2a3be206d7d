"""How a dropped file's bytes become numbered records, streamed and hashed.

Per-record cost is the whole story at 100k+ rows/s, so: a CSV line without the
quote character is split with `str.split` (exactly what `csv.reader` makes of
it; quoted lines, which may span lines, still go through `csv.reader`), and
records reach the row loop in blocks. A file the first pass found plain
(count.py) is read in pass 2 as blocks of text split at its line end, without
a test or a generator step per line: the row loop splits each line itself.

Pass 2 must read the very bytes pass 1 hashed: its rows go out keyed by pass
1's sha256. Pass 1 notes the digest of every prefix that ends on a SEGMENT
boundary (`Digests`); pass 2 reads a segment ahead and hands a segment on only
once the digest up to its end is the one noted (`VerifiedReader`), so a file
rewritten or replaced in between fails before any of its new rows is read.
"""
from __future__ import annotations

import csv
import hashlib
import io
from itertools import islice

from contracts.errors import RetailbusError
from legacy_wrappers.filedrop.config import DropIn
from legacy_wrappers.filedrop.rowcode import json_safe

TEXT_BLOCK = 1 << 16  # characters a plain file's pass 2 reads at a time
RECORD_BLOCK = 512  # records of any other file handed to the row function at a time
SEGMENT = 1 << 20  # bytes pass 2 checks against pass 1's digests before reading any of them


class FileProblemError(RetailbusError):
    """The file as a whole cannot be taken (undecodable, bad trailer, ...)."""


class FileChangedError(FileProblemError):
    """The file's bytes differ from those its first pass hashed: it is taken again later."""


class Digests:
    """The sha256 of a stream, and in `marks` that of each of its prefixes ending on a
    SEGMENT boundary (a copy of the running digest there: no second pass over the bytes)."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.marks: list[bytes] = []

    def update(self, data) -> None:
        view = memoryview(data)
        while view:
            part = view[:SEGMENT - self.bytes % SEGMENT]
            self._sha.update(part)
            self.bytes += len(part)
            if self.bytes % SEGMENT == 0:
                self.marks.append(self._sha.copy().digest())
            view = view[len(part):]

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class HashingReader(io.RawIOBase):
    """A binary file read through, every byte fed to `digest` (a Digests) and counted."""

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


class VerifiedReader(io.RawIOBase):
    """`raw` read a SEGMENT ahead: a segment is handed on once the digest of everything up
    to its end is pass 1's mark there (the last one: pass 1's sha256), else
    FileChangedError. `digest` and `bytes` as HashingReader's, for the pass's Outcome."""

    def __init__(self, raw, sha256: str, marks: list[bytes]):
        self._raw, self._sha256, self._marks = raw, sha256, marks
        self.digest = Digests()
        self.bytes = 0
        self._segment_buffer = memoryview(bytearray(SEGMENT))  # refilled once what it holds is read
        self._ready = memoryview(b"")

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self._ready:
            self._ready = self._segment()
        n = min(len(buffer), len(self._ready))
        buffer[:n] = self._ready[:n]
        self._ready = self._ready[n:]
        self.bytes += n
        return n

    def _segment(self) -> memoryview:
        buffer, n = self._segment_buffer, 0
        while n < SEGMENT and (more := self._raw.readinto(buffer[n:])):
            n += more
        self.digest.update(buffer[:n])
        if n == SEGMENT:
            k = len(self.digest.marks)
            same = k <= len(self._marks) and self.digest.marks[-1] == self._marks[k - 1]
        else:  # the end
            same = self.digest.hexdigest() == self._sha256
        if not same:
            raise FileChangedError(f"the file changed after it was hashed (in the {SEGMENT >> 20} MiB "
                                   f"from byte {self.digest.bytes - n}): nothing more is read")
        return buffer[:n]


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
