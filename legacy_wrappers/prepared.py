"""`Prepared`: a Core statement compiled once per dialect and run through the driver.

SQLAlchemy caches compiled SQL too, but every `conn.execute(stmt, params)`
still builds a cache key, an execution context and the parameter list: about
35 us of Python per statement, more than SQLite spends on one of our small
rows, and a posting runs a dozen. The SQL here is still SQLAlchemy's own
rendering for the dialect and the values still travel as bound parameters,
never in the text. A statement whose parameters need type processing (dates
on SQLite, say) is run the ordinary way instead, so nothing is stored
differently. Many rows go as an executemany on SQLite (one prepared statement
in C) and, on PostgreSQL, as one INSERT .. SELECT from a single JSON
parameter holding every row (`json_populate_recordset`).

Why JSON on PostgreSQL: psycopg2 binds values by quoting each into the SQL
text, ~2 us of client CPU per value, and the server then parses thousands of
literals per statement. A batch of postings binds ~90 values a sale, which
made quoting and parsing the dearest part of posting. orjson writes the rows
in one C call, psycopg2 quotes one string, and the server reads the JSON
against the table's own row type: client 21 -> 5 us and server 33 -> 14 us
per 9-column row, measured here. Each value still reaches its column through
the column type's input, so lengths and types are checked as for a literal.
"""
from __future__ import annotations

import re
from operator import itemgetter

import orjson
from sqlalchemy import Insert
from sqlalchemy.engine import Connection, CursorResult

_VALUES = re.compile(r" VALUES \(((?:%\(\w+\)s(?:, )?)+)\)")  # one row of pyformat placeholders
_BIND = re.compile(r"%\((\w+)\)s")
_JSON_TYPES = (str, int)  # column types whose values JSON carries exactly


class Prepared:
    def __init__(self, statement):
        self.statement = statement
        self._forms: dict[tuple, tuple | None] = {}

    def _form(self, conn: Connection, keys: tuple[str, ...]):
        """(sql, positional order or None, the statement's own values such as the 1 of
        `NEXT_NO + 1`) for these parameter keys; None: not preparable."""
        compiled = self.statement.compile(dialect=conn.dialect, column_keys=list(keys))
        if any(compiled._bind_processors.get(name) for name in compiled.bind_names.values()) \
                or compiled.effective_returning:
            return None
        order = _row_getter(compiled.positiontup) if compiled.positional else None
        fixed = {name: value for name, value in compiled.params.items() if name not in keys}
        return compiled.string, order, fixed

    def _json_form(self, conn: Connection, keys: tuple[str, ...]) -> str | None:
        """The INSERT as `INSERT INTO t (cols) SELECT cols FROM json_populate_recordset(NULL::t,
        %s) ..` (ON CONFLICT and RETURNING kept); None: not an INSERT of plain columns whose
        values are text or integers, each bound once by its column's name."""
        statement = self.statement
        if not isinstance(statement, Insert):
            return None
        table = statement.table
        try:
            plain = all(table.c[key].name == key and table.c[key].type.python_type in _JSON_TYPES for key in keys)
        except (KeyError, NotImplementedError):
            return None
        compiled = statement.inline().compile(dialect=conn.dialect, column_keys=list(keys))  # no implicit RETURNING
        values = _VALUES.search(compiled.string)
        if not plain or values is None:
            return None
        names = _BIND.findall(values.group(1))  # the columns, in the INSERT's order
        if sorted(names) != sorted(keys) or "%(" in compiled.string[:values.start()] + compiled.string[values.end():]:
            return None
        quote, name = conn.dialect.identifier_preparer.quote, conn.dialect.identifier_preparer.format_table(table)
        return (f"{compiled.string[:values.start()]} SELECT {', '.join(map(quote, names))}"
                f" FROM json_populate_recordset(NULL::{name}, %s){compiled.string[values.end():]}")

    def json_statement(self, conn: Connection, params: list[dict]) -> tuple[str, str] | None:
        """Many rows on PostgreSQL as one statement and its one parameter, the rows in
        JSON (see the module docstring); None for rows that JSON cannot carry exactly
        (bytes, integers beyond 64 bits, keys differing between rows): they go the
        ordinary way, which reports them."""
        keys = tuple(params[0])
        cache_key = ("json", keys)
        if cache_key not in self._forms:
            self._forms[cache_key] = self._json_form(conn, keys)
        sql, same = self._forms[cache_key], set(keys)
        if sql is None or not all(row.keys() == same for row in params):
            return None
        try:
            return sql, orjson.dumps(params).decode()
        except TypeError:
            return None

    def __call__(self, conn: Connection, params: dict | list[dict]) -> CursorResult:
        many = isinstance(params, list)
        first = params[0] if many else params
        keys = tuple(first)
        if many and conn.dialect.name != "sqlite":
            statement = self.json_statement(conn, params)
            if statement is None:
                return conn.execute(self.statement, params)
            sql, rows = statement
            return conn.exec_driver_sql(sql, (rows,))
        cache_key = (conn.dialect.name, keys)
        if cache_key not in self._forms:
            self._forms[cache_key] = self._form(conn, keys)
        form = self._forms[cache_key]
        if form is None:
            return conn.execute(self.statement, params)
        sql, order, fixed = form
        if fixed:
            params = [{**fixed, **p} for p in params] if many else {**fixed, **params}
        if order is None:
            return conn.exec_driver_sql(sql, params)
        if many:
            return conn.exec_driver_sql(sql, list(map(order, params)))
        return conn.exec_driver_sql(sql, order(params))


Statements = list[tuple[Prepared, list[dict]]]  # (statement, its rows), in order


def run_together(conn: Connection, statements: Statements) -> None:
    """Many-row statements whose results no one reads, in order; on PostgreSQL as one
    query (their JSON forms joined by ";"), so one round trip instead of one each.

    Why: every round trip of a green connection hands the event loop to the other
    greenthreads until they yield; the postings' writer, the one serial step of the
    erp, then waited for them once per statement. With a batch's six inserts sent
    together it posted ~9 % more sales a second on PostgreSQL here. If one part has
    no JSON form, each part goes on its own, in order. SQLite runs in the process:
    it has no round trips to save."""
    statements = [(prepared, rows) for prepared, rows in statements if rows]
    if conn.dialect.name != "sqlite":
        joined = [prepared.json_statement(conn, rows) for prepared, rows in statements]
        if joined and None not in joined:
            conn.exec_driver_sql(";\n".join(sql for sql, _ in joined), tuple(rows for _, rows in joined))
            return
    for prepared, rows in statements:
        prepared(conn, rows)


def _row_getter(names: list[str]):
    """A row dict -> its values as a tuple in `names`' order (itemgetter of one name
    returns the bare value, not a 1-tuple)."""
    get = itemgetter(*names)
    return get if len(names) > 1 else lambda row: (get(row),)
