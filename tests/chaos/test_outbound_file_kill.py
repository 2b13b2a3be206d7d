"""The outbound batch file writer SIGKILLed at every step of writing a file, while the
legacy job takes whatever file has its done marker: after a restart every event is in
exactly one file the job can read, none twice. Real processes (the files service under
`nameko run`), a real broker, real folders and the real SQLite ledger."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import amqp
import pytest

from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connection_params
from contracts.envelope import CloudEvent
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1
from demo.batch.jobs import read_points_files
from tests.integration.filedrop_support import write_drops
from tests.integration.support import nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.chaos

QUEUE = topology.handler_queue("erp", "batch", "files", "on_posted")
EVENTS = 100

# The files service with the writer's steps instrumented: at STEP the whole process
# stops (the unpatched sleep blocks every greenthread) after saying so in a file, and
# the test kills it there. Only the points files' own calls are caught.
PAUSING = """
import os, pathlib, sys
from eventlet import patcher
import legacy_wrappers.filedrop.outbound  # noqa: F401  (before the patches: its imports are unpatched)
from legacy_wrappers.filedrop.ledger import Ledger

config, STEP, reached = sys.argv[1:4]
real_sleep = patcher.original("time").sleep


def pause(step):
    if step == STEP:
        pathlib.Path(reached).write_text(step)
        real_sleep(3600)


def ours(path):
    return os.path.basename(str(path)).startswith(".POINTS_") and str(path).endswith(".tmp")


real_fsync = os.fsync
def fsync(fd):
    temp = ours(os.readlink(f"/proc/self/fd/{fd}"))
    if temp:
        pause("temp_written")
    real_fsync(fd)
    if temp:
        pause("fsynced")


real_replace = os.replace
def replace(src, dst):
    if ours(src):
        pause("pending")  # the keys are in the ledger, the file is not renamed yet
    real_replace(src, dst)
    if ours(src):
        pause("renamed")


real_touch = pathlib.Path.touch
def touch(self, *args, **kwargs):
    real_touch(self, *args, **kwargs)
    if self.name.startswith("POINTS_") and self.name.endswith(".done"):
        pause("marker")


real_written = Ledger.out_written
def out_written(self, outbound, name):
    real_written(self, outbound, name)
    pause("ledger_written")


os.fsync, os.replace, pathlib.Path.touch, Ledger.out_written = fsync, replace, touch, out_written
from nameko.cli.main import main
sys.argv = ["nameko", "run", "--config", config, "services.files"]
main()
"""

STEPS = ["temp_written", "fsynced", "pending", "renamed", "marker", "ledger_written"]


def posted(i: int) -> CloudEvent:
    """The i-th posted sale (every fifth a return): one loyalty points record each."""
    cls = ErpReturnPostedV1 if i % 5 == 0 else ErpSalePostedV1
    doc = cls(store_id="S001", pos_txn_id=f"T{i:05d}", doc_no=f"D{i:05d}", business_day=date(2026, 11, 27),
              posted_at=datetime.now(timezone.utc), currency="EUR", total_minor=1000 + i,
              loyalty_card=f"LC{i:010d}", lines=[{"sku": "100001", "quantity": 1, "line_total_minor": 1000 + i}])
    return CloudEvent.new(cls.TYPE, "erp", doc, idempotencykey=f"{cls.TYPE}:{i}")


def delete_queue(uri: str) -> None:
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        conn.channel().queue_delete(QUEUE)
    finally:
        conn.collect()


def legacy_job_takes(out: Path, taken: Path) -> list[str]:
    """What the legacy job may do at any moment: move away every file that has its marker."""
    taken.mkdir(exist_ok=True)
    moved = []
    for marker in out.glob("POINTS_*.dat.done"):
        data = out / marker.name.removesuffix(".done")
        shutil.move(data, taken / data.name)
        shutil.move(marker, taken / marker.name)
        moved.append(data.name)
    return moved


@pytest.mark.timeout(300)
@pytest.mark.parametrize("step", STEPS)
def test_a_file_handed_over_is_never_written_again_after_a_kill_at_any_step(amqp_uri, tmp_path, step, request):
    delete_queue(amqp_uri)
    request.addfinalizer(lambda: delete_queue(amqp_uri))
    write_drops(tmp_path, loyalty_points={"roll_rows": 40, "roll_seconds": 1})
    config = write_config(tmp_path, amqp_uri)
    out, taken, reached = tmp_path / "drops" / "loyalty_points", tmp_path / "taken", tmp_path / "reached"
    log = tmp_path / "files.log"
    writer = subprocess.Popen([sys.executable, "-c", PAUSING, str(config), step, str(reached)], cwd=tmp_path,
                              stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: queue_state(amqp_uri, QUEUE)[1] == 1, timeout=90), log.read_text()[-3000:]
        publisher = ConfirmingPublisher(amqp_uri)
        try:
            events = [posted(i) for i in range(1, EVENTS + 1)]
            assert publisher.publish_many([event_message(e, "erp.events") for e in events]) == [None] * EVENTS
        finally:
            publisher.close()
        assert wait_for(reached.exists, timeout=90), log.read_text()[-3000:]
        assert writer.poll() is None  # stopped at the step, not dead
        handed_over = legacy_job_takes(out, taken)
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop(writer)
    if step in ("marker", "ledger_written"):
        assert handed_over, "the legacy job should have taken the first file"

    normal = nameko_run(config, "services.files", log)
    try:
        assert wait_for(lambda: len(read_points_files(taken) + read_points_files(out)) >= EVENTS
                        and queue_state(amqp_uri, QUEUE)[0] == 0, timeout=120), log.read_text()[-3000:]
    finally:
        assert stop(normal) == 0  # a clean stop writes what is held and acks it
    assert queue_state(amqp_uri, QUEUE)[0] == 0  # every event acked: nothing waits to be written
    records = read_points_files(taken) + read_points_files(out)
    txns = sorted(r[29:69].strip() for r in records)
    assert txns == [f"T{i:05d}" for i in range(1, EVENTS + 1)]  # each event once, none lost
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp file left
