"""Processes that start together on a fresh database all create their tables: the ones
that lose the race to create a table look again and go on (`create_tables`), and on
SQLite the ones that lose the race to switch the file to WAL try again (`engine_for`).

The WAL race is rare (about one connect in 150 lost it), so each process races on
many fresh databases in turn, all processes starting each round together (a barrier
the test holds: each process says it is ready, the test releases them all at once when
every one is): the code before the WAL retry failed this test in three runs of four."""
import socket
import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration

PROCESSES = 6
ROUNDS = {"sqlite": 120, "postgresql": 20}
CREATOR = textwrap.dedent("""
    import socket, sys
    import sqlalchemy as sa
    from legacy_wrappers.legacy_db import create_tables, engine_for
    dsns, barrier = sys.argv[1].split(","), socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    md = sa.MetaData()
    for n in range(8):
        sa.Table(f"RB_RACE_{n}", md, sa.Column("K", sa.String(20), primary_key=True), sa.Column("V", sa.Text))
    for dsn in dsns:
        engine = engine_for(dsn)
        barrier.sendall(b"r")  # ready for this round
        if barrier.recv(1) != b"g":  # every process starts the round at once
            sys.exit("the test closed the barrier")
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


def release_each_round(server: socket.socket, rounds: int) -> int:
    """The barrier: each round, wait until every process is ready, then release them all.
    Returns the rounds run (fewer when a process ended early: its error is reported)."""
    conns = [server.accept()[0] for _ in range(PROCESSES)]
    try:
        for done in range(rounds):
            if any(conn.recv(1) != b"r" for conn in conns):
                return done
            for conn in conns:
                conn.sendall(b"g")
        return rounds
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.timeout(600)
def test_processes_creating_the_same_tables_at_once_all_succeed(fresh_dsns):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(300)  # generous: six interpreters starting on two shared cores
        command = [sys.executable, "-W", "ignore", "-c", CREATOR, ",".join(fresh_dsns),
                   str(server.getsockname()[1])]
        processes = [subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for _ in range(PROCESSES)]
        try:
            rounds = release_each_round(server, len(fresh_dsns))
            results = [p.communicate(timeout=300) for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
    failed = [err[-3000:] for p, (_, err) in zip(processes, results) if p.returncode != 0]
    assert not failed, "\n---\n".join(failed)
    assert rounds == len(fresh_dsns)
    assert [out.strip() for out, _ in results] == [f"created {len(fresh_dsns)}"] * PROCESSES
    for dsn in fresh_dsns:
        engine = sa.create_engine(dsn)
        try:
            assert sorted(n for n in sa.inspect(engine).get_table_names() if n.startswith("RB_RACE_")) == \
                [f"RB_RACE_{n}" for n in range(8)], dsn
        finally:
            engine.dispose()
