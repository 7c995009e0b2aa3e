"""`python -m thoughtscope.cli ...` is the same as the `thoughtscope` command."""

from . import main

main()
