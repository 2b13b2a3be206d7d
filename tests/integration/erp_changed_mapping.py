"""The erp service with one deliberately wrong mapping (cash tenders booked to
GL account 1001 instead of 1000), for shadow mode to catch:
`nameko run tests.integration.erp_changed_mapping`."""
from services.erp import ledger

ledger.TENDER_ACCOUNTS["cash"] = "1001"

from services.erp.service import ErpService  # noqa: E402,F401
