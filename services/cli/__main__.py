"""`python -m services.cli`: the same as the `retailbus` console script."""
from services.cli import main

main()
