"""The `files` service: the demo estate's batch files on the bus.

The CRM customer export and the warehouse stock snapshot become chunks of
`customer.updated.v1` / `erp.stock_changed.v1` rows (envelope `event.batch.v1`);
posted sales and returns become the legacy loyalty job's points file.
"""
from __future__ import annotations

from contracts.envelope import CloudEvent
from legacy_wrappers.filedrop.inbound import RowChunk, file_drop
from legacy_wrappers.filedrop.outbound import BatchFileWriter, batch_file_consumer
from services.bus.extensions import EventPublisher
from services.files.mapping import batch_event, points_record


class FilesService:
    name = "files"

    events = EventPublisher()
    points_file = BatchFileWriter("loyalty_points")

    @file_drop("customers")
    def on_customer_export(self, chunk: RowChunk):
        self.events.publish(batch_event(chunk, "legacy/filedrop/customers"))

    @file_drop("stock")
    def on_stock_snapshot(self, chunk: RowChunk):
        self.events.publish(batch_event(chunk, "legacy/filedrop/stock"))

    @batch_file_consumer("erp", ("erp.sale_posted.v1", "erp.return_posted.v1"), writer="loyalty_points")
    def on_posted(self, doc, event: CloudEvent):
        record = points_record(doc)
        if record is not None:
            self.points_file.add(event.idempotencykey, record)
