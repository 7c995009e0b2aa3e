"""Where in a model we read or write (`Site`), and the two hooks that do it: `capture` (read) and `edit` (write).

A site is a layer plus a stream; `resid.L` is the residual stream output of block L (= hidden_states[L+1]);
`mlp_in.L` is what block L's MLP reads (after its pre-MLP norm) and `mlp_out.L` what it writes into the residual
(after Gemma's post-MLP norm, where the block has one). The hooks work on any model `thoughtscope.models.load_model`
returns, through its generic `layers` handle and the block's MLP module (found by name: ``mlp``, ``feed_forward``
or ``ffn``), and leave the model exactly as they found it, even after an error.
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

STREAMS = ("resid", "mlp_in", "mlp_out")
MLP_NAMES = ("mlp", "feed_forward", "ffn")  # the block's MLP module, by the names the supported families use
POST_MLP_NORMS = ("post_feedforward_layernorm",)  # Gemma 2/3: a norm on the MLP's output before it is added


# --------------------------------------------------------------------------- sites


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: `resid.L` is the residual stream output of block L (= hidden_states[L+1]); `mlp_in.L`
    the input block L's MLP reads, `mlp_out.L` what that MLP adds to the residual."""

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


def mlp_module(block: torch.nn.Module, layer: int | None = None) -> torch.nn.Module:
    """The MLP of one transformer block (its child named by MLP_NAMES), else SiteError."""
    for name in MLP_NAMES:
        mod = getattr(block, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    where = "" if layer is None else f" of block {layer}"
    raise SiteError(
        f"cannot find the MLP{where} ({type(block).__name__}): expected a child module named "
        f"{' or '.join(MLP_NAMES)}, so the mlp_in / mlp_out streams are not available for this model"
    )


def mlp_out_module(block: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The module whose output is what the MLP adds to the residual: Gemma's post-MLP norm, else the MLP."""
    for name in POST_MLP_NORMS:
        mod = getattr(block, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return mlp_module(block, layer)


def _register(lm: LoadedModel, site: Site, post_hook: Callable, pre_hook: Callable):
    """Hook the module of the site: a forward hook for resid / mlp_out, a forward pre-hook for mlp_in."""
    block = lm.layers[site.layer]
    if site.stream == "resid":
        return block.register_forward_hook(post_hook)
    if site.stream == "mlp_out":
        return mlp_out_module(block, site.layer).register_forward_hook(post_hook)
    return mlp_module(block, site.layer).register_forward_pre_hook(pre_hook)


def _first_arg(site: Site, args: tuple) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise SiteError(f"the MLP at {site} was called without a positional input tensor; cannot read {site}")
    return args[0]


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

    def make_hooks(site: Site):
        def post(module, args, output):
            out[site] = _hidden(output).detach()

        def pre(module, args):
            out[site] = _first_arg(site, args).detach()

        return post, pre

    def stop(module, args, output):
        raise _StopForward

    try:
        for s in site_list:
            handles.append(_register(lm, s, *make_hooks(s)))
        if early_exit:  # after the deepest layer's own hooks (registered first, so they run first)
            handles.append(lm.layers[deepest].register_forward_hook(stop))
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
    For mlp_in the MLP then reads the new input (the residual is untouched); for mlp_out the new tensor is what
    the MLP adds to the residual. The hook is removed on exit, even after an error, so the model is left exactly
    as it was.
    """
    site = lm.check_site(site)

    def checked(h: torch.Tensor) -> torch.Tensor | None:
        new = fn(h)
        if new is not None and new.shape != h.shape:
            raise SiteError(f"edit at {site} returned shape {tuple(new.shape)}, expected {tuple(h.shape)}")
        return new

    def post(module, args, output):
        new = checked(_hidden(output))
        return None if new is None else _replace_hidden(output, new)

    def pre(module, args):
        new = checked(_first_arg(site, args))
        return None if new is None else (new, *args[1:])

    handle = _register(lm, site, post, pre)
    try:
        yield
    finally:
        handle.remove()
