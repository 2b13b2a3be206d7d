"""The row path of a file pass, generated per layout: records in, row items out.

At 100k+ rows/s the pipeline has a few microseconds of Python per row, so a
row is not a chain of calls (split, convert, check, wrap, serialise) but one
iteration of a loop generated from the layout: straight-line code per field
that splits the line, strips, converts and length-checks each value, and
writes the row as the JSON text of the item its chunk event carries,
`{"row","idempotencykey":"<prefix><row>","data":{...}}`, exactly as orjson
writes that dict (unit tests compare them). The loop runs over a block of
records (hundreds per call), and a row leaves it as one string (plus its number
and name), not as dicts and tuples that are built, serialised and freed again:
object churn, not arithmetic, is what a row costs here.

It only sorts records: a record the layout refuses, or one that looks like a
header or trailer, goes to `others` as `(row, record)` for `Layout.scan` to
judge and explain (`Layout.row` is the reference, and unit tests keep the two in
agreement). `values_schema` (the JSON schema of the row values a consumer
expects, e.g. a contract's) adds its per-value constraints that the layout has
not already proved; a row that breaks one still becomes an item and its number
goes to `doubtful`, so the schema's owner can validate that chunk in full and
name the row. Constraints this generator does not know make every row doubtful:
slower, never wrong. A clean block of a plain CSV file is done a column at a time
instead (columns.py); this loop stays the reference for every other block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Callable

import orjson
from pydantic_core import SchemaError, SchemaValidator, ValidationError, core_schema

from legacy_wrappers.filedrop.config import DropIn, FieldSpec

# rows(numbers, records, key_prefix, good, others, doubtful) -> control total of the good rows
RowFunction = Callable[[object, list, str, "GoodRows", list, list], int]

_JSON_TYPE = {"str": "string", "int": "integer", "date": "string", "timestamp": "string"}
_FORMAT_OF = {"date": "date", "timestamp": "date-time"}  # what a converted value already is
_KNOWN = {"type", "minLength", "maxLength", "pattern", "format", "title", "description", "default"}


def day(v: str) -> str:
    """YYYYMMDD as an ISO date; ValueError otherwise."""
    if len(v) != 8 or not v.isdigit():
        raise ValueError("not a date (YYYYMMDD)")
    try:
        return date(int(v[:4]), int(v[4:6]), int(v[6:])).isoformat()
    except ValueError:
        raise ValueError("not a date (YYYYMMDD)") from None


# Whether a value `datetime.fromisoformat` took is already what `.isoformat()` gives
# for it (`YYYY-MM-DDTHH:MM:SS+HH:MM`, hour < 24, not `-00:00`): then it is kept as it
# is, saving the isoformat call (the dearest step of a row). Anything else (fractions,
# `Z`, a space, no offset) is rewritten, or refused when it has no offset. The parse
# proved the digits, so `.` stands for them here: one C call instead of a chain of
# index comparisons, at about half their cost.
CANONICAL_STAMP = re.compile(r"....-..-..T(?:[01].|2[0-3]):..:..(?:\+|-(?!00:00))..:..", re.DOTALL).fullmatch


@dataclass
class GoodRows:
    """Good rows as parallel lists, so a row leaves the loop as few objects: its batch
    item as JSON text, its number, and its name (what `retailbus trace` finds it by)."""

    items: list[str] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    names: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def cut(self, k: int) -> GoodRows:
        """The first `k` rows, taken out of these."""
        head = GoodRows(self.items[:k], self.numbers[:k], self.names[:k])
        del self.items[:k], self.numbers[:k], self.names[:k]
        return head


def json_text(value) -> str:
    """`value` as orjson writes it (the chunk event is written by orjson too)."""
    return orjson.dumps(value).decode()


def json_safe(text: str, lines: bool = False) -> bool:
    """Whether every value cut from `text` is written in JSON as itself in quotes
    (no quote, backslash or control character, which orjson escapes). `lines`:
    `text` is lines whose line ends are cut away, so CR and LF do not count.
    On bytes, where `translate` finds the control characters at C speed (a
    regular expression takes 7x longer); in UTF-8 no other character has such a byte."""
    if '"' in text or "\\" in text:
        return False
    data = text.encode("utf-8", "surrogatepass")
    return len(data.translate(None, _CONTROL_IN_LINES if lines else _CONTROL)) == len(data)


_CONTROL = bytes(range(0x20))
_CONTROL_IN_LINES = _CONTROL.replace(b"\r", b"").replace(b"\n", b"")


def row_function(drop: DropIn, values_schema: dict | None = None, name_fields: tuple[str, ...] = (),
                 lines: bool = False, safe: bool = False) -> RowFunction:
    """The generated row loop of `drop`. Records are lists of fields (CSV) or the
    record's text (fixed width); `lines=True` (CSV only): unsplit lines, split here.
    `safe`: every value of these records is `json_safe` (the caller checked the
    block), so a string is written between quotes without `json_text`.
    `name_fields`: a row's name is these values, joined by "/"."""
    fixed = drop.format == "fixed"
    env: dict[str, object] = {"fromiso": datetime.fromisoformat, "day": day, "js": json_text,
                              "canonical": CANONICAL_STAMP}
    out = ["def rows(ns, recs, prefix, good, others, doubtful):",
           "    item, number, name, total = good.items.append, good.numbers.append, good.names.append, 0",
           "    for n, rec in zip(ns, recs):"]
    if lines:
        out.append(f"        rec = rec.split({drop.csv.delimiter!r})")
    controls = [c.prefix for c in (drop.header, drop.trailer) if c is not None]
    tests = [f"len(rec) != {max(f.end for f in drop.fields) if fixed else len(drop.fields)}"]
    tests += [f"rec.startswith({p!r})" if fixed else f"rec[0] == {p!r}" for p in controls]
    out += [f"        if {' or '.join(tests)}:", *_refuse(12)]
    for i, spec in enumerate(drop.fields):
        out += _field(i, spec, fixed)
    checks, patterned = _schema_checks(drop.fields, values_schema, env)
    if checks:
        out += [f"        if not ({' and '.join(checks)}):", "            doubtful.append(n)"]
    if patterned:  # s<i>: the block's values of field i, in the order of its good rows
        out[2:2] = ["    first = len(good.numbers)",
                    *(f"    s{i} = []; keep{i} = s{i}.append" for i in patterned)]
        out += [f"        keep{i}(v{i})" for i in patterned]
    total_of = drop.trailer.total_of if drop.trailer else None
    if total_of:
        out.append(f"        total += v{[f.name for f in drop.fields].index(total_of)} or 0")
    values = []
    for i, spec in enumerate(drop.fields):
        lines_before, value = _json_value(i, spec, safe)
        out += lines_before
        values.append(f'"{spec.name}":{value}')
    item = '{{"row":{n},"idempotencykey":"{prefix}{n}","data":{{' + ",".join(values) + "}}}}"
    out += [f"        item(f'{item}')", "        number(n)"]
    if name_fields:
        index = [f.name for f in drop.fields].index
        out.append("        name(" + " + '/' + ".join(f"str(v{index(f)})" for f in name_fields) + ")")
    out += [f"    p{i}(s{i}, good.numbers, first, doubtful)" for i in patterned]
    out.append("    return total")
    exec(compile("\n".join(out), f"<rows {drop.folder.name}>", "exec"), env)
    return env["rows"]


