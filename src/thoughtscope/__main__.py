"""`python -m thoughtscope ...` runs the same CLI (and lets torchrun launch any command)."""

from .cli import main

main()
