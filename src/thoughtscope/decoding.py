"""The lean decode path: token-by-token generation without transformers' per-step machinery.

At batch 1 on a CPU a decode step of a small model is a chain of matrix-vector products; transformers adds
mask building, cache objects, rotary tables and output records around each one, which cost ~40 % of the step
for SmolLM2-135M. `LeanDecoder` runs the same arithmetic (the model's own weights and modules' constants, the
same operation order) straight through a preallocated KV cache, so greedy tokens equal `generate`'s.

Steering needs nothing special: the forward hooks and pre-hooks that `sites.edit` registers on a block or its
MLP are called at the same points with the same arguments (and the embedding is called as a module, so its
hooks run: the NLA injects its vector there), and a site without a hook costs nothing. LoRA adapters (peft,
one plain adapter per layer, as the NLA's) are run with peft's own operations. A hook
anywhere else (on an attention module, a norm, a projection) cannot be honoured here, so `lean_reason` says so
and the caller keeps transformers' forward. Families: Llama, Mistral, Qwen2 and Qwen3 (Llama-style blocks);
the others (GPT-2, GPT-NeoX, Gemma) keep transformers' forward.

`precision="int8"` (CPU) keeps an int8 copy of every matrix with one scale per row and multiplies in bfloat16
(a quarter of the bytes read per token: the batch-1 case, where reading weights is the cost); `"bf16"` keeps a
bfloat16 copy and multiplies in bfloat16 (a batch of rows is compute-bound, and oneDNN runs bf16 products on the
CPU's bf16 / AMX units). The residual stream, norms, attention and cache stay in float32 for both. Their cost is
measured as perplexity on held-out text (benchmarks/generate.py); neither is ever the default.
"""

from __future__ import annotations

import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ModelError
from .sites import mlp_module

LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PRECISIONS = ("exact", "int8", "bf16")  # steer.config.DECODE_WEIGHTS names them for the torch-free configs


# transformers' own output recorders, installed for good on a model's first call that asks for hidden states or
# attentions; they do nothing unless such a call is running, which the lean path never makes
_RECORDERS = "transformers.utils.output_capturing"


def _live(hooks: dict) -> list:
    return [h for h in hooks.values() if getattr(h, "__module__", None) != _RECORDERS]


def _hooks_of(module: nn.Module) -> bool:
    return bool(_live(module._forward_hooks) or _live(module._forward_pre_hooks))


def lean_reason(model: nn.Module, *, max_len: int | None = None) -> str | None:
    """Why the lean path cannot run this model as it is now (None: it can)."""
    cfg = model.config
    family = getattr(cfg, "model_type", None)
    if family not in LEAN_FAMILIES:
        return f"model family {family!r} (lean decoding covers {', '.join(LEAN_FAMILIES)})"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ()
    sliding = getattr(cfg, "use_sliding_window", True) or any(t != "full_attention" for t in types)
    if window and sliding and (max_len is None or max_len > window):
        return f"sliding-window attention ({window} tokens) reached"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    if model.training:
        return "the model is in training mode"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the Llama layout (model.layers, rotary_emb, lm_head)"
    if type(inner.embed_tokens) is not nn.Embedding or type(model.lm_head) is not nn.Linear:
        return "the embedding or the output head is not a plain nn.Embedding / nn.Linear"
    allowed = {inner.embed_tokens}  # called as a module here too, so its hooks run (the NLA's injection)
    for i, block in enumerate(layers):
        allowed.add(block)
        allowed.add(mlp_module(block))
        attn, mlp = block.self_attn, mlp_module(block)
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        for m in projections:  # quantised, fused or unusual adapter layers compute more than a product
            why = _projection(m)
            if isinstance(why, str):
                return f"block {i}: {why}"
        norms = (block.input_layernorm, block.post_attention_layernorm)
        if any(not hasattr(n, "variance_epsilon") for n in norms):
            return f"block {i}'s norms are not RMSNorm"
    for name, mod in model.named_modules():
        if mod in allowed:
            if mod._forward_hooks_with_kwargs or mod._forward_pre_hooks_with_kwargs:
                return f"a keyword-argument hook on {name}"
            continue
        if _hooks_of(mod):
            return f"a hook on {name or 'the model'} ({type(mod).__name__})"
    return None


