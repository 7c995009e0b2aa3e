"""`python -m thoughtscope.nla ...` is `thoughtscope nla ...` (kept for scripts and torchrun launch lines)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the `nla` command group; returns 0, or raises SystemExit(2) on a usage error as any CLI would."""
    from ..cli.nla import nla_app

    try:
        nla_app(args=argv, prog_name="thoughtscope nla")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return 0


if __name__ == "__main__":
    from ..cli import main as cli_main

    cli_main(["nla", *sys.argv[1:]])
