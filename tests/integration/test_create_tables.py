"""Processes that start together on a fresh database all create their tables: the ones
that lose the race to create a table look again and go on (`create_tables`)."""
import subprocess
import sys
import textwrap
import time

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration

PROCESSES = 6
CREATOR = textwrap.dedent("""
    import sys, time
    import sqlalchemy as sa
    from legacy_wrappers.legacy_db import create_tables, engine_for
    md = sa.MetaData()
    for n in range(8):
        sa.Table(f"RB_RACE_{n}", md, sa.Column("K", sa.String(20), primary_key=True), sa.Column("V", sa.Text))
    engine = engine_for(sys.argv[1])
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every process starts creating at once
    create_tables(engine, md)
    print("created")
""")


def test_processes_creating_the_same_tables_at_once_all_succeed(legacy_dsn):
    start = time.time() + 3  # past every interpreter's start-up
    processes = [subprocess.Popen([sys.executable, "-c", CREATOR, legacy_dsn, str(start)], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(PROCESSES)]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * PROCESSES, [err[-2000:] for _, err in results]
    assert all(out.strip() == "created" for out, _ in results)
    engine = sa.create_engine(legacy_dsn)
    try:
        assert sorted(n for n in sa.inspect(engine).get_table_names() if n.startswith("RB_RACE_")) == \
            [f"RB_RACE_{n}" for n in range(8)]
    finally:
        engine.dispose()
