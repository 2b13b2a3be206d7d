"""The warehouse stock snapshot end to end: `services.files` and `services.erp` as real
`nameko run` processes, a real broker, a real drop folder and the legacy SQLite database.
Its rows reach STK_LVL and, through the erp's change capture, the stores' stock feed."""
from __future__ import annotations

import json
from contextlib import ExitStack

import amqp
import pytest
from sqlalchemy import text

from demo.batch.jobs import stock_line, write_stock_snapshot
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from bus import topology
from bus.publisher import connection_params
from tests.integration.filedrop_support import write_drops
from tests.integration.support import nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

QUEUE = topology.handler_queue("files", "event.batch.v1", "erp", "on_file_rows")
FEED = "t.stock-snapshot-feed"  # stands in for a store's stock-change queue


def channel_do(uri: str, action):
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        return action(conn.channel())
    finally:
        conn.collect()


def bind_feed(channel):
    topology.declare_exchange(channel, "erp.events")
    channel.queue_delete(FEED)
    channel.queue_declare(FEED, durable=True, auto_delete=False)
    channel.queue_bind(FEED, "erp.events", "erp.stock_changes.v1")


def levels_announced(uri: str) -> dict[tuple[str, str], int]:
    """(store, sku) -> the last level announced on the feed so far (messages stay queued)."""
    def read(channel):
        seen, tags = {}, []
        while (message := channel.basic_get(FEED)) is not None:
            tags.append(message.delivery_tag)
            for item in json.loads(message.body)["data"]["items"]:
                change = item["change"]
                seen[(change["store_id"], change["sku"])] = change["on_hand"]
        for tag in tags:
            channel.basic_reject(tag, requeue=True)
        return seen
    return channel_do(uri, read)


@pytest.mark.timeout(240)
def test_the_stock_snapshot_reaches_stk_lvl_and_the_stores_feed(amqp_uri, tmp_path, request):
    dsn = f"sqlite:///{tmp_path / 'var' / 'legacy_erp.db'}"
    (tmp_path / "var").mkdir()
    engine = engine_for(dsn)
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    request.addfinalizer(engine.dispose)
    config = write_config(tmp_path, amqp_uri, legacy_db=dsn)
    write_drops(tmp_path)
    folder = tmp_path / "drops" / "stock"
    folder.mkdir(parents=True)
    channel_do(amqp_uri, bind_feed)
    # what another test of the session left for the erp's file rows (a customer file's chunks) is not ours
    channel_do(amqp_uri, lambda ch: [ch.queue_delete(q) for q in (QUEUE, f"{QUEUE}.dlq")])
    request.addfinalizer(lambda: channel_do(amqp_uri, lambda ch: [ch.queue_delete(q) for q in (FEED, QUEUE,
                                                                                              f"{QUEUE}.dlq")]))

    def stk_lvl() -> dict[tuple[str, str], int]:
        with engine.connect() as conn:
            return {(s, k): n for s, k, n in conn.execute(text(
                "SELECT STORE_NO, SKU, ON_HAND FROM STK_LVL WHERE SKU IN ('100001', 'WH-NEW-1')"))}

    logs = {name: tmp_path / f"{name}.log" for name in ("erp", "files")}
    with ExitStack() as stack:
        for name, log in logs.items():
            stack.callback(stop, nameko_run(config, f"services.{name}", log))
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[1] == 1, timeout=90), \
            "the erp's file-rows consumer did not start: " + logs["erp"].read_text()[-2000:]

        at = "2099-01-01T06:00:00+00:00"  # counted after the seeded rows last changed
        write_stock_snapshot(folder / "stock_20261127.dat",
                             [stock_line("S001", "100001", 7, at), stock_line("S002", "WH-NEW-1", 12, at)])
        want = {("S001", "100001"): 7, ("S002", "WH-NEW-1"): 12}
        assert wait_for(lambda: {k: v for k, v in stk_lvl().items() if k in want} == want, timeout=90), (
            stk_lvl(), logs["files"].read_text()[-2000:], logs["erp"].read_text()[-2000:])
        assert wait_for(lambda: all(levels_announced(amqp_uri).get(k) == v for k, v in want.items()),
                        timeout=90), (levels_announced(amqp_uri), logs["erp"].read_text()[-2000:])
    assert queue_state(amqp_uri, f"{QUEUE}.dlq")[0] == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM RB_INBOX WHERE CONSUMER = 'erp.on_file_rows'")).scalar() == 2
