"""Pass 1 of a file at the speed of reading it: sha256 and record count on blocks of bytes.

The first look at a file that needs no validation only wants its hash, its
record count (for the trailer check) and its first and last records (header
and trailer). Decoding it into lines and handing each line to Python costs
several times the read; for a plain file the count is `block.count(b"\\n")`.
Plain means every line is one non-empty record, as `Layout.scan` reads it:
no quote character (a quoted CSV value may span lines), every line ended by
`\\n` or every one by `\\r\\n` (no lone `\\r`: csv and text mode end a line
there too), no empty line, no line near csv's field size limit, no
trailer-looking line but the last (a trailer in the middle is a bad row),
an encoding whose ASCII bytes mean themselves. For any other
file `quick_count` answers None and the exact pass counts it. The content is
still decoded, so an undecodable file fails here as it does there.
"""
from __future__ import annotations

import codecs
import csv
from dataclasses import dataclass, field

from legacy_wrappers.filedrop.records import Digests

BLOCK = 1 << 20
# Every ASCII character is its one byte, and no byte of another character is an ASCII byte.
ASCII_SAFE = {"utf-8", "ascii", "latin-1", "iso8859-1", "iso8859-15", "cp1252"}


@dataclass
class QuickCount:
    sha256: str
    bytes: int
    lines: int  # every one a non-empty record
    first: str  # the first two lines and the last, without their line ends
    second: str
    last: str
    marked: int  # lines that start with the trailer prefix (counted conservatively: maybe more)
    line_end: str  # every line's: "\n" or "\r\n"
    marks: list[bytes] = field(default_factory=list)  # Digests.marks: what pass 2 checks its reads by


def quick_count(binary, encoding: str, quotechar: str | None, trailer_prefix: str | None) -> QuickCount | None:
    """Read `binary` from the start: a QuickCount of a plain file of 3 lines or more, None
    for any other (the caller then counts it exactly, from the start again)."""
    if codecs.lookup(encoding).name not in ASCII_SAFE:
        return None
    digest = Digests()
    decoder = codecs.getincrementaldecoder(encoding)()
    quote = quotechar.encode(encoding) if quotechar else None
    marker = b"\n" + trailer_prefix.encode(encoding) if trailer_prefix else None
    # A line longer than the field size limit (in bytes at least) leaves a newline out of at
    # least one whole window aligned on the block (blocks are whole windows).
    window = csv.field_size_limit() // 4
    if 2 * window > BLOCK:  # a limit raised that far: the exact pass knows best
        return None
    keep = max(2, len(marker) - 1 if marker else 0)  # bytes of a block to look at with the next one
    # A line is shorter than 2 windows (above), so these hold the first two lines and the last.
    ends = 4 * window + 8
    size = newlines = crs = crlfs = marked = 0
    head = carry = tail = b""
    undecoded = False
    # Only slices of a block outlive it, and no whole block is copied: pass 1 holds about
    # one block at a time, not five.
    while block := _read(binary):
        tail = block[-ends:] if len(block) >= ends else (tail + block)[-ends:]
        size += len(block)
        digest.update(block)
        if undecoded or not block.isascii():
            decoder.decode(block)
            undecoded = bool(decoder.getstate()[0])
        edge = carry + block[:keep]  # what spans the previous block's end and this one's start
        # Lines end in \n or all in \r\n (checked at the end), so an empty line is one of these.
        # `in` finds a byte at memchr speed; counting one is slower: most files have no \r at all
        cr = block.count(b"\r") if b"\r" in block else 0
        empty = b"\n\r\n" if cr else b"\n\n"
        if empty in block or empty in edge or (quote is not None and quote in block) \
                or any(block.find(b"\n", a, a + window) < 0 for a in range(0, len(block) - window + 1, window)):
            return None
        newlines += block.count(b"\n")
        crs += cr
        crlfs += (block.count(b"\r\n") if cr else 0) + (carry.endswith(b"\r") and block.startswith(b"\n"))
        if marker is not None:  # a marker is longer than `keep`: none lies wholly in `edge`'s parts
            marked += block.count(marker) + edge.count(marker)
        head = head or block[:ends]
        carry = block[-keep:]
        block = b""  # let go of it before the next read
    decoder.decode(b"", final=True)
    if crs != crlfs or crs not in (0, newlines) or head.startswith((b"\n", b"\r\n")):
        return None
    lines = newlines + (not tail.endswith(b"\n"))
    if lines < 3:
        return None
    end = tail[:-2] if tail.endswith(b"\r\n") else tail[:-1] if tail.endswith(b"\n") else tail
    first, second = head.split(b"\n", 2)[:2]
    return QuickCount(digest.hexdigest(), size, lines, _text(first, encoding), _text(second, encoding),
                      _text(end[end.rfind(b"\n") + 1:], encoding), marked, "\r\n" if crs else "\n",
                      digest.marks)


def _read(binary) -> bytes:
    """BLOCK bytes, fewer only at the end (an unbuffered read may return less)."""
    block = binary.read(BLOCK)
    while block and len(block) < BLOCK:
        more = binary.read(BLOCK - len(block))
        if not more:
            break
        block += more
    return block


def _text(line: bytes, encoding: str) -> str:
    return line.removesuffix(b"\r").decode(encoding)
