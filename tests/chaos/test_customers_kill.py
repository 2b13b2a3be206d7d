"""The customer hub SIGKILLed mid-run (issue 21): restarted, the estate ends where an
uninterrupted run ends. The same day of changes as tests/integration/test_customers.py,
for 400 customers, with the customers service killed by its pid while the nightly file,
the CRM's users, the tills and a legacy ERP program are all at work."""
from __future__ import annotations

import sqlite3
import time

import pytest

from tests.integration.customers_estate import READY, CustomersEstate
from tests.integration.customers_workload import differences, run
from tests.integration.support import queue_state, wait_for

pytestmark = pytest.mark.chaos

CUSTOMERS = 400


@pytest.mark.timeout(900)
def test_the_hub_killed_mid_run_ends_in_the_same_state(amqp_uri, tmp_path):
    estate = CustomersEstate(tmp_path, amqp_uri)
    try:
        estate.start()

        at_kill = []

        def records() -> int:
            try:
                return estate.hub_rows("SELECT count(*) FROM CUS_RECORD")[0][0]
            except sqlite3.OperationalError as exc:  # the hub creates its tables as it starts
                if "no such table" not in str(exc):
                    raise
                return 0

        def kill_mid_run():
            assert wait_for(lambda: records() > CUSTOMERS // 2, 120)
            estate.kill("customers")
            at_kill.append(estate.hub_rows("SELECT count(*) FROM CUS_RECORD")[0][0])
            time.sleep(3)  # the sources go on meanwhile: their changes wait in the hub's queues
            estate.start("customers")

        run(estate, CUSTOMERS, during=kill_mid_run)
        assert wait_for(lambda: not differences(estate, CUSTOMERS), 300, interval=2), \
            differences(estate, CUSTOMERS)[:10] + [estate.diagnosis()]
        assert wait_for(estate.settled, 120)
        assert differences(estate, CUSTOMERS) == []
        # each record once, one golden record per customer, nothing merged, nothing parked
        hub = estate.hub_rows("SELECT SYSTEM, count(*), count(DISTINCT GOLDEN_ID) FROM CUS_RECORD GROUP BY SYSTEM")
        assert sorted(hub) == [("crm", CUSTOMERS, CUSTOMERS), ("erp", CUSTOMERS, CUSTOMERS),
                               ("loyalty", CUSTOMERS // 2, CUSTOMERS // 2)]
        assert at_kill[0] < 2.5 * CUSTOMERS, "the hub had done everything before it was killed"
        assert estate.hub_rows("SELECT count(*) FROM CUS_GOLDEN WHERE STATUS = 'retired'") == [(0,)]
        assert estate.tap.of("customer.merged.v1") == [] and estate.tap.of("case.opened.v1") == []
        assert all(queue_state(amqp_uri, f"{queue}.dlq")[0] == 0 for queue in READY.values())
    finally:
        estate.close()
