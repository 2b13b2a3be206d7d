"""The row path of a clean block of plain CSV lines: validated a column at a time.

The generated row loop (rowcode.py) spends a few microseconds of Python on every
row. Most blocks of a real export need none of its per-row decisions: every line
has its fields, no value is padded, missing where it is required, too long or
unconvertible. For such a block a column's checks are single C calls over the
whole column (`"" in col`, `max(map(len, col))`, one conversion per distinct
value), and the items are written by `str.join` over the columns, so the Python
per row is gone: about half the row loop's cost. A block where any check fails is
handed to the row loop whole, which finds and explains its rows exactly as before;
the result is the same either way (unit tests compare the two on blocks of every kind
of row).

It takes the lines of a JSON-safe block of a plain file (records.py:
`plain_csv_blocks`), so a value is written between quotes as it is.
"""
from __future__ import annotations

from datetime import datetime
from itertools import repeat

from contracts.errors import RetailbusError
from legacy_wrappers.filedrop.config import DropIn
from legacy_wrappers.filedrop.rowcode import (
    CANONICAL_STAMP, BlockPattern, GoodRows, RowFunction, ValueRule, day, value_rules)

LINE = "\n"  # where a line ends, once the block's lines are joined (a JSON-safe block has none)
# What `str.strip` removes besides ASCII whitespace (JSON-safe text has no control characters).
WIDE_SPACES = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000"


class UnfitBlockError(RetailbusError):
    """The block needs a row's attention somewhere: the row loop takes it."""


def column_function(drop: DropIn, values_schema: dict | None, name_fields: tuple[str, ...],
                    row_loop: RowFunction) -> RowFunction:
    """A RowFunction for the JSON-safe lines of a plain CSV file (`row_loop`'s form
    `lines=True, safe=True`), which does a clean block by columns and gives any other
    to `row_loop`; `row_loop` itself when the schema makes every row doubtful or the
    control total is not of an integer field (the row loop says which rows, or fails)."""
    rules = value_rules(drop.fields, values_schema)
    total_of = drop.trailer.total_of if drop.trailer else None
    if any(rule.unknown for rule in rules) \
            or total_of and next(f for f in drop.fields if f.name == total_of).type != "int":
        return row_loop
    block = _ColumnBlock(drop, rules, name_fields)

    def rows(ns, lines, prefix, good: GoodRows, others: list, doubtful: list) -> int:
        try:
            return block.take(ns, lines, prefix, good, doubtful)
        except UnfitBlockError:
            return row_loop(ns, lines, prefix, good, others, doubtful)
    return rows


