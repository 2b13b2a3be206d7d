"""The `files` service: the demo estate's batch files on the bus.

The CRM customer export and the warehouse stock snapshot become chunks of
`crm.customer_exported.v1` / `erp.stock_changed.v1` rows (envelope `event.batch.v1`);
posted sales and returns become the legacy loyalty job's points file, while
config/loyalty.yaml's accrual mode says the file earns (`file`, `shadow`); in
`api` the loyalty platform earns and the file gets no line for the posting.
"""
from __future__ import annotations

from contracts.envelope import CloudEvent
from legacy_wrappers.filedrop.inbound import RowChunk, file_drop
from legacy_wrappers.filedrop.outbound import BatchFileWriter, batch_file_consumer
from legacy_wrappers.filedrop.retention import FileRetention
from bus.extensions import EventPublisher, event_message
from bus.journal import JournalHops
from bus.metrics_http import MetricsHttp
from bus.retention import retention_timer
from services.files.appliers import AppliedDrops
from services.files.mapping import batch_event, drop_options, points_record
from services.loyalty.config import LoyaltyRules


class FilesService:
    name = "files"

    events = EventPublisher()
    points_file = BatchFileWriter("loyalty_points")
    metrics = MetricsHttp()
    hops = JournalHops()
    retention = FileRetention()
    applied = AppliedDrops()  # refuses to start with a drop whose rows no service applies
    loyalty = LoyaltyRules(optional=True)  # the accrual mode: does the points file earn this posting?

    @retention_timer()
    def prune(self) -> dict[str, int]:
        """Ledger rows, handed-over outbound files and archive days past RETAILBUS.retention."""
        return self.retention.prune()

    @file_drop("customers", **drop_options("customers"))
    def on_customer_export(self, chunk: RowChunk):
        self._publish_rows(chunk, "legacy/filedrop/customers")

    @file_drop("stock", **drop_options("stock"))
    def on_stock_snapshot(self, chunk: RowChunk):
        self._publish_rows(chunk, "legacy/filedrop/stock")

    def _publish_rows(self, chunk: RowChunk, source: str):
        event, trace = batch_event(chunk, source)  # takes the chunk's rows
        message = event_message(event, self.events.exchange)
        # noted before the publish (the erp may consume the chunk before our confirm), kept only if it succeeds
        self.hops.add("read", id=event.id, correlationid=event.correlationid, file_rows=trace, detail={
            "file": chunk.file, "chunk": chunk.index, "rows": f"{trace['runs'][0][0]}-{trace['runs'][-1][1]}"})
        # The rows, their items and values go now; only the message's JSON waits for the
        # confirm (8 chunks are in flight, ~1 KB of objects a row against ~300 bytes of JSON).
        del event
        self.events.publish_message(message)

    @batch_file_consumer("erp", ("erp.sale_posted.v1", "erp.return_posted.v1"), writer="loyalty_points")
    def on_posted(self, doc, event: CloudEvent):
        if self.loyalty.config.accrual.mode_at(doc.posted_at) == "api":
            return  # the loyalty platform earns it (services/loyalty), by the same moment
        record = points_record(doc)
        if record is not None:
            self.points_file.add(event.idempotencykey, record,
                                 refs=(event.correlationid, event.id, doc.pos_txn_id, doc.doc_no))
