"""Retention on both database kinds (SQLite and a real PostgreSQL): inbox keys, the erp's
sent relay rows and journal hops go past their age, younger and unsent ones stay; the
journal's size reading works on each."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, update

from contracts.journal import JournalHopsV1
from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import engine_for
from bus.retention import before
from services.erp import outbox as erp_outbox
from services.journal import store as journal

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc)


def test_inbox_keys_and_sent_relay_rows_go_past_their_age(legacy_dsn):
    engine = engine_for(legacy_dsn)
    inbox.ensure_inbox(engine)
    erp_outbox.metadata.create_all(engine)
    with engine.begin() as conn:
        for key, age in (("old", 50), ("young", 1)):
            assert inbox.claim(conn, "erp.on_pos_sale", key, f"id-{key}")
            conn.execute(update(inbox.INBOX).where(inbox.INBOX.c.IDEM_KEY == key)
                         .values(RECEIVED_TS=(NOW - timedelta(days=age)).isoformat()))
        for name, sent in (("old_sent", NOW - timedelta(days=8)), ("young_sent", NOW), ("unsent", None)):
            conn.execute(insert(erp_outbox.OUTBOX).values(
                EVENT_ID=name, TYPE="t.v1", BODY="{}", CREATED_TS=(NOW - timedelta(days=9)).isoformat(),
                SENT_TS=sent.isoformat() if sent else None))
    assert inbox.prune(engine, before(45), 100) == 1
    assert erp_outbox.prune_sent(engine, before(7), 100) == 1
    with engine.connect() as conn:
        assert set(conn.execute(select(inbox.INBOX.c.IDEM_KEY)).scalars()) == {"young"}
        assert set(conn.execute(select(erp_outbox.OUTBOX.c.EVENT_ID)).scalars()) == {"young_sent", "unsent"}
    engine.dispose()


def test_journal_hops_go_past_their_age_and_its_size_is_read(legacy_dsn):
    engine = journal.open_engine(legacy_dsn)
    now = time.time()
    batch = JournalHopsV1.model_validate({"hops": [
        {"id": f"m{n}", "hop": "written", "outcome": "ok", "time": t, "items": [{"key": f"k{n}", "row": 1}]}
        for n, t in enumerate([now - 9 * 86400, now - 60])]})
    with engine.begin() as conn:
        journal.write(conn, batch, "files")
    assert journal.used_bytes(engine) > 0
    assert journal.prune(engine, before(7).timestamp(), 100) == 1
    with engine.connect() as conn:
        assert [r.id for r in conn.execute(select(journal.HOPS))] == ["m1"]
        assert [r.ref for r in conn.execute(select(journal.REFS))] == ["k1"]
    engine.dispose()
