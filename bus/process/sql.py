"""SQL run on the driver's cursor, for the statements a transition runs every time.

SQLAlchemy's own execute costs more Python a statement, even for a cached one, than
SQLite spends on these rows, and a transition runs a handful; its `begin_nested` compiles its
SAVEPOINT and RELEASE anew each time. Here a statement is compiled once per dialect and its
values still travel as bound parameters, never in the text.
"""
from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy.dialects import postgresql, sqlite as sqlite_dialect
from sqlalchemy.engine import Connection


class Compiled:
    """A statement compiled once per dialect and run on the driver's cursor (legacy_wrappers/
    prepared.py does the same for the legacy tables; the messaging core sits below it). Only for
    statements whose values need no type processing (strings, integers, floats)."""

    def __init__(self, statement, keys: tuple[str, ...] = ()):
        self.statement, self.keys = statement, keys
        self._forms: dict[str, tuple] = {}

    def _form(self, dialect) -> tuple:
        """(SQL, its parameters' order when positional, the values of those the dialect added
        itself, e.g. SQLite's OFFSET after a LIMIT)."""
        compiled = self.statement.compile(dialect=dialect, column_keys=list(self.keys) or None)
        own = {k: v for k, v in compiled.params.items() if v is not None and k not in self.keys}
        return compiled.string, compiled.positiontup if compiled.positional else None, own

    def _form_for(self, conn: Connection) -> tuple:
        form = self._forms.get(conn.dialect.name)
        if form is None:
            form = self._forms[conn.dialect.name] = self._form(conn.dialect)
        return form

    def cursor(self, conn: Connection, params: dict):
        sql, order, own = self._form_for(conn)
        if own:
            params = {**own, **params}
        cursor = conn.connection.cursor()
        cursor.execute(sql, [params[k] for k in order] if order is not None else params)
        return cursor

    def many(self, conn: Connection, rows: list[dict]) -> None:
        """The statement for each of `rows`: SQLite's executemany on the driver's cursor (no
        round trips to save there); elsewhere SQLAlchemy's, which sends a batch's rows in one
        statement (a row a round trip would cost more than the Python saved)."""
        if conn.dialect.name != "sqlite":
            conn.execute(self.statement, rows)
            return
        sql, order, own = self._form_for(conn)
        conn.connection.cursor().executemany(sql, [[row[k] for k in order] for row in rows] if not own else
                                             [[{**own, **row}[k] for k in order] for row in rows])


@contextmanager
def savepoint(conn: Connection):
    """One message's savepoint in a batch's transaction (`begin_nested` was the costliest part
    of a transition). A failure rolls back to it (and drops it) and is raised on."""
    cursor = conn.connection.cursor()
    cursor.execute("SAVEPOINT rb_message")
    try:
        yield
    except BaseException:
        cursor.execute("ROLLBACK TO SAVEPOINT rb_message")
        cursor.execute("RELEASE SAVEPOINT rb_message")
        raise
    cursor.execute("RELEASE SAVEPOINT rb_message")


def upsert(table, **conflict):
    """INSERT .. ON CONFLICT DO NOTHING per dialect, built once: building a Core statement costs
    more than running it, and a transition runs a handful."""
    return {name: insert(table).on_conflict_do_nothing(**conflict)
            for name, insert in (("sqlite", sqlite_dialect.insert), ("postgresql", postgresql.insert))}
