"""The simulated SaaS loyalty platform (shaped like Open Loyalty or Primer's loyalty API).

Members (card, customer id, tier, status); a transaction ledger (EARN, REDEEM,
REFUND, ADJUST, EXPIRE) linked by an order or POS reference; holds, the
authorisations a till takes before it commits a sale, which expire. A member's
balance is the ledger's sum minus the points of live holds, so an expired hold
gives its points back without anybody releasing it.

Points in the ledger are signed by what they do to the balance: EARN and REFUND
add, REDEEM and EXPIRE take away, ADJUST either. No write may take a balance
below zero; the check and the write are one `BEGIN IMMEDIATE` transaction, so two
tills redeeming the last points of one card cannot both succeed.
"""
