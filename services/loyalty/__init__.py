"""The loyalty system API: redemption holds for the tills, accrual and reversal by rules."""
from services.loyalty.service import LoyaltyService  # noqa: F401  (`nameko run services.loyalty`)
