"""`Prepared`: a Core statement compiled once per dialect and run through the driver.

SQLAlchemy caches compiled SQL too, but every `conn.execute(stmt, params)`
still builds a cache key, an execution context and the parameter list: about
35 us of Python per statement, more than SQLite spends on one of our small
rows, and a posting runs a dozen. The SQL here is still SQLAlchemy's own
rendering for the dialect and the values still travel as bound parameters,
never in the text. A statement whose parameters need type processing (dates
on SQLite, say) is run the ordinary way instead, so nothing is stored
differently. Many rows go as an executemany on SQLite (one prepared statement
in C) and as multi-row INSERTs on PostgreSQL (SQLAlchemy's rendering of one
row, repeated).
"""
from __future__ import annotations

import re
from itertools import chain
from operator import itemgetter

from sqlalchemy import Insert
from sqlalchemy.engine import Connection, CursorResult

ROWS_PER_STATEMENT = 1000
_VALUES = re.compile(r" VALUES \(((?:%\(\w+\)s(?:, )?)+)\)")  # one row of pyformat placeholders
_BIND = re.compile(r"%\((\w+)\)s")


class Prepared:
    def __init__(self, statement):
        self.statement = statement
        self._forms: dict[tuple, tuple | None] = {}

    def _form(self, conn: Connection, keys: tuple[str, ...]):
        """(sql, positional order or None, the statement's own values such as the 1 of
        `NEXT_NO + 1`) for these parameter keys; None: not preparable."""
        compiled = self.statement.compile(dialect=conn.dialect, column_keys=list(keys))
        if any(compiled._bind_processors.get(name) for name in compiled.bind_names.values()):
            return None
        order = _row_getter(compiled.positiontup) if compiled.positional else None
        fixed = {name: value for name, value in compiled.params.items() if name not in keys}
        return compiled.string, order, fixed

    def _rows_form(self, conn: Connection, keys: tuple[str, ...]):
        """A multi-row INSERT's parts (text before the rows, one row's placeholders,
        text after them, a row dict -> its values in order); None: not this shape."""
        statement = self.statement
        if isinstance(statement, Insert):  # no implicit RETURNING of a generated key
            statement = statement.inline()
        compiled = statement.compile(dialect=conn.dialect, column_keys=list(keys))
        values = _VALUES.search(compiled.string)
        if (not compiled.isinsert or compiled.effective_returning or values is None
                or "%(" in compiled.string[:values.start()] + compiled.string[values.end():]
                or any(compiled._bind_processors.get(name) for name in compiled.bind_names.values())):
            return None
        names = _BIND.findall(values.group(1))
        if set(names) != set(keys):
            return None
        return (compiled.string[:values.start()] + " VALUES ", "(" + ", ".join(["%s"] * len(names)) + ")",
                compiled.string[values.end():], _row_getter(names))

    def _many_rows(self, conn: Connection, keys: tuple[str, ...], params: list[dict]) -> CursorResult:
        """Many rows on PostgreSQL: psycopg2's executemany is a round trip per row, and
        SQLAlchemy's multi-row INSERT (insertmanyvalues) builds a parameter dict per row
        in Python (~45 % of the client's CPU for a batch of postings); an INSERT goes
        as one statement of many rows here, its values bound by the driver."""
        cache_key = ("rows", conn.dialect.name, keys)
        if cache_key not in self._forms:
            self._forms[cache_key] = self._rows_form(conn, keys)
        form = self._forms[cache_key]
        if form is None:
            return conn.execute(self.statement, params)
        head, row, tail, values = form
        for start in range(0, len(params), ROWS_PER_STATEMENT):
            page = params[start:start + ROWS_PER_STATEMENT]
            result = conn.exec_driver_sql(head + ", ".join([row] * len(page)) + tail,
                                          tuple(chain.from_iterable(map(values, page))))
        return result

    def __call__(self, conn: Connection, params: dict | list[dict]) -> CursorResult:
        many = isinstance(params, list)
        first = params[0] if many else params
        keys = tuple(first)
        if many and conn.dialect.name != "sqlite":
            return self._many_rows(conn, keys, params)
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


def _row_getter(names: list[str]):
    """A row dict -> its values as a tuple in `names`' order (itemgetter of one name
    returns the bare value, not a 1-tuple)."""
    get = itemgetter(*names)
    return get if len(names) > 1 else lambda row: (get(row),)
