"""First-letter feature absorption of an SAE, as SAEBench's absorption eval defines it (Chanin et al., "A is for
Absorption"), sized for a CPU.

1. Words: the model's own vocabulary, tokens that read as a whole ASCII word of two or more letters (a leading space
   dropped), each placed at the start of a line after `n_icl` in-context examples of the template
   "{word} has the first letter: {LETTER}"; a word is kept only when it is exactly one token there. Words are split
   into train and test at random (whole words: none is in both).
2. The residual at the word's token (the SAE's site) trains a one-vs-rest linear probe per letter (BCE with the
   positives weighted by negatives / positives, Adam, the learning rate decayed exponentially, weight decay),
   SAEBench's letter probe.
3. The SAE's latents on the training words train an L1-penalised one-vs-rest probe the same way; for letter L its k
   largest positive weights name the latents of the k-sparse probe (a balanced L2 logistic regression on those k,
   C = 1), k = 1 .. `max_k`. The main latents of L are those of the largest k reached while each step raises the
   k-sparse probe's test F1 by more than `f1_jump` (SAEBench's feature-splitting rule).
4. On the test words of L that the residual probe calls L (its true positives): `probe_proj` = x · p̂ (p̂ the unit
   probe direction), each latent's share = its activation × (its decoder row · p̂) (the decoded contribution along p̂;
   SAEBench's activation × cosine when decoder rows have unit norm, and the right quantity when they do not, as in an
   SAE with its input scaling folded in). The absorption fraction of a word is 0 when the main latents carry at
   least `probe_proj`, or when the (at most `max_absorbers`) other latents with cosine ≥ `cos_threshold` and a
   positive share carry less than `proportion_threshold` of it; 1 when the main latents carry nothing; else the
   absorbers' share (capped at what the main latents leave) over itself plus the main latents'. A word is fully
   absorbed when no main latent fires, the top-sharing latent has cosine ≥ `full_cos_threshold`, and carries at
   least `proportion_threshold` of a non-negative `probe_proj`.
   Beside it, the same with x − b_dec in place of x ("centered"): SAEBench projects the raw x, so a decoder bias with
   a component along p̂ (the default SAE's is about −5 against x · p̂ of about +5 on true positives) shifts what the
   40 % threshold is measured against.
5. Per letter: the summed fractions (and full absorptions) over its probe true positives; the figures are the means
   over letters that have any.

Simplifications, for a CPU: `n_words` words sampled from the vocabulary (SAEBench uses all of it), `n_icl` in-context
examples (SAEBench: 10), one prompt per word used for the probe, the sparse probes and the absorption alike (SAEBench
draws fresh examples for the last), and the prompt cut after the word (the activation at the word of a causal model
does not depend on what follows). Letters with fewer than `min_test_words` test words are left out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ProbeError
from ..models import capture, pad_batch
from .fitters import newton_logistic

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"


@dataclass(frozen=True)
class AbsorptionConfig:
    """How first-letter absorption is measured (defaults: SAEBench's thresholds, CPU-sized data)."""

    n_words: int = 2000
    """Words sampled from the vocabulary (words)."""
    n_icl: int = 3
    """In-context examples before each word (examples)."""
    test_fraction: float = 0.2
    """Share of the words held out for the sparse probes' F1 and the absorption itself (fraction, 0 to 1)."""
    max_k: int = 10
    """Largest k of the k-sparse probes (latents)."""
    f1_jump: float = 0.03
    """Rise in test F1 that counts one more latent as a split of the letter (F1 units)."""
    l1: float = 0.01
    """L1 penalty of the latent probe that ranks latents, on the sum of |weights| per letter (loss units)."""
    steps: int = 300
    """Full-batch Adam steps of the residual and latent probes (steps; SAEBench runs 50 epochs of 4,096-word
    batches over a vocabulary of tens of thousands of words, i.e. hundreds of steps)."""
    lr: float = 0.01
    """Starting learning rate of both probes, decayed exponentially to `end_lr` (per step)."""
    end_lr: float = 1e-5
    """Final learning rate of both probes (per step)."""
    weight_decay: float = 1e-4
    """Adam weight decay of the residual letter probe (per step)."""
    cos_threshold: float = 0.1
    """Smallest cosine with the probe direction for a latent to count as an absorber (cosine)."""
    full_cos_threshold: float = 0.025
    """Smallest cosine of the top-sharing latent for a full absorption (cosine)."""
    proportion_threshold: float = 0.4
    """Share of the probe projection the absorbers must carry (fraction of x · p̂)."""
    max_absorbers: int = 3
    """Most latents that together may absorb a letter on one word (latents)."""
    min_test_words: int = 2
    """Letters with fewer test words than this are left out (words)."""
    texts_per_batch: int = 32
    """Prompts per forward pass (prompts)."""

    def validate(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ProbeError(f"AbsorptionConfig.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        for name in ("n_words", "max_k", "steps", "max_absorbers", "texts_per_batch", "min_test_words"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProbeError(f"AbsorptionConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.n_icl, bool) or not isinstance(self.n_icl, int) or self.n_icl < 0:
            raise ProbeError(f"AbsorptionConfig.n_icl must be an int >= 0, got {self.n_icl!r}")


# --------------------------------------------------------------------------- words and their activations


def vocab_words(tokenizer, min_len: int = 2) -> list[str]:
    """Tokens of the vocabulary that read as one ASCII word of at least `min_len` letters (a leading space dropped),
    as SAEBench's alphabetic tokens; sorted, without duplicates."""
    words = set()
    for tok in tokenizer.get_vocab():
        s = tokenizer.convert_tokens_to_string([tok])
        w = s[1:] if s.startswith(" ") else s
        if len(w) >= min_len and w.isascii() and w.isalpha():
            words.add(w)
    return sorted(words)


def _prompt(word: str, examples: Sequence[str]) -> str:
    lines = [TEMPLATE.format(word=e) + " " + e[0].upper() for e in examples]
    return "\n".join([*lines, word])  # cut after the word: the causal activation there ignores the rest


def _word_position(tok, text: str, word: str) -> tuple[list[int], int] | None:
    """Token ids of `text` and the index of the one token that is exactly the final `word`; None when it is not."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    lo, hi = len(text) - len(word), len(text)
    inside = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > lo and a < hi]
    if len(inside) != 1 or tuple(enc["offset_mapping"][inside[0]]) != (lo, hi):
        return None
    return list(enc["input_ids"]), inside[0]


def word_prompts(lm, words: Sequence[str], n: int, n_icl: int, seed: int) -> list[tuple[str, list[int], int]]:
    """Up to `n` (word, token ids with BOS, word position) for words drawn at random (seeded) whose first letter is
    a-z and that are one token after `n_icl` in-context examples drawn from the same words."""
    if not getattr(lm.tokenizer, "is_fast", False):
        raise ProbeError(f"{lm.name}'s tokenizer is not a fast tokenizer; finding the word's token needs offsets")
    rng = random.Random(seed)
    pool = [w for w in words if w and w[0].lower() in LETTERS]
    if len(pool) < 2:
        raise ProbeError(f"{lm.name}'s vocabulary has {len(pool)} alphabetic word tokens; absorption needs many")
    order = pool[:]
    rng.shuffle(order)
    bos = lm.tokenizer.bos_token_id
    out = []
    for w in order:
        examples = [e for e in rng.sample(pool, k=min(n_icl + 1, len(pool))) if e != w][:n_icl]
        got = _word_position(lm.tokenizer, _prompt(w, examples), w)
        if got is None:
            continue
        ids, pos = got
        if bos is not None and (not ids or ids[0] != bos):
            ids, pos = [bos, *ids], pos + 1
        out.append((w, ids, pos))
        if len(out) >= n:
            break
    return out


@torch.no_grad()
def word_activations(lm, site, prompts: Sequence[tuple[str, list[int], int]], texts_per_batch: int = 32):
    """The residual at each prompt's word token [N, d] (float32, CPU), one forward pass per batch."""
    rows = []
    for i in range(0, len(prompts), texts_per_batch):
        chunk = prompts[i : i + texts_per_batch]
        ids, mask = pad_batch([p[1] for p in chunk], lm.pad_id)
        h = capture(lm, [site], ids.to(lm.device), mask.to(lm.device))[site]
        rows.append(torch.stack([h[b, p[2]] for b, p in enumerate(chunk)]).float().cpu())
    return torch.cat(rows)


# --------------------------------------------------------------------------- probes


def ovr_probe(
    X: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    steps: int,
    lr: float,
    end_lr: float,
    weight_decay: float = 0.0,
    l1: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes [n_classes, d] and biases, trained together by full-batch Adam on BCE with each
    class's positives weighted by negatives / positives, plus `l1` × the mean over classes of Σ|w|; the learning
    rate decays exponentially from `lr` to `end_lr` over `steps` steps (SAEBench's multi-probe)."""
    X = X.float()
    Y = torch.nn.functional.one_hot(labels.long(), n_classes).float()
    pos = Y.sum(0)
    pos_weight = (len(Y) - pos) / pos.clamp_min(1)
    W = torch.zeros(n_classes, X.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / max(1, steps))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(X @ W.T + b, Y)
            if l1:
                loss = loss + l1 * W.abs().sum(-1).mean()
            loss.backward()
            opt.step()
            sched.step()
    return W.detach(), b.detach()


def balanced_logistic(X: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 50) -> torch.Tensor:
    """Class-balanced L2 logistic regression (scikit-learn's class_weight="balanced": C·Σ wᵢ·log-loss + ½‖w‖², bias
    not penalised) for a batch of problems X [P, N, k], y [P, N] in {0, 1}, in float64 (`fitters.newton_logistic`).
    Returns theta [P, k + 1] (weights, then bias)."""
    X, y = X.double(), y.double()
    P, N, k = X.shape
    n_pos = y.sum(-1, keepdim=True).clamp_min(1)
    n_neg = (N - y.sum(-1, keepdim=True)).clamp_min(1)
    w = torch.where(y > 0, N / (2 * n_pos), N / (2 * n_neg))
    reg = torch.full((1, k + 1), 1.0 / C, dtype=X.dtype)
    return newton_logistic(X, y, w, reg, max_iter=max_iter, tol=1e-9)


def f1(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """F1 of boolean predictions [..., N] against boolean truth [..., N] (0 when nothing is predicted or true)."""
    tp = (pred & truth).sum(-1).double()
    denom = pred.sum(-1).double() + truth.sum(-1).double()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


# --------------------------------------------------------------------------- main latents and absorption


def main_latents(
    F_train: torch.Tensor,
    y_train: torch.Tensor,
    F_test: torch.Tensor,
    y_test: torch.Tensor,
    letters: Sequence[int],
    cfg: AbsorptionConfig,
) -> dict[int, dict]:
    """Per letter index: the ranked latents of the L1 latent probe, the k-sparse probes' test F1 for k = 1..max_k
    and the main latents (the feature-splitting rule). F_* are dense latent activations [N, m]."""
    active = (F_train != 0).any(0).nonzero().squeeze(1)
    if active.numel() == 0:
        return {c: {"main": [], "f1_by_k": [], "ranked": []} for c in letters}
    W, _ = ovr_probe(
        F_train[:, active], y_train, len(LETTERS), steps=cfg.steps, lr=cfg.lr, end_lr=cfg.end_lr,
        weight_decay=1e-6, l1=cfg.l1,
    )  # fmt: skip
    let = torch.tensor(list(letters))
    kmax = min(cfg.max_k, int(active.numel()))
    ranked = active[W[let].topk(kmax, dim=1).indices]  # [P, kmax]
    ytr = y_train[None, :] == let[:, None]
    yte = y_test[None, :] == let[:, None]
    scores = []
    for k in range(1, kmax + 1):
        idx = ranked[:, :k]
        theta = balanced_logistic(F_train[:, idx].permute(1, 0, 2), ytr)
        s = (F_test[:, idx].permute(1, 0, 2).double() @ theta[:, :k, None]).squeeze(-1) + theta[:, k : k + 1]
        scores.append(f1(s > 0, yte))
    f1s = torch.stack(scores, 1)  # [P, kmax]
    out = {}
    for i, c in enumerate(letters):
        best, main = -math.inf, []
        for k in range(kmax):
            if float(f1s[i, k]) <= best + cfg.f1_jump:
                break
            best, main = float(f1s[i, k]), ranked[i, : k + 1].tolist()
        out[c] = {"main": main, "f1_by_k": f1s[i].tolist(), "ranked": ranked[i].tolist()}
    return out


def word_absorption(
    x: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor, p: torch.Tensor, main: Sequence[int], cfg: AbsorptionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorption fraction [n] and full absorption [n] (bool) of n words of one letter from their residuals x [n, d],
    latent activations f [n, m], the decoder W_dec [m, d] and the letter probe's direction p [d] (module docstring)."""
    p = (p / p.norm()).double()
    W = W_dec.double()
    along = W @ p  # [m]: each decoder row's component along p
    cos = along / W.norm(dim=1).clamp_min(1e-12)
    proj = x.double() @ p  # [n]
    share = f.double() * along  # [n, m]
    is_main = torch.zeros(W.shape[0], dtype=torch.bool)
    is_main[list(main)] = True
    main_proj = share[:, is_main].sum(1)
    cand = torch.where((~is_main & (cos >= cfg.cos_threshold))[None, :] & (share > 0), share, torch.zeros_like(share))
    absorbed = cand.topk(min(cfg.max_absorbers, cand.shape[1]), dim=1).values.sum(1)
    safe = torch.where(proj.abs() > 1e-12, proj, torch.full_like(proj, 1e-12))
    none = (main_proj >= proj) | (absorbed / safe < cfg.proportion_threshold)
    a = torch.minimum(absorbed, proj - main_proj)
    partial = (a / (a + main_proj).clamp_min(1e-12)).clamp(0, 1)
    frac = torch.where(none, torch.zeros_like(proj), torch.where(main_proj <= 0, torch.ones_like(proj), partial))
    top_val, top_idx = share.max(1)
    silent = (f[:, is_main].abs() < 1e-8).all(1) if is_main.any() else torch.ones(len(proj), dtype=torch.bool)
    full = (
        silent & (cos[top_idx] >= cfg.full_cos_threshold) & (proj >= 0) & (top_val / safe >= cfg.proportion_threshold)
    )
    return frac.float(), full


def absorption_from_acts(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    W_dec: torch.Tensor,
    cfg: AbsorptionConfig | None = None,
    *,
    b_dec: torch.Tensor | None = None,
) -> dict:
    """First-letter absorption from residuals at word tokens x_* [N, d] and their letters y_* [N] (indices into
    LETTERS), any SAE given as `encode` (x [n, d] -> dense activations [n, m]) and its decoder rows W_dec [m, d].

    Returns absorption (the mean over letters of the mean absorption fraction over the letter's probe true
    positives, SAEBench's mean_absorption_fraction_score), absorption_full (the same for full absorption,
    its mean_full_absorption_score), split_features (main latents per letter, mean), probe_f1 (the residual letter
    probe's test F1, mean over the letters used), letters (how many had probe true positives) and per_letter.
    With `b_dec` (the SAE's decoder bias), also absorption_centered / absorption_full_centered: the same with the
    probe projection of x − b_dec, the part of x along p̂ that the latents are there to carry (SAEBench projects x
    itself, so a decoder bias along p̂ moves its thresholds)."""
    cfg = cfg or AbsorptionConfig()
    cfg.validate()
    y_train, y_test = torch.as_tensor(y_train).long(), torch.as_tensor(y_test).long()
    W, b = ovr_probe(
        x_train, y_train, len(LETTERS), steps=cfg.steps, lr=cfg.lr, end_lr=cfg.end_lr, weight_decay=cfg.weight_decay
    )
    letters = [
        c for c in range(len(LETTERS)) if int((y_test == c).sum()) >= cfg.min_test_words and (y_train == c).any()
    ]
    with torch.no_grad():
        F_train, F_test = encode(x_train).float().cpu(), encode(x_test).float().cpu()
    mains = main_latents(F_train, y_train, F_test, y_test, letters, cfg)
    score = x_test.float() @ W.T + b  # [n_test, 26]
    per: dict[str, dict] = {}
    for c in letters:
        tp = (y_test == c) & (score[:, c] > 0)
        row = {
            "main_latents": mains[c]["main"],
            "sparse_f1_by_k": [round(v, 4) for v in mains[c]["f1_by_k"]],
            "probe_f1": float(f1(score[:, c] > 0, y_test == c)),
            "n_test_words": int((y_test == c).sum()),
            "n_true_positives": int(tp.sum()),
        }
        if tp.any():
            frac, full = word_absorption(x_test[tp], F_test[tp], W_dec.detach().cpu(), W[c], mains[c]["main"], cfg)
            row["absorption"] = float(frac.sum()) / int(tp.sum())
            row["absorption_full"] = float(full.sum()) / int(tp.sum())
            if b_dec is not None:
                xc = x_test[tp] - b_dec.detach().float().cpu()
                frac, full = word_absorption(xc, F_test[tp], W_dec.detach().cpu(), W[c], mains[c]["main"], cfg)
                row["absorption_centered"] = float(frac.sum()) / int(tp.sum())
                row["absorption_full_centered"] = float(full.sum()) / int(tp.sum())
        per[LETTERS[c]] = row
    used = [r for r in per.values() if "absorption" in r]
    mean = lambda key: float(sum(r[key] for r in used) / len(used)) if used else float("nan")  # noqa: E731
    return {
        "absorption": mean("absorption"),
        "absorption_full": mean("absorption_full"),
        **(
            {
                "absorption_centered": mean("absorption_centered"),
                "absorption_full_centered": mean("absorption_full_centered"),
            }
            if b_dec is not None
            else {}
        ),
        "split_features": float(sum(len(r["main_latents"]) for r in used) / len(used)) if used else float("nan"),
        "probe_f1": mean("probe_f1"),
        "letters": len(used),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "per_letter": per,
    }


def first_letter_absorption(lm, sae, cfg: AbsorptionConfig | None = None, *, seed: int = 0, words=None) -> dict:
    """First-letter absorption of `sae` on `lm` at the SAE's site (module docstring): words from the model's
    vocabulary (or `words`), prompts, residuals, a seeded word-level train/test split, then `absorption_from_acts`."""
    cfg = cfg or AbsorptionConfig()
    cfg.validate()
    site = lm.check_site(sae.cfg.site or "")
    words = vocab_words(lm.tokenizer) if words is None else list(words)
    prompts = word_prompts(lm, words, cfg.n_words, cfg.n_icl, seed)
    if len(prompts) < 4:
        raise ProbeError(f"only {len(prompts)} words of {lm.name}'s vocabulary are one token in the prompt; need >= 4")
    X = word_activations(lm, site, prompts, cfg.texts_per_batch)
    y = torch.tensor([LETTERS.index(w[0].lower()) for w, _, _ in prompts])
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, min(len(prompts) - 1, round(cfg.test_fraction * len(prompts))))
    te, tr = perm[:n_test], perm[n_test:]
    dev, dt = sae.W_dec.device, sae.W_dec.dtype

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([sae.encode(c.to(dev, dt)).float().cpu() for c in x.split(512)])

    out = absorption_from_acts(X[tr], y[tr], X[te], y[te], encode, sae.W_dec, cfg, b_dec=sae.b_dec)
    out["n_words"] = len(prompts)
    return out
