"""Calibration: turn a fixed clamp strength into a slider with a measured range.

For each strength of one intervention we generate answers to 20 fixed neutral questions and measure
- concept rate: share of answers that express the concept. Method "keywords" (default): an answer
  counts when it contains any keyword (case-insensitive, whole words). A judge callable
  (text -> bool) can replace it; the result says which was used. An answer that loops (more than
  `LOOP_REPETITION` of its token 3-grams repeat an earlier one, "cats cats cats") never counts: a
  strong push on a concept's tokens makes such loops, and perplexity does not see them (a loop is
  predictable once started);
- coherence: perplexity of the steered answer under the *unsteered* model (given the same prompt),
  token-weighted over all answers, and the repetition rate: share of n-grams (n=3 tokens) in an answer
  that repeat an earlier n-gram of the same answer, averaged over answers.
The suggested strength maximises the concept rate among strengths whose perplexity stays within
`ppl_bound` × the unsteered perplexity (ties: the smallest such strength).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import atomic_write_json
from ..documents import read_prompts
from ..errors import PromptFileError
from ..models import LoadedModel
from ..progress import ProgressBar
from .config import LOOP_REPETITION
from .generate import GenerationConfig, format_prompt, generate
from .interventions import SteerError
from .renamed import renamed_keyword

NEUTRAL_PROMPTS = [
    "What should I cook for dinner tonight?",
    "Can you give me some advice on learning a new language?",
    "What is a good way to start the morning?",
    "Tell me a short story.",
    "How do I stay focused while working from home?",
    "What are some fun things to do on a weekend?",
    "Describe your favourite place.",
    "How can I improve my sleep?",
    "What makes a good friend?",
    "Give me three tips for saving money.",
    "What is the best way to learn to play an instrument?",
    "Write a short poem about the evening.",
    "How do plants grow?",
    "What should I pack for a trip?",
    "Why do people enjoy music?",
    "How can I be more productive?",
    "What is your favourite season and why?",
    "Explain how a bicycle works.",
    "What do you like to think about?",
    "Tell me something interesting.",
]

DEFAULT_SWEEP_CONFIG = dict(max_new_tokens=48, temperature=0.7, top_p=0.9, seed=0)


def read_questions(path: str | Path | None) -> list[str]:
    """Neutral questions to calibrate on: the built-in 20 when `path` is None, else a prompt file
    (`documents.read_prompts`) with at least 2."""
    if path is None:
        return list(NEUTRAL_PROMPTS)
    qs = [q.strip() for q in read_prompts(path) if q.strip()]
    if len(qs) < 2:
        raise PromptFileError(f"{path}: expected at least 2 neutral questions; found {len(qs)}")
    return qs


def mentions(text: str, keywords: Sequence[str]) -> bool:
    """Whole-word, case-insensitive keyword match (a keyword may contain spaces)."""
    t = text.lower()
    return any(re.search(r"(?<!\w)" + re.escape(k.lower()) + r"(?!\w)", t) for k in keywords if k.strip())


def repetition_rate(token_ids: Sequence[int], n: int = 3) -> float:
    """Share of n-grams that already occurred earlier in the same sequence (0 = none repeated)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not grams:
        return 0.0
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


