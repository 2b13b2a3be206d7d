"""Processes that start together on a fresh database all create their tables: the ones
that lose the race to create a table look again and go on (`create_tables`), and on
SQLite the ones that lose the race to switch the file to WAL try again (`engine_for`).

The WAL race is rare (about one connect in 150 lost it), so each process races on
many fresh databases in turn, all processes starting each round together: the code
before the WAL retry failed this test in three runs of four."""
import subprocess
import sys
import textwrap
import time

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration

PROCESSES = 6
ROUNDS = {"sqlite": 120, "postgresql": 20}
ROUND_SECONDS = 0.1
CREATOR = textwrap.dedent("""
    import sys, time
    import sqlalchemy as sa
    from legacy_wrappers.legacy_db import create_tables, engine_for
    dsns, start, gap = sys.argv[1].split(","), float(sys.argv[2]), float(sys.argv[3])
    md = sa.MetaData()
    for n in range(8):
        sa.Table(f"RB_RACE_{n}", md, sa.Column("K", sa.String(20), primary_key=True), sa.Column("V", sa.Text))
    for round_no, dsn in enumerate(dsns):
        engine = engine_for(dsn)
        time.sleep(max(0.0, start + round_no * gap - time.time()))  # every process starts the round at once
        create_tables(engine, md)
        engine.dispose()
    print("created", len(dsns))
""")


@pytest.fixture
def fresh_dsns(legacy_dsn, tmp_path):
    """Empty databases: SQLite files, or schemas of an empty PostgreSQL database."""
    if legacy_dsn.startswith("sqlite"):
        return [f"sqlite:///{tmp_path}/race_{n}.db" for n in range(ROUNDS["sqlite"])]
    engine = sa.create_engine(legacy_dsn)
    with engine.begin() as conn:
        for n in range(ROUNDS["postgresql"]):
            conn.exec_driver_sql(f"CREATE SCHEMA race_{n}")
    engine.dispose()
    separator = "&" if "?" in legacy_dsn else "?"
    return [f"{legacy_dsn}{separator}options=-csearch_path%3Drace_{n}" for n in range(ROUNDS["postgresql"])]


def test_processes_creating_the_same_tables_at_once_all_succeed(fresh_dsns):
    start = time.time() + 3  # past every interpreter's start-up
    command = [sys.executable, "-W", "ignore", "-c", CREATOR, ",".join(fresh_dsns), str(start), str(ROUND_SECONDS)]
    processes = [subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(PROCESSES)]
    results = [p.communicate(timeout=120) for p in processes]
    failed = [err[-3000:] for p, (_, err) in zip(processes, results) if p.returncode != 0]
    assert not failed, "\n---\n".join(failed)
    assert [out.strip() for out, _ in results] == [f"created {len(fresh_dsns)}"] * PROCESSES
    for dsn in fresh_dsns:
        engine = sa.create_engine(dsn)
        try:
            assert sorted(n for n in sa.inspect(engine).get_table_names() if n.startswith("RB_RACE_")) == \
                [f"RB_RACE_{n}" for n in range(8)], dsn
        finally:
            engine.dispose()
