"""Where in a model we read or write (`Site`), and the two hooks that do it: `capture` (read) and `edit` (write).

A site is a layer plus a stream; `resid.L` is the residual stream output of block L (= hidden_states[L+1]). The
hooks work on any model `thoughtscope.models.load_model` returns, through its generic `layers` handle, and leave
the model exactly as they found it, even after an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import SiteError  # noqa: F401  (re-exported: their old home)

if TYPE_CHECKING:
    from .models import LoadedModel

STREAMS = ("resid",)


# --------------------------------------------------------------------------- sites


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: `resid.L` is the residual stream output of block L (= hidden_states[L+1])."""

    layer: int
    stream: str = "resid"

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise SiteError(f"unknown stream {self.stream!r}: expected one of {', '.join(STREAMS)}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise SiteError(f"site layer must be a non-negative integer, got {self.layer!r}")

    @classmethod
    def parse(cls, spec: str | Site) -> Site:
        if isinstance(spec, Site):
            return spec
        m = re.fullmatch(r"\s*([a-z_]+)\.(\d+)\s*", str(spec))
        if not m:
            raise SiteError(
                f"cannot parse site {spec!r}: expected '<stream>.<layer>' such as 'resid.15' "
                f"(streams: {', '.join(STREAMS)})"
            )
        return cls(layer=int(m.group(2)), stream=m.group(1))

    def __str__(self) -> str:
        return f"{self.stream}.{self.layer}"


def parse_sites(specs: str | Site | Iterable[str | Site]) -> list[Site]:
    """Accept one site, a comma-separated string, or a list; return sorted unique sites."""
    if isinstance(specs, (str, Site)):
        specs = [specs] if isinstance(specs, Site) else [s for s in specs.split(",") if s.strip()]
    sites = sorted({Site.parse(s) for s in specs})
    if not sites:
        raise SiteError("no site given: expected at least one site such as 'resid.15'")
    return sites


# --------------------------------------------------------------------------- hooks


class _StopForward(Exception):
    """Raised by the deepest capture hook so layers past the last needed site are never computed."""


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, new):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


def capture(
    lm: LoadedModel,
    sites: Site | str | Sequence[Site | str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    early_exit: bool = True,
) -> dict[Site, torch.Tensor]:
    """Run one forward pass and return the activation at every site ([B, T, d], detached).

    With early_exit the pass stops right after the deepest site's block, which skips the remaining
    blocks and, above all, the unembedding over the whole vocabulary.
    """
    site_list = parse_sites(sites)
    for s in site_list:
        lm.check_site(s)
    deepest = max(s.layer for s in site_list)
    out: dict[Site, torch.Tensor] = {}
    handles = []

    def make_hook(layer: int):
        wanted = [s for s in site_list if s.layer == layer]

        def hook(module, args, output):
            h = _hidden(output).detach()
            for s in wanted:
                out[s] = h
            if early_exit and layer == deepest:
                raise _StopForward

        return hook

    for layer in sorted({s.layer for s in site_list}):
        handles.append(lm.layers[layer].register_forward_hook(make_hook(layer)))
    try:
        with torch.inference_mode():
            lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


@contextmanager
def edit(lm: LoadedModel, site: Site | str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Within the block, every forward pass sends the site's activation through fn.

    fn may return a new tensor (which replaces the activation) or modify it in place and return None.
    The hook is removed on exit, even after an error, so the model is left exactly as it was.
    """
    site = lm.check_site(site)

    def hook(module, args, output):
        h = _hidden(output)
        new = fn(h)
        if new is None:
            return None
        if new.shape != h.shape:
            raise SiteError(f"edit at {site} returned shape {tuple(new.shape)}, expected {tuple(h.shape)}")
        return _replace_hidden(output, new)

    handle = lm.layers[site.layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
