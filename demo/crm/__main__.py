"""`python -m demo.crm --db var/crm.db [--port 8092]`."""
from demo.crm.api import make_server
from demo.json_api import command

command("crm", make_server, 8092, "CRM")(prog_name="python -m demo.crm")
