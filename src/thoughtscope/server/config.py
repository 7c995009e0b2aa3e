"""Server settings: where it listens, who may talk to it, and the caps that keep one request from owning the machine."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import ServerError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """Defaults follow Jupyter / llama.cpp practice: loopback only, a token for anything else, everything capped.

    max_text_chars / max_prompt_tokens bound what the model reads per request, max_new_tokens what it writes;
    deadline_s ends a generation that runs too long; queue_size is how many model jobs may wait behind the
    running one before the server answers 429.
    """

    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs a token."""
    port: int = 8765
    """TCP port to listen on."""
    token: str | None = None
    """Secret a client must present (Bearer header, cookie, or once as ?token=), at least 8 characters; None: no
    token, loopback only."""
    max_body_bytes: int = 64 * 1024
    """Largest request body (bytes); larger ones get 413."""
    max_query_chars: int = 16 * 1024
    """Longest query string (characters); longer ones get 414."""
    max_text_chars: int = 8000
    """Longest text one request may send (characters)."""
    max_prompt_tokens: int = 512
    """Most tokens of a text or prompt the model reads per request (tokens)."""
    max_new_tokens: int = 128
    """Most tokens one generation may write (tokens)."""
    default_new_tokens: int = 48
    """Tokens a generation writes when the request does not say (tokens)."""
    max_sliders: int = 32
    """Most equalizer sliders in one request (sliders)."""
    deadline_s: float = 60.0
    """Longest a generation may run before it is stopped (seconds)."""
    queue_size: int = 8
    """Model jobs that may wait behind the running one before the server answers 429 (jobs)."""

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ServerError(f"--port must be an integer in 0..65535, got {self.port!r}")
        if not is_loopback(self.host) and not self.token:
            raise ServerError(
                f"--host {self.host} is reachable from other machines: pass --token SECRET (anyone with "
                f"the token can run the model), or keep the default --host 127.0.0.1"
            )
        if self.token is not None and len(self.token) < 8:
            raise ServerError(f"--token must be at least 8 characters, got {len(self.token)}")
        for name in (
            "max_body_bytes",
            "max_query_chars",
            "max_text_chars",
            "max_prompt_tokens",
            "max_new_tokens",
            "max_sliders",
            "queue_size",
        ):
            if getattr(self, name) < 1:
                raise ServerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.default_new_tokens <= self.max_new_tokens:
            raise ServerError(
                f"default_new_tokens must be in 1..max_new_tokens ({self.max_new_tokens}), "
                f"got {self.default_new_tokens}"
            )
        if not self.deadline_s > 0:
            raise ServerError(f"deadline_s must be positive, got {self.deadline_s}")

    def allowed_hosts(self) -> set[str]:
        """Host header values accepted (without port): loopback names, plus the bound host when it is not loopback."""
        hosts = {"127.0.0.1", "localhost", "[::1]", "::1"}
        if not is_loopback(self.host) and self.host not in ("0.0.0.0", "::"):
            hosts.add(self.host)
        return hosts

    @property
    def public(self) -> bool:
        return not is_loopback(self.host)
