"""What every system API shares when it applies the customer hub's writes.

Each system API (services/erp, services/crm, services/loyalty) takes the
`customer.mastered.v1` the hub addressed to its system (routing key
`customer.mastered.v1.<system>`), in the order the hub published them (an
ordered handler: one message at a time, a failure retried in place), and
applies the writes through that system's interface. The lag from the
hub's commit to the write is measured per system.
"""
from __future__ import annotations

from datetime import datetime, timezone

from prometheus_client import Histogram

from contracts.mastering import CustomerMasteredV1, CustomerWrite

LAG = Histogram("retailbus_customer_propagation_lag_seconds",
                "From the customer hub's commit to the write in a system, per system", ["system"],
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))


def binding(system: str) -> str:
    """The routing key of a system's `customer.mastered.v1`: each system API takes only its own."""
    return f"{CustomerMasteredV1.TYPE}.{system}"


def writes_for(mastered: CustomerMasteredV1, system: str) -> list[CustomerWrite]:
    """The system's writes, the last one per record (they are the record's state, not steps)."""
    last: dict[str, CustomerWrite] = {}
    for write in mastered.writes:
        if write.system == system:
            last.pop(write.record_id, None)
            last[write.record_id] = _merged(last.get(write.record_id), write)
    return list(last.values())


def _merged(earlier: CustomerWrite | None, later: CustomerWrite) -> CustomerWrite:
    """Two writes to one record in one message: the later values over the earlier ones."""
    if earlier is None:
        return later
    values = {**earlier.values.given(), **later.values.given()}
    return later.model_copy(update={"values": type(later.values)(**values), "create": earlier.create or later.create,
                                    "write_golden_id": earlier.write_golden_id or later.write_golden_id})


def applied(system: str, mastered: CustomerMasteredV1, count: int) -> None:
    """`count` writes of `mastered` are in `system` now."""
    if count:
        LAG.labels(system).observe(max(0.0, (datetime.now(timezone.utc) - mastered.mastered_at).total_seconds()))