def _call_pre_hooks(module: nn.Module, x: Tensor) -> Tensor:
    for hook in _live(module._forward_pre_hooks):
        r = hook(module, (x,))
        if r is not None:
            x = r[0] if isinstance(r, tuple) else r
    return x


def _call_hooks(module: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    for hook in _live(module._forward_hooks):
        r = hook(module, (x,), out)
        if r is not None:
            out = r[0] if isinstance(r, tuple) else r
    return out


def _rms(norm: nn.Module, h: Tensor) -> Tensor:
    """LlamaRMSNorm: torch's fused kernel computes the same float32 arithmetic (the tests compare tokens)."""
    if h.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(h, norm.weight.shape, norm.weight, norm.variance_epsilon)
    dt = h.dtype
    h = h.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dt)


def _projection(mod) -> tuple[nn.Linear, tuple | None] | str:
    """(base nn.Linear, LoRA (A^T, B^T, scaling) or None) of one projection, or why it cannot be run by hand.

    A peft LoRA layer with one active, unmerged, plain adapter and no dropout is y = base(x) + B(A(x)) * s, which
    is computed with peft's own operations; anything else (several adapters, DoRA, dropout, quantised layers)
    keeps transformers' forward."""
    if type(mod) is nn.Linear:
        return mod, None
    base = getattr(mod, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(mod, "lora_A"):
        return f"a projection is {type(mod).__name__}, not a plain nn.Linear or a LoRA layer on one"
    if getattr(mod, "disable_adapters", False):  # peft runs the base layer (and unmerges a merged one first)
        return "a LoRA layer whose adapters are disabled while merged" if mod.merged else (base, None)
    if mod.merged:  # the adapter is already in the base weight
        return base, None
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if not active:
        return base, None
    if len(active) > 1 or active[0] in getattr(mod, "lora_variant", {}):
        return "several active LoRA adapters, or a LoRA variant (DoRA)"
    a = active[0]
    A, B = mod.lora_A[a], mod.lora_B[a]
    if type(mod.lora_dropout[a]) is not nn.Identity or A.bias is not None or B.bias is not None:
        return "LoRA with dropout or biases"
    return base, (A.weight.t(), B.weight.t(), mod.scaling[a])


class _Block:
    """One block's weights (transposed views, so a product is one `mm` call) and constants, read once."""

    def __init__(self, block: nn.Module):
        attn = block.self_attn
        self.block, self.mlp = block, mlp_module(block)
        self.in_norm, self.post_norm = block.input_layernorm, block.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.groups = attn.num_key_value_groups
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        named = {"o": attn.o_proj, **{n: getattr(self.mlp, n + "_proj") for n in ("gate", "up", "down")}}
        named.update(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj)
        parts = {n: _projection(m) for n, m in named.items()}
        self.lora = {n: lo for n, (_, lo) in parts.items() if lo is not None}
        mods = {n: parts[n][0] for n in ("o", "gate", "up", "down")}
        self.w = {n: m.weight.t() for n, m in mods.items()}
        self.w_any = mods["o"].weight
        self.b = {n: m.bias for n, m in mods.items()}
        # q, k and v in one product: a copy of the three matrices side by side (one call instead of three)
        qkv = (parts["q"][0], parts["k"][0], parts["v"][0])
        self.qkv_sizes = [m.weight.shape[0] for m in qkv]
        self.w["qkv"] = torch.cat([m.weight.detach() for m in qkv]).t()
        biases = [m.bias for m in qkv]
        self.b["qkv"] = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0]) for b, m in zip(biases, qkv)]
            )
        )
        self.act = self.mlp.act_fn

        self.q8: dict[str, _Int8] | None = None

    def quantise(self, kind: type) -> None:
        self.q8 = {n: kind(w.t(), self.b[n]) for n, w in self.w.items()}
        self.w = {}

    def linear(self, name: str, x: Tensor) -> Tensor:
        """x [N, d_in] -> [N, d_out]: the same kernel F.linear calls for a 2-D input, then a LoRA adapter's term
        as peft adds it (for "qkv", each of q, k and v its own)."""
        if self.q8 is not None:
            y = self.q8[name](x)
        else:
            b = self.b[name]
            y = torch.mm(x, self.w[name]) if b is None else torch.addmm(b, x, self.w[name])
        if name == "qkv":
            start = 0
            for part, size in zip("qkv", self.qkv_sizes):
                if part in self.lora:
                    y[:, start : start + size] = y[:, start : start + size] + _lora_term(self.lora[part], x)
                start += size
        elif name in self.lora:
            y = y + _lora_term(self.lora[name], x)
        return y

    def residual(self, name: str, h: Tensor, x: Tensor) -> Tensor:
        """h + x @ W in one call where that is the same sum (no bias: MKL adds h after the product)."""
        if self.q8 is None and self.b[name] is None and name not in self.lora:
            return torch.addmm(h, x, self.w[name])
        return h + self.linear(name, x)