def _json_value(i: int, spec: FieldSpec, safe: bool) -> tuple[list[str], str]:
    """How the item's JSON writes field `i`: (lines that compute it, its place in the
    item's f-string). In place where it needs no test: a required integer, or a
    required string of a JSON-safe block (between quotes); else as `j<i>`."""
    v = f"v{i}"
    if spec.required and spec.type == "int":
        return [], f"{{{v}}}"
    if spec.required and safe:
        return [], f'"{{{v}}}"'
    if safe and spec.type != "int":
        return [f"""        j{i} = 'null' if {v} is None else '"' + {v} + '"'"""], f"{{j{i}}}"
    return [f"        j{i} = js({v})"], f"{{j{i}}}"


def _refuse(indent: int) -> list[str]:
    return [" " * indent + "others.append((n, rec))", " " * indent + "continue"]


def _field(i: int, spec: FieldSpec, fixed: bool) -> list[str]:
    """Lines that leave the field's value in `v<i>` or refuse the record."""
    v = f"v{i}"
    source = f"rec[{spec.start - 1}:{spec.end}]" if fixed else f"rec[{i}]"
    out = [f"        {v} = {source}.strip()", f"        if not {v}:",
           *(_refuse(12) if spec.required else [f"            {v} = None"])]
    if spec.max_length:
        out += [f"        elif len({v}) > {spec.max_length}:", *_refuse(12)]
    convert = {"int": f"{v} = int({v})", "date": f"{v} = day({v})",
               "timestamp": f"d = fromiso({v})"}.get(spec.type)
    if convert:
        out += ["        else:", "            try:", f"                {convert}",
                "            except ValueError:", *_refuse(16)]
    if spec.type == "timestamp":  # a canonical value has its offset
        out += [f"            if canonical({v}) is None:", "                if d.tzinfo is None:",
                *_refuse(20), f"                {v} = d.isoformat()"]
    return out


