"""The simulated CRM: customer profiles, consent flags, an engagement history
(purchases, returns, service interactions) and segments it recomputes from that
history after every change, as engagement platforms do."""
