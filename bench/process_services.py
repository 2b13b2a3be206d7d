"""The services bench_process.py runs (python -m bus.runner ... bench.process_services:<Class>).

`BenchTarget` does one step's effect, an inbox key and a row committed together in its SQLite
database (and with BENCH_EFFECT=platform first a keyed EARN of one point at the demo loyalty
platform, as a return's loyalty steps book, 16 calls at a time), in two ways: as a process's
command (`command_handler`, answering the reply) and as a bare `reliable_handler` chain
(publishing the next step's event itself). `BenchProcess` runs a process of BENCH_STEPS such
steps on the engine. The messages borrow the return process's CRM command and reply types
(registered contracts): the effect is the bench's, not the CRM's.
"""
from __future__ import annotations

import os

from eventlet.greenpool import GreenPool
from sqlalchemy import Column, Integer, MetaData, String, Table

from bus.consumer import reliable_handler
from bus.extensions import EventPublisher
from bus.process import ProcessDefinition, ProcessManager, Step, command_handler, process_messages
from contracts.envelope import CloudEvent
from contracts.returns import CrmRecordReturnV1, CrmReturnRecordedV1
from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import LegacyDatabase
from services.loyalty.platform import LoyaltyPlatform

STEPS = int(os.environ.get("BENCH_STEPS", "4"))
PLATFORM = os.environ.get("BENCH_EFFECT") == "platform"
CARD = "BENCH"
BATCH = 64
effects = MetaData()
EFFECTS = Table("BENCH_EFFECT", effects, Column("KEY", String(200), primary_key=True),
                Column("TXN", String(64), nullable=False), Column("STEP", Integer, nullable=False))


def _effect(db, platform, items: list, consumer: str) -> None:
    """The step's effect for each message: (the platform's EARN, keyed by the message,) its key
    claimed and its row, in the worker's transaction."""
    if PLATFORM:
        list(GreenPool(16).imap(lambda item: platform.book(CARD, "EARN", 1, item[1].idempotencykey, "S001",
                                                           key=item[1].idempotencykey), items))
    fresh = inbox.claim_many(db.conn, [(consumer, event.idempotencykey, event.id) for _, event in items])
    rows = [dict(KEY=event.idempotencykey, TXN=step.pos_txn_id, STEP=step.amount_minor)
            for (step, event), new in zip(items, fresh) if new]
    if rows:
        db.conn.execute(EFFECTS.insert(), rows)


class BenchTarget:
    name = "bench_target"

    db = LegacyDatabase(config_key="BENCH_DB_URI", create=(inbox.metadata, effects))
    events = EventPublisher()
    platform = LoyaltyPlatform()

    @command_handler(CrmRecordReturnV1.TYPE, batch=BATCH)
    def on_step(self, items: list) -> list:
        _effect(self.db, self.platform, items, "bench.step")
        return [CrmReturnRecordedV1(store_id=step.store_id, pos_txn_id=step.pos_txn_id, recorded=True)
                for step, _ in items]

    @reliable_handler("bench_target", CrmRecordReturnV1.TYPE, batch=BATCH)
    def on_chain(self, items: list) -> list:
        _effect(self.db, self.platform, items, "bench.chain")
        following = [CloudEvent.new(step.TYPE, "bench", step.model_copy(update={"amount_minor": step.amount_minor + 1}),
                                    subject=step.pos_txn_id, correlationid=event.correlationid,
                                    idempotencykey=f"chain:{step.pos_txn_id}:{step.amount_minor + 1}")
                     for step, event in items if step.amount_minor + 1 < STEPS]
        failed = self.events.publish_many(following) if following else []
        if any(failed):
            raise next(e for e in failed if e)
        return [step.amount_minor for step, _ in items]


def _step(n: int):
    def command(ctx) -> CrmRecordReturnV1:
        start = ctx.data["start"]
        return CrmRecordReturnV1(**{**start, "amount_minor": n})
    return command


BENCH = ProcessDefinition("bench", CrmRecordReturnV1, lambda start: start.pos_txn_id, tuple(
    Step(f"s{n}", target="bench_target", command=_step(n), reply=CrmReturnRecordedV1, timeout=600)
    for n in range(STEPS)))


class BenchProcess:
    name = "bench_process"

    process = ProcessManager(BENCH, config_key="BENCH_PROCESS_DB_URI")

    @reliable_handler("bench_driver", CrmRecordReturnV1.TYPE, batch=BATCH)
    def on_start(self, items: list) -> list:
        return self.process.start_many(items)

    @process_messages(BENCH, batch=BATCH)
    def on_message(self, items: list) -> list:
        return self.process.handle_many(items)
