"""`Prepared`: a Core statement compiled once per dialect and run through the driver.

SQLAlchemy caches compiled SQL too, but every `conn.execute(stmt, params)`
still builds a cache key, an execution context and the parameter list: about
35 us of Python per statement, more than SQLite spends on one of our small
rows, and a posting runs a dozen. The SQL here is still SQLAlchemy's own
rendering for the dialect and the values still travel as bound parameters,
never in the text. A statement whose parameters need type processing (dates
on SQLite, say) is run the ordinary way instead, so nothing is stored
differently.
"""
from __future__ import annotations

from operator import itemgetter

from sqlalchemy.engine import Connection, CursorResult


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

    def __call__(self, conn: Connection, params: dict | list[dict]) -> CursorResult:
        many = isinstance(params, list)
        if many and conn.dialect.name != "sqlite":
            # psycopg2's executemany is one round trip per row; SQLAlchemy's own
            # executemany sends one multi-row INSERT (insertmanyvalues)
            return conn.execute(self.statement, params)
        first = params[0] if many else params
        keys = tuple(first)
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
