"""The CRM system API: purchases and returns become engagement history; profiles follow the customer hub."""
from services.crm.service import CrmService  # noqa: F401  (`nameko run services.crm`)
