"""The activation reconstructor (AR): text in, activation vector out.

A copy of the target cut after block K (the site's block), with the final norm removed, and a d×d
linear head initialised to the identity, read at the last token. At initialisation the AR therefore
returns exactly the target's own site activation for the template text, which is a far better start
than a random head (the published notes measured 1.61 against 1.94 initial loss). Blocks are tuned
with LoRA so the trained AR ships as a few MB.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from thoughtscope.models import find_final_norm, find_layers, pad_batch, pad_id

from .core import NLAConfig, NLAError, nla_loss
from .verbalizer import add_lora

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def truncated_body(model: nn.Module, n_blocks: int) -> nn.Module:
    """The base transformer (no LM head) keeping blocks 0..n_blocks-1 and with its final norm replaced by Identity."""
    full = copy.deepcopy(model)
    body = getattr(full, full.base_model_prefix, None) or full.get_decoder()
    layers = find_layers(full)
    if n_blocks > len(layers):
        raise NLAError(f"cannot keep {n_blocks} blocks of a model with {len(layers)}")
    kept = nn.ModuleList(list(layers)[:n_blocks])
    for name, mod in body.named_modules():
        if mod is layers:
            parent = body.get_submodule(name.rsplit(".", 1)[0]) if "." in name else body
            setattr(parent, name.rsplit(".", 1)[-1], kept)
            break
    else:
        raise NLAError("could not locate the block list inside the base model")
    body.config.num_hidden_layers = n_blocks
    for key in ("n_layer", "num_layers"):
        if hasattr(body.config, key):
            setattr(body.config, key, n_blocks)
    if isinstance(getattr(body.config, "layer_types", None), list):
        body.config.layer_types = body.config.layer_types[:n_blocks]
    norm = find_final_norm(full)
    replaced = False
    for name in _NORM_NAMES:
        if norm is not None and getattr(body, name, None) is norm:
            setattr(body, name, nn.Identity())
            replaced = True
    if norm is not None and not replaced:
        raise NLAError("could not remove the final norm from the truncated model")
    for p in body.parameters():
        p.requires_grad_(False)
    return body


class Reconstructor(nn.Module):
    """AR = truncated target (blocks 0..K, no final norm) + identity-initialised Linear(d, d), last token."""

    def __init__(self, lm, cfg: NLAConfig, *, lora: bool = True):
        super().__init__()
        self.cfg = cfg.check()
        self.tokenizer = lm.tokenizer
        body = truncated_body(lm.model, cfg.layer + 1)
        self.body = add_lora(body, cfg) if lora else body
        d = cfg.d_model
        self.head = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(d))
        ref = next(body.parameters())
        self.head.to(device=ref.device, dtype=ref.dtype)
        self.prefix = self.tokenizer(cfg.ar_prefix, add_special_tokens=False)["input_ids"]
        self.suffix = self.tokenizer(cfg.ar_suffix, add_special_tokens=False)["input_ids"] if cfg.ar_suffix else []

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def encode(
        self, explanations: Sequence[str], *, allow_empty: bool = False, truncate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Template ids (BOS + prefix + explanation + suffix), right padded, and the attention mask.

        An empty explanation is an error unless allow_empty (the evaluation's "empty explanation" rung).
        """
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        rows = []
        for e in explanations:
            if not isinstance(e, str):
                raise NLAError(f"an explanation must be a string, got {type(e).__name__}")
            if not e.strip() and not allow_empty:
                raise NLAError(
                    "empty explanation: the reconstructor needs some text (use allow_empty=True to "
                    "measure what the template alone predicts)"
                )
            body = tok(e, add_special_tokens=False)["input_ids"] if e else []
            if truncate:
                body = body[: self.cfg.max_explanation_tokens]
            if len(body) > self.cfg.max_explanation_tokens:
                raise NLAError(
                    f"explanation has {len(body)} tokens; the reconstructor accepts at most "
                    f"{self.cfg.max_explanation_tokens}: {e[:60]!r}…"
                )
            rows.append(bos + self.prefix + body + self.suffix)
        ids, att = pad_batch(rows, pad_id(tok))
        return ids.to(self.device), att.to(self.device)

    def forward_ids(self, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        h = self.body(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        last = att.sum(1) - 1
        return self.head(h[torch.arange(h.shape[0], device=h.device), last]).float()

    def forward(
        self, explanations: Sequence[str], *, allow_empty: bool = False, truncate: bool = False
    ) -> torch.Tensor:
        """Predicted site vectors [B, d] (compare after `normalise`: only the direction is trained)."""
        return self.forward_ids(*self.encode(explanations, allow_empty=allow_empty, truncate=truncate))

    def predict(
        self, explanations: Sequence[str], batch_size: int = 32, *, allow_empty: bool = False, truncate: bool = False
    ) -> torch.Tensor:
        """Batched, no-grad predictions; truncate=True cuts over-long texts (for scoring raw AV samples)."""
        outs = []
        with torch.no_grad():
            for i in range(0, len(explanations), batch_size):
                outs.append(
                    self(list(explanations[i : i + batch_size]), allow_empty=allow_empty, truncate=truncate).cpu()
                )
        return torch.cat(outs) if outs else torch.zeros(0, self.cfg.d_model)

    def loss(self, explanations: Sequence[str], gold: torch.Tensor, *, truncate: bool = False) -> torch.Tensor:
        return nla_loss(self(explanations, truncate=truncate), gold.to(self.device))

    # ------------------------------------------------------------------ weights
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if hasattr(self.body, "peft_config"):
            state.update({f"body.{k}": v for k, v in get_peft_model_state_dict(self.body).items()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        head = {k[5:]: v.float() for k, v in state.items() if k.startswith("head.")}
        if head:
            if head["weight"].shape != self.head.weight.shape:
                raise NLAError(
                    f"AR head has shape {tuple(head['weight'].shape)}, this model needs {tuple(self.head.weight.shape)}"
                )
            self.head.load_state_dict(head)
        body = {k[5:]: v.float() for k, v in state.items() if k.startswith("body.")}
        if body:
            set_peft_model_state_dict(self.body, body)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
