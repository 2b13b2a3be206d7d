"""The CRM system API: purchases and returns become engagement history, customer updates the profile."""
from services.crm.service import CrmService  # noqa: F401  (`nameko run services.crm`)
