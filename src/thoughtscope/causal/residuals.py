"""The residual stream of one text at every block, read once and shared by the analyzer's token panel.

A click on a token asks what every layer says there (the lens column), then which SAE features pushed the next
token (attribution). Both read the residual after every block, and attribution also needs gradients from the SAE's
site up. The analyzer has already run the blocks up to its SAE's site on the same text, so `ResidualCache` keeps
those outputs (`record`), runs only the blocks above them on the first click, and records that run with the SAE
spliced in, so "why" then costs one backward pass. A causal model's residual at a position does not depend on what
follows it, so every position of the text is served from one reading.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..features import excludes_position_0
from ..models import LoadedModel, Site
from ..sites import _hidden


def read_residuals(lm: LoadedModel, ids: torch.Tensor, *, grad: bool) -> list[torch.Tensor]:
    """The residual after every block ([B, T, d] each), the graph kept when `grad`."""
    hs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _a, o: hs.append(_hidden(o))) for blk in lm.layers]
    try:
        if grad:
            emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            with torch.enable_grad():
                lm.model(inputs_embeds=emb, use_cache=False, logits_to_keep=1)
        else:
            with torch.inference_mode():
                lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return hs


def readout(lm: LoadedModel, h: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors through the model's final norm, unembedding and any final logit soft-cap
    ([..., d] -> [..., vocab]): what the model's own head computes from them."""
    return lm.head_logits(lm.final_norm(h) if lm.final_norm is not None else h)


def sae_codes(sae, h: torch.Tensor) -> torch.Tensor:
    """The SAE's features of activations h [B, T, d], none at position 0 where the SAE does not read it."""
    f = sae.encode(h.float())
    if excludes_position_0(sae):
        f[:, 0] = 0
    return f


