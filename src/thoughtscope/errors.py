"""One root for every error thoughtscope raises on bad input, so callers (and the CLI) catch one thing.

Each area keeps its own subclass (``StoreError``, ``SAEError``, ...) defined next to the code that raises it;
they all derive from ``ThoughtscopeError``. Most also derive from ``ValueError`` so that code written before the
root existed keeps catching them. Messages name the file or value at fault and what was expected.
"""

from __future__ import annotations


class ThoughtscopeError(Exception):
    """Root of every thoughtscope error; the CLI prints its message as one line instead of a traceback."""


class ProbeError(ThoughtscopeError, ValueError):
    """Bad probe dataset, site, artefact or fitting input; raised before any forward pass where possible."""


class ServerError(ThoughtscopeError, ValueError):
    """A web server setting that cannot work (host without token, missing artefact named at start)."""