@dataclass(frozen=True)
class ValueRule:
    """What a `values_schema` asks of field `i`'s values that the layout's own checks do
    not imply. The shape (keys, types of a present value) is the consumer's to check on
    a first row; what can differ from row to row is tested per row or per block: null
    or not, and a string's length and pattern."""

    i: int
    not_null: bool = False  # the layout lets the value be empty (None), the schema does not
    min_length: int = 0  # tested only above 1: a stripped non-empty value has one character
    max_length: int | None = None  # only below the layout's own
    pattern: str | None = None
    unknown: bool = False  # a constraint without a fast test: every present value is doubtful


def value_rules(fields: list[FieldSpec], schema: dict | None) -> list[ValueRule]:
    """The `ValueRule`s of `schema` (JSON schema of the row object), for the fields it names."""
    if not schema:
        return []
    properties, rules = schema.get("properties", {}), []
    for i, spec in enumerate(fields):
        prop = properties.get(spec.name)
        if prop is None:
            continue  # an unknown key: the consumer's first-row check refuses the shape
        alternatives = prop.get("anyOf", [prop])
        not_null = not spec.required and not any(a.get("type") == "null" for a in alternatives)
        alt = next((a for a in alternatives if a.get("type") == _JSON_TYPE[spec.type]
                    and a.get("format") in (None, _FORMAT_OF.get(spec.type))), None)
        if alt is None or set(alt) - _KNOWN:
            rules.append(ValueRule(i, not_null, unknown=True))
            continue
        min_length = int(alt.get("minLength", 0))
        shorter = "maxLength" in alt and (spec.max_length is None or spec.max_length > alt["maxLength"])
        pattern = alt.get("pattern")
        rules.append(ValueRule(i, not_null, min_length if min_length > 1 else 0,
                               int(alt["maxLength"]) if shorter else None,
                               pattern if pattern != r"\S" else None))  # a stripped, non-empty value has a non-space
    return rules


def _schema_checks(fields: list[FieldSpec], schema: dict | None, env: dict) -> tuple[list[str], list[int]]:
    """The row loop's tests of `value_rules(fields, schema)`: (per-row tests, the fields
    whose pattern is tested on a block's values at once, as `p<i>` in `env`: `BlockPattern`)."""
    tests, patterned = [], []
    for rule in value_rules(fields, schema):
        v, may_be_none = f"v{rule.i}", not fields[rule.i].required
        if rule.not_null:
            tests.append(f"{v} is not None")
        if rule.unknown:
            tests.append(f"{v} is None" if may_be_none else "False")  # no fast test: doubt every value
            continue
        parts = ([f"len({v}) >= {rule.min_length}"] if rule.min_length else []) \
            + ([f"len({v}) <= {rule.max_length}"] if rule.max_length is not None else [])
        if rule.pattern is not None:
            env[f"p{rule.i}"] = BlockPattern(rule.pattern)
            patterned.append(rule.i)
        if parts:
            ok = " and ".join(parts)
            tests.append(f"({v} is None or ({ok}))" if may_be_none else f"({ok})")
    return tests, patterned


class BlockPattern:
    """A contract's `pattern` for one field, tested on the values of a block of rows in
    one call by pydantic-core: the regular expression engine the contract itself is
    validated with (Rust's; Python's for a pattern Rust's cannot compile, as pydantic
    does with `regex_engine="python-re"`). ~90 ns a value, against ~450 for a `re`
    call per row. None passes: whether a value may be null is a test of its own."""

    def __init__(self, pattern: str):
        try:
            self._validate = _list_of_matches(pattern, "rust-regex")
        except SchemaError:  # e.g. a look-around
            self._validate = _list_of_matches(pattern, "python-re")

    def __call__(self, values: list, numbers: list[int], first: int, doubtful: list[int]):
        """`values[k]` is row `numbers[first + k]`'s: add the rows whose value breaks the
        pattern to `doubtful` (kept in row order)."""
        try:
            self._validate(values)
        except ValidationError as exc:
            broken = {numbers[first + e["loc"][0]] for e in exc.errors()}
            doubtful[:] = sorted(broken.union(doubtful))


def _list_of_matches(pattern: str, engine: str):
    string = core_schema.str_schema(pattern=pattern, regex_engine=engine)
    return SchemaValidator(core_schema.list_schema(core_schema.nullable_schema(string))).validate_python