def splice_sae(sae, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h', f, err): the SAE spliced into activations h as decode(f) + err, f and err leaves that take gradients.
    h' equals h bit for bit (the spliced sum enters as a zero-valued difference), so the forward pass is the
    model's own while the backward pass reaches every feature and the error term."""
    f = sae_codes(sae, h).detach().requires_grad_(True)
    recon = sae.decode(f)
    err = (h.float() - recon).detach().requires_grad_(True)
    x = recon + err
    return h.detach() + (x - x.detach()).to(h.dtype), f, err


@dataclass
class Spliced:
    """The text read with the SAE spliced in at its site: the features and error term (leaves, [1, T, ·]) and the
    final residual [1, T, d] whose graph reaches them, kept for any number of backward passes."""

    sae: object
    f: torch.Tensor
    err: torch.Tensor
    top: torch.Tensor


class ResidualCache:
    """The residuals after every block for the last text read (one text: the analyzer's), with `sae` the graph from
    its site up as well. Lower blocks recorded from the analyzer's own pass are reused; the rest run on demand.
    The graph costs memory while the text is held (about 0.6 MB per token for SmolLM2-135M): a reading of more than
    `max_graph_tokens` tokens keeps none unless attribution asks for it."""

    def __init__(self, sae=None, *, max_graph_tokens: int = 1024):
        self.sae = sae
        self.max_graph_tokens = max_graph_tokens
        self._key: tuple | None = None
        self._hs: list[torch.Tensor] = []
        self._as_tuple = False
        self._spliced: Spliced | None = None
        self._lock = threading.RLock()

    def clear(self) -> None:
        with self._lock:
            self._key, self._hs, self._spliced = None, [], None

    def held_blocks(self, lm: LoadedModel, ids: torch.Tensor) -> int:
        """How many blocks' outputs are held for this text (0: none, or another text)."""
        return len(self._hs) if self._key == _key(lm, ids) else 0

    @contextmanager
    def record(self, lm: LoadedModel) -> Iterator[None]:
        """Keep the block outputs of a forward pass run inside this block (the analyzer's, which stops at its SAE's
        site) when it read one unpadded text; a pass that fails or reads a batch keeps nothing."""
        seen: dict[str, object] = {}
        outs: list[torch.Tensor] = []

        def pre(_m, args, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            seen["ids"] = ids if ids is not None and ids.shape[0] == 1 and (mask is None or bool(mask.all())) else None
            seen["calls"] = int(seen.get("calls", 0)) + 1

        def post(_m, _a, o):
            seen["tuple"] = isinstance(o, tuple)
            outs.append(_hidden(o))

        hooks = [lm.model.register_forward_pre_hook(pre, with_kwargs=True)]
        hooks += [blk.register_forward_hook(post) for blk in lm.layers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        ids = seen.get("ids")
        if seen.get("calls") == 1 and ids is not None and outs:
            with self._lock:
                self._key, self._as_tuple, self._spliced = _key(lm, ids), bool(seen["tuple"]), None
                self._hs = [h.detach().clone() for h in outs]  # out of inference mode: usable under autograd

    def residuals(self, lm: LoadedModel, ids: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output for `ids` [1, T] (detached): held ones reused, the others run now; with an SAE at a
        residual site, the run from that site up keeps its graph for `spliced`."""
        with self._lock:
            if self._key != _key(lm, ids) or len(self._hs) < len(lm.layers):
                self._read(lm, ids, graph=ids.shape[1] <= self.max_graph_tokens)
            return self._hs

    def spliced(self, lm: LoadedModel, ids: torch.Tensor) -> Spliced:
        """The text read with this cache's SAE spliced in (read now unless the last reading kept it)."""
        if self.sae is None or Site.parse(self.sae.cfg.site).stream != "resid":
            raise ValueError("this cache keeps no attribution graph: it needs an SAE at a residual site")
        with self._lock:
            if self._key != _key(lm, ids) or self._spliced is None:
                self._read(lm, ids, graph=True)
            return self._spliced

    def _read(self, lm: LoadedModel, ids: torch.Tensor, *, graph: bool) -> None:
        key = _key(lm, ids)
        held = self._hs if self._key == key else []
        at = Site.parse(self.sae.cfg.site) if self.sae is not None else None
        self._key, self._hs, self._spliced = None, [], None  # nothing is served from a reading that failed
        if not graph or at is None or at.stream != "resid" or at.layer >= len(lm.layers):
            hs, self._as_tuple = _run(lm, ids, held, self._as_tuple)
            self._key, self._hs = key, hs
            return
        held = held[: at.layer + 1]
        if not held:  # nothing from the analyzer: the blocks up to the site run first, without a graph
            held, self._as_tuple = _run(lm, ids, [], False, stop=at.layer + 1)
            held = [h.clone() for h in held]  # out of inference mode, so that autograd may read them
        spliced: dict[str, torch.Tensor] = {}

        def splice(h: torch.Tensor) -> torch.Tensor:
            new, spliced["f"], spliced["err"] = splice_sae(self.sae, h)
            return new

        hs, _ = _run(lm, ids, held, self._as_tuple, splice=(at.layer, splice))
        self._key, self._hs = key, [h.detach() for h in hs]
        self._spliced = Spliced(self.sae, spliced["f"], spliced["err"], hs[-1])


def _key(lm: LoadedModel, ids: torch.Tensor) -> tuple:
    return (id(lm.model), tuple(ids[0].tolist()))


def _run(lm, ids, held, as_tuple, *, splice=None, stop: int | None = None) -> tuple[list[torch.Tensor], bool]:
    """(every block's output for ids, whether blocks return tuples), up to block `stop` only when given; the first
    len(held) blocks answer with the held outputs instead of computing them. `splice` (layer, fn): that block's
    output goes through fn and the pass runs under autograd (a pass that only reads runs in inference mode)."""
    from ..sites import _StopForward

    out: list[torch.Tensor] = []
    form = {"tuple": as_tuple}

    def keep(_m, _a, o):
        form["tuple"] = isinstance(o, tuple)
        out.append(_hidden(o))

    hooks = []
    if splice is not None:  # registered first: the block's output is replaced before it is kept
        layer, fn = splice
        hooks.append(lm.layers[layer].register_forward_hook(lambda _m, _a, o: _as(fn(_hidden(o)), o)))
    hooks += [blk.register_forward_hook(keep) for blk in lm.layers]
    if stop is not None:

        def halt(_m, _a, _o):
            raise _StopForward

        hooks.append(lm.layers[stop - 1].register_forward_hook(halt))
    for i, h in enumerate(held):
        lm.layers[i].forward = _answering(h, as_tuple)
    try:
        with torch.enable_grad() if splice is not None else torch.inference_mode():
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _StopForward:
        pass
    finally:
        for blk in lm.layers[: len(held)]:
            vars(blk).pop("forward", None)
        for h in hooks:
            h.remove()
    return out, form["tuple"]


def _as(new: torch.Tensor, like):
    return (new, *like[1:]) if isinstance(like, tuple) else new


def _answering(h: torch.Tensor, as_tuple: bool):
    """A block's forward that returns its held output (in the form the model's blocks return it)."""

    def forward(*_args, **_kwargs):
        return (h,) if as_tuple else h

    return forward