class _ColumnBlock:
    """A layout's column path: `take` does a clean block or raises UnfitBlockError before it adds a row."""

    def __init__(self, drop: DropIn, rules: list[ValueRule], name_fields: tuple[str, ...]):
        self.fields = drop.fields
        self.width = len(drop.fields)
        self.delimiter = drop.csv.delimiter
        self.controls = [c.prefix for c in (drop.header, drop.trailer) if c is not None]
        self.rules = {rule.i: rule for rule in rules}
        self.patterns = {rule.i: BlockPattern(rule.pattern) for rule in rules if rule.pattern is not None}
        names = [f.name for f in drop.fields]
        self.name_at = [names.index(f) for f in name_fields]
        self.total_at = names.index(drop.trailer.total_of) if drop.trailer and drop.trailer.total_of else None

    def take(self, ns, lines: list[str], prefix: str, good: GoodRows, doubtful: list) -> int:
        """Add the block's rows to `good` (returns their control total), or raise Unfit."""
        d = self.delimiter
        text = (d + LINE + d).join(lines)
        if (" " + d) in text or (d + " ") in text or text[:1] == " " or text[-1:] == " " \
                or (not text.isascii() and any(space in text for space in WIDE_SPACES)):
            raise UnfitBlockError("a value to strip")
        flat = text.split(d)
        step, n = self.width + 1, len(lines)  # a line's fields, then LINE as a field of its own
        # Each line has exactly its fields when LINE is every `step`-th field and nowhere else.
        if len(flat) != step * n - 1 or flat[self.width::step] != [LINE] * (n - 1):
            raise UnfitBlockError("a line with other fields")
        columns = [flat[i::step] for i in range(self.width)]
        if any(prefix_ in columns[0] for prefix_ in self.controls):
            raise UnfitBlockError("a header or trailer look-alike")
        texts, total = [], 0  # each field's JSON text: None when it is the column between quotes
        for i, (spec, col) in enumerate(zip(self.fields, columns)):
            empty = "" in col
            if empty and (spec.required or spec.type != "str" or i in self.name_at):
                raise UnfitBlockError("a missing value")
            if spec.max_length and max(map(len, col)) > spec.max_length:
                raise UnfitBlockError("a value too long")
            if spec.type == "int":
                try:
                    values = list(map(int, col))
                except ValueError:
                    raise UnfitBlockError("not an integer") from None
                total += sum(values) if i == self.total_at else 0
                texts.append(list(map(str, values)))
                columns[i] = texts[-1]  # a row's name writes the integer too
                continue
            if spec.type == "timestamp":
                columns[i] = col = _stamps(col)
            elif spec.type == "date":
                columns[i] = col = _dates(col)
            if i in self.rules:
                self._check(self.rules[i], col, empty)
            texts.append([f'"{v}"' if v else "null" for v in col] if empty else None)
        first = len(good.numbers)  # nothing was added before here: an unfit block leaves `good` as it was
        good.items.extend(self._items(ns, prefix, columns, texts))
        good.numbers.extend(ns)
        if self.name_at:
            keys = [columns[i] for i in self.name_at]
            good.names.extend(keys[0] if len(keys) == 1 else map("/".join, zip(*keys)))
        for i, pattern in self.patterns.items():
            pattern([v or None for v in columns[i]] if "" in columns[i] else columns[i],
                    good.numbers, first, doubtful)
        return total

    def _check(self, rule: ValueRule, col: list[str], empty: bool):
        """A block whose values break `rule` has doubtful rows: the row loop names them."""
        if rule.not_null and empty:
            raise UnfitBlockError("a null the schema refuses")
        present = [v for v in col if v] if empty else col
        if present and (rule.min_length and min(map(len, present)) < rule.min_length
                        or rule.max_length is not None and max(map(len, present)) > rule.max_length):
            raise UnfitBlockError("a length the schema refuses")

    def _items(self, ns, prefix: str, columns: list[list[str]], texts: list):
        """Each row's item, `{"row":n,"idempotencykey":"<prefix>n","data":{...}}`, as the
        row loop writes it: one `str.join` per row of constant pieces and column values."""
        number = [f"{n}" for n in ns]  # 2.5x faster than map(str, ns), which calls the type
        parts: list = ['{"row":', number, f',"idempotencykey":"{prefix}', number, '","data":{']
        for k, (spec, col, text) in enumerate(zip(self.fields, columns, texts)):
            parts.append(f'{"," if k else ""}"{spec.name}":')
            parts += [text] if text is not None else ['"', col, '"']
        parts.append("}}")
        merged: list = []
        for part in parts:  # adjacent constants as one piece
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            else:
                merged.append(part)
        return map("".join, zip(*(repeat(p) if isinstance(p, str) else p for p in merged)))


def _stamps(col: list[str]) -> list[str]:
    """Timestamps as the row loop writes them: as they are when canonical (a clean
    export's, as a rule), else `isoformat()`. Each distinct value is parsed once, by
    C calls over the column (a Python call per value would cost as much as the row loop)."""
    values = set(col)
    try:
        parsed = list(map(datetime.fromisoformat, values))
    except ValueError:
        raise UnfitBlockError("not a timestamp") from None
    if all(map(CANONICAL_STAMP, values)):
        return col
    if any(d.tzinfo is None for d in parsed):
        raise UnfitBlockError("a timestamp without an offset")
    seen = {v: v if CANONICAL_STAMP(v) else d.isoformat() for v, d in zip(values, parsed)}
    return list(map(seen.__getitem__, col))


def _dates(col: list[str]) -> list[str]:
    """YYYYMMDD dates as ISO dates, each distinct value once (an export's dates repeat)."""
    try:
        seen = {v: day(v) for v in set(col)}
    except ValueError:
        raise UnfitBlockError("not a date") from None
    return list(map(seen.__getitem__, col))