@torch.no_grad()
def perplexity(
    lm: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    *,
    texts_per_batch: int | None = None,
    batch_size: int | None = None,
) -> tuple[float, int]:
    """exp(mean NLL) of the answer tokens given their prompts under the (unsteered) model; (ppl, n_tokens).
    `texts_per_batch`: prompt + answer texts per forward pass (default 8; `batch_size` is its old name)."""
    texts_per_batch = renamed_keyword(
        texts_per_batch, batch_size, new="texts_per_batch", old="batch_size", where="perplexity", default=8
    )
    nll, count = 0.0, 0
    pairs = [(list(p), list(a)) for p, a in zip(prompt_ids, answer_ids) if len(a)]
    for i in range(0, len(pairs), texts_per_batch):
        chunk = pairs[i : i + texts_per_batch]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        tgt = torch.full_like(ids, -100)
        for b, (p, a) in enumerate(chunk):
            seq = p + a
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            tgt[b, len(p) : len(seq)] = torch.tensor(a)
        ids, mask, tgt = ids.to(lm.device), mask.to(lm.device), tgt.to(lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        t = tgt[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100, reduction="sum"
        )
        nll += float(loss)
        count += int((t != -100).sum())
    return (math.exp(nll / count) if count else float("nan")), count


@dataclass
class SweepPoint:
    strength: float
    concept_rate: float
    perplexity: float
    repetition: float
    samples: list[str] = field(default_factory=list)
    looping: float = 0.0  # share of answers that loop (never counted as mentioning the concept)


@dataclass
class SweepResult:
    points: list[SweepPoint]
    baseline: SweepPoint  # unsteered
    ppl_bound: float
    suggested: float | None
    concept_method: str
    keywords: list[str]
    n_prompts: int
    config: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[dict]:
        base = self.baseline.perplexity
        return [
            {
                "strength": p.strength,
                "concept_rate": p.concept_rate,
                "perplexity": p.perplexity,
                "ppl_ratio": p.perplexity / base if base else float("nan"),
                "repetition": p.repetition,
            }
            for p in self.points
        ]


def evaluate(
    lm: LoadedModel,
    interventions: Sequence,
    *,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    keywords: Sequence[str] = (),
    judge: Callable[[str], bool] | None = None,
    config: GenerationConfig | None = None,
    strength: float = 0.0,
    keep_samples: int | None = None,
    loop_limit: float = LOOP_REPETITION,
) -> SweepPoint:
    """Generate once with the interventions and measure concept rate, perplexity and repetition.

    Every answer is kept (`keep_samples` caps them): a rate over 20 answers is read best beside them.
    """
    config = config or GenerationConfig(**DEFAULT_SWEEP_CONFIG)
    gens = generate(lm, list(prompts), interventions, config)
    return score_answers(
        lm, gens, keywords=keywords, judge=judge, strength=strength, keep_samples=keep_samples, loop_limit=loop_limit
    )


def score_answers(
    lm: LoadedModel,
    gens: Sequence,
    *,
    keywords: Sequence[str] = (),
    judge: Callable[[str], bool] | None = None,
    strength: float = 0.0,
    keep_samples: int | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    loop_limit: float = LOOP_REPETITION,
) -> SweepPoint:
    """Concept rate (looping answers never count), perplexity under the unsteered model given
    `prompt_ids` (default: each answer's own prompt) and repetition of generated answers."""
    reps = [repetition_rate(g.token_ids) for g in gens]
    said = [(judge(g.text) if judge else mentions(g.text, keywords)) for g in gens]
    hit = [h and r <= loop_limit for h, r in zip(said, reps)]
    ppl, _ = perplexity(lm, prompt_ids or [g.prompt_ids for g in gens], [g.token_ids for g in gens])
    kept = gens if keep_samples is None else gens[:keep_samples]
    return SweepPoint(
        float(strength),
        sum(hit) / len(hit),
        ppl,
        sum(reps) / len(reps),
        [g.text for g in kept],
        sum(r > loop_limit for r in reps) / len(reps),
    )


def suggest(points: Sequence[SweepPoint], baseline_ppl: float, ppl_bound: float) -> float | None:
    ok = [p for p in points if math.isfinite(p.perplexity) and p.perplexity <= ppl_bound * baseline_ppl]
    if not ok:
        return None
    best = max(p.concept_rate for p in ok)
    return min((p.strength for p in ok if p.concept_rate == best), key=abs)


def sweep(
    lm: LoadedModel,
    make: Callable[[float], list],
    strengths: Sequence[float],
    *,
    keywords: Sequence[str] = (),
    judge: Callable[[str], bool] | None = None,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    config: GenerationConfig | None = None,
    ppl_bound: float = 2.0,
    progress: bool = True,
) -> SweepResult:
    """Sweep one intervention's strength; make(strength) returns the interventions to apply.

    make() is called for every strength first, so a bad value fails before anything is generated.
    """
    if not keywords and judge is None:
        raise SteerError("give a keyword list (or a judge) to measure the concept rate")
    if not strengths:
        raise SteerError("give at least one strength to sweep")
    for s in strengths:
        if not math.isfinite(float(s)):
            raise SteerError(f"strength must be finite, got {s!r}")
    if not ppl_bound > 0:
        raise SteerError(f"ppl_bound must be > 0, got {ppl_bound}")
    config = config or GenerationConfig(**DEFAULT_SWEEP_CONFIG)
    built = [(float(s), make(float(s))) for s in strengths]
    from .interventions import Steerer

    for _, ivs in built:
        Steerer(lm, ivs)  # validation only
    for p in prompts:  # context-window check before any generation
        if len(format_prompt(lm, p, chat=config.chat, system=config.system)) + config.max_new_tokens > lm.max_context:
            raise SteerError(f"prompt {p[:40]!r}… plus max_new_tokens exceeds the context window ({lm.max_context})")
    kw = dict(prompts=prompts, keywords=keywords, judge=judge, config=config)
    it = built
    with ProgressBar("sweep", len(built) + 1, unit="strengths", enabled=progress, transient=True) as bar:
        base = evaluate(lm, [], strength=0.0, **kw)
        bar.advance()
        points = []
        for s, ivs in it:
            points.append(evaluate(lm, ivs, strength=s, **kw))
            bar.advance()
    return SweepResult(
        points,
        base,
        float(ppl_bound),
        suggest(points, base.perplexity, ppl_bound),
        "judge" if judge else "keywords",
        list(keywords),
        len(prompts),
        asdict(config),
    )


def plot_sweep(result: SweepResult, path: str | Path, *, title: str = "") -> Path | None:
    """Concept rate and perplexity ratio against strength, as a PNG. Returns None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [p.strength for p in result.points]
    base = result.baseline.perplexity
    fig, ax1 = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax1.plot(xs, [100 * p.concept_rate for p in result.points], "o-", color="tab:blue", label="concept rate")
    ax1.set_xlabel("strength")
    ax1.set_ylabel(f"concept rate (%; {result.concept_method})", color="tab:blue")
    ax1.set_ylim(-5, 105)
    ax2 = ax1.twinx()
    ax2.plot(xs, [p.perplexity / base for p in result.points], "s--", color="tab:red", label="perplexity ratio")
    ax2.axhline(result.ppl_bound, color="tab:red", lw=0.8, ls=":")
    ax2.set_ylabel("perplexity / unsteered", color="tab:red")
    if result.suggested is not None:
        ax1.axvline(result.suggested, color="grey", lw=0.8)
    ax1.set_title(title or f"steering sweep (suggested: {result.suggested})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_sweep(result: SweepResult, path: str | Path) -> Path:
    return atomic_write_json(path, result.to_dict())


def sweep_preset(
    lm: LoadedModel,
    preset,
    strengths: Sequence[float],
    *,
    index: int = 0,
    keywords: Sequence[str] = (),
    judge=None,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    config: GenerationConfig | None = None,
    ppl_bound: float = 2.0,
    progress: bool = True,
    store_range: bool = True,
):
    """Sweep item `index` of a preset; returns (SweepResult, preset with range/suggested filled in)."""
    if not 0 <= index < len(preset.items):
        raise SteerError(f"preset {preset.name!r} has {len(preset.items)} interventions; index {index} is out of range")
    cache: dict = {}
    others = preset.build(lm, sae_cache=cache)

    def make(s):
        ivs = preset.with_strength(index, s).build(lm, sae_cache=cache)
        return ivs

    del others
    res = sweep(
        lm,
        make,
        strengths,
        keywords=keywords,
        judge=judge,
        prompts=prompts,
        config=config,
        ppl_bound=ppl_bound,
        progress=progress,
    )
    out = preset
    if store_range:
        out = preset.with_strength(index, res.suggested if res.suggested is not None else preset.items[index].strength)
        out.items[index].range = [float(min(strengths)), float(max(strengths))]
        out.items[index].suggested = res.suggested
    return res, out
