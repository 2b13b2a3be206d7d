"""`python -m demo.loyalty_platform --db var/loyalty.db [--port 8091]`."""
from demo.json_api import command
from demo.loyalty_platform.api import make_server

command("loyalty-platform", make_server, 8091, "LOYALTY_PLATFORM")(prog_name="python -m demo.loyalty_platform")