def _lora_term(lora: tuple, x: Tensor) -> Tensor:
    """B(A(x)) * scaling, the operations of peft's LoRA layer."""
    At, Bt, scaling = lora
    return torch.mm(torch.mm(x, At), Bt) * scaling


class _Int8:
    """A weight stored as int8 rows with one float scale each; the product runs in bfloat16 (4x fewer bytes
    read than float32), the result comes back as float32."""

    precision = "int8"

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.bias = bias

    def __call__(self, x: Tensor) -> Tensor:
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias


class _BF16:
    """A weight stored in bfloat16; the product runs in bfloat16 (oneDNN uses the CPU's bf16 or AMX units, where a
    batch of rows is compute-bound), the result comes back as float32."""

    precision = "bf16"

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        self.wt = weight.detach().to(torch.bfloat16).t()  # [in, out], a view of the [out, in] rows
        self.bias = bias

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.mm(x.to(torch.bfloat16), self.wt).to(x.dtype)
        return y if self.bias is None else y + self.bias


_LOW = {kind.precision: kind for kind in (_Int8, _BF16)}  # precision name -> how its weights are kept


_BF16_FASTER: dict[str, bool] = {}


def bf16_is_faster(device: torch.device | str) -> bool:
    """Whether this device multiplies a batch of rows in bfloat16 clearly (1.3x) faster than in float32, measured
    once per device type on a decode-sized product: CPUs with bf16 or AMX units do, others emulate bf16 and may be
    slower, so a search asks before it picks bf16 weights."""
    device = torch.device(device)
    if device.type not in _BF16_FASTER:
        x, w = torch.randn(24, 576, device=device), torch.randn(1536, 576, device=device)
        seconds = {}
        with torch.inference_mode():
            for dt in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
                a, b = x.to(dt), w.to(dt).t()
                torch.mm(a, b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                for _ in range(20):
                    torch.mm(a, b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[dt] = min(seconds.get(dt, float("inf")), time.perf_counter() - t)
        _BF16_FASTER[device.type] = seconds[torch.float32] > 1.3 * seconds[torch.bfloat16]
    return _BF16_FASTER[device.type]


class _Weights:
    """What the lean path reads from a model, built once per model and weight version (the fused q/k/v copy
    costs a pass over those matrices)."""

    def __init__(self, model: nn.Module, precision: str):
        inner = model.model
        self.signature = _signature(model)
        self.blocks = [_Block(b) for b in inner.layers]
        self.head_w = model.lm_head.weight.t()
        self.head_q = None
        if precision in _LOW:
            for blk in self.blocks:
                blk.quantise(_LOW[precision])
            self.head_q = _LOW[precision](model.lm_head.weight, model.lm_head.bias)
        self.rotary_emb = inner.rotary_emb
        self.head_dim = inner.layers[0].self_attn.head_dim
        self._rotary: tuple[int, Tensor, Tensor] | None = None

    def rotary(self, max_len: int) -> tuple[Tensor, Tensor]:
        """cos and sin (first half negated) for positions 0..max_len-1, from the model's own rotary module."""
        if self._rotary is None or self._rotary[0] < max_len:
            p = self.blocks[0].w_any
            with torch.inference_mode():
                positions = torch.arange(max_len, device=p.device)[None]
                probe = torch.zeros(1, max_len, self.head_dim, dtype=p.dtype, device=p.device)
                cos, sin = self.rotary_emb(probe, positions)
            half = self.head_dim // 2
            self._rotary = (max_len, cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1))
        return self._rotary[1][:max_len], self._rotary[2][:max_len]


def _signature(model: nn.Module) -> tuple:
    """Where every parameter lives and how often it was written in place: a change means rebuild."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights(model: nn.Module, precision: str) -> _Weights:
    built = _BUILT.setdefault(model, {})
    w = built.get(precision)
    if w is None or w.signature != _signature(model):
        built.clear()  # an old version's copies are of no further use
        w = built[precision] = _Weights(model, precision)
    return w


class LeanDecoder:
    """A preallocated KV cache and a hand-run forward for one batch of left-padded prompts.

    `prefill(ids, mask, pos)` reads the prompts and returns the last column's logits [B, V]; each `step(ids)`
    reads one new token per row and returns the next logits. Rows keep their own positions (left padding).
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, *, precision: str = "exact"):
        if precision not in PRECISIONS:
            raise ModelError(f"unknown decode precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        reason = lean_reason(model, max_len=max_len)
        if reason is not None:
            raise ModelError(f"the lean decode path cannot run this model: {reason}")
        p = next(model.parameters())
        if precision == "int8" and p.device.type != "cpu":
            raise ModelError("int8 decoding runs on the CPU; use exact weights on a GPU")
        self.model, self.precision = model, precision
        self.device, self.dtype = p.device, p.dtype
        w = _weights(model, precision)
        self.blocks, self.head_w, self.head_q = w.blocks, w.head_w, w.head_q
        inner = model.model
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        a = inner.layers[0].self_attn
        self.B, self.max_len = batch, max_len
        shape = (batch, model.config.num_key_value_heads, max_len, a.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.cos, self.sin_signed = w.rotary(max_len)
        self.keys = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)  # which columns are real
        self.length = 0
        self.padded = False
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor, pos: Tensor, *, every: bool = False) -> Tensor:
        """Logits of the last column [B, V] (every column [B, T, V] with `every`, for a perplexity)."""
        B, T = ids.shape
        if B != self.B or self.max_len < T:
            raise ModelError(f"prefill of {B}x{T} tokens does not fit a lean cache of {self.B}x{self.max_len}")
        self.keys.zero_()
        self.keys[:, :T] = mask.bool()
        self.padded = not bool(self.keys[:, :T].all())
        self.pos = pos[:, -1:].clone()
        self.length = 0
        if self.padded:  # causal and key padding; each row sees itself so padded rows stay finite
            causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
            attn_mask = (causal[None] & self.keys[:, None, :T]) | torch.eye(T, dtype=torch.bool, device=self.device)
            attn_mask = attn_mask[:, None]
        else:
            attn_mask = None
        return self._forward(ids, pos, attn_mask, every)

    @torch.no_grad()
    def step(self, ids: Tensor) -> Tensor:
        """ids [B, 1] or [B]: one new token per row -> the next logits [B, V]."""
        if self.length >= self.max_len:
            raise ModelError(f"the lean cache holds {self.max_len} tokens; the run asked for more")
        self.pos += 1
        self.keys[:, self.length] = True
        attn_mask = self.keys[:, None, None, : self.length + 1] if self.padded else None
        return self._forward(ids.view(self.B, 1), self.pos, attn_mask)

    def repeat_interleave(self, n: int) -> None:
        """Each row's cache repeated n times (rows r0, r0, ..., r1, ...): one prompt read for n samples."""
        self._take(torch.arange(self.B, device=self.device).repeat_interleave(n))

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (finished ones need no more forward passes)."""
        self._take(rows)

    def _take(self, rows: Tensor) -> None:
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.keys, self.pos = self.keys[rows], self.pos[rows]
        self.B = int(rows.shape[0])

    # ------------------------------------------------------------------ the forward pass
    def _forward(self, ids: Tensor, pos: Tensor, attn_mask: Tensor | None, every: bool = False) -> Tensor:
        B, T = ids.shape
        N = B * T
        start, end = self.length, self.length + T
        cos = self.cos[pos].unsqueeze(2)  # [B, T, 1, hd]
        sin = self.sin_signed[pos].unsqueeze(2)
        h = self.embed(ids).view(N, -1)
        for i, blk in enumerate(self.blocks):
            x = h
            a = _rms(blk.in_norm, h)
            qkv = blk.linear("qkv", a).view(B, T, -1, blk.head_dim)
            H, KV = blk.heads, blk.kv_heads
            if blk.q_norm is None:
                qk = qkv[:, :, : H + KV]
            else:
                qk = torch.cat([_rms(blk.q_norm, qkv[:, :, :H]), _rms(blk.k_norm, qkv[:, :, H : H + KV])], 2)
            # rotate_half(x) * sin == roll(x, half) * sin with its first half negated: the same products
            qk = qk * cos + qk.roll(blk.head_dim // 2, -1) * sin
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + KV :].transpose(1, 2)
            kc, vc = self.k[i], self.v[i]
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            o = _attend(blk, q, kc[:, :, :end], vc[:, :, :end], attn_mask, T)
            h = blk.residual("o", x, o.transpose(1, 2).reshape(N, -1))
            m_in = _rms(blk.post_norm, h)
            mlp = blk.mlp
            if mlp._forward_pre_hooks:
                m_in = _call_pre_hooks(mlp, m_in.view(B, T, -1)).reshape(N, -1)
            gate = blk.act(blk.linear("gate", m_in))
            inner = gate.mul_(blk.linear("up", m_in)) if gate.dtype == self.dtype else gate * blk.linear("up", m_in)
            if mlp._forward_hooks:
                m_out = blk.linear("down", inner)
                m_out = _call_hooks(mlp, m_in.view(B, T, -1), m_out.view(B, T, -1)).reshape(N, -1)
                h = h + m_out
            else:
                h = blk.residual("down", h, inner)
            if blk.block._forward_hooks:
                h = _call_hooks(blk.block, x.view(B, T, -1), h.view(B, T, -1)).reshape(N, -1)
        self.length = end
        h = h.view(B, T, -1)
        last = _rms(self.norm, h if every else h[:, -1])
        flat = last.reshape(-1, last.shape[-1])
        if self.head_q is not None:
            logits = self.head_q(flat)
        elif self.head.bias is None:
            logits = torch.mm(flat, self.head_w)
        else:
            logits = torch.addmm(self.head.bias, flat, self.head_w)
        return logits.view(B, T, -1) if every else logits


def _attend(blk: _Block, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, T: int) -> Tensor:
    """Scaled dot-product attention called the way transformers' sdpa path calls it (the same kernels)."""
    g = blk.groups
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=blk.scaling, enable_gqa=g > 1)
    if g == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, scale=blk.scaling)
    if T == 1:  # one query: the heads sharing a key head become that head's query rows
        B, H, _, d = q.shape
        out = F.scaled_dot_product_attention(q.reshape(B, H // g, g, d), k, v, attn_mask, scale=blk.scaling)
        return out.reshape(B, H, 1, d)
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, scale=blk.scaling)


__all__ = ["LEAN_FAMILIES", "PRECISIONS", "LeanDecoder", "bf16_is_faster", "lean_reason"]
