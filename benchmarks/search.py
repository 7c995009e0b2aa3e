"""Search by meaning (`thoughtscope.atlas.search_concept`): does a concept word find a feature that really is
about it, judged on text the atlas never saw?

For every word of the list (benchmarks/data/search_words.txt by default, or --words FILE: one word or phrase a
line, '#' comments; a line '# tune' starts the tuning half, '# held-out' the held-out half; a file without them
is all held out):

  hit   the top 5 features `search_concept` returns include one whose HELD-OUT top contexts contain the word.

Held-out top contexts, precisely: the model and SAE read a slice of the same corpus right after the text the
atlas read (same read plan: context length and contexts per pass from the atlas's own config; the slice starts
at the first whole forward pass past the atlas's tokens, so no token of it was in the atlas). A feature's
held-out top contexts are its 10 highest activations on that slice whose windows do not overlap (taken
strongest first among its 40 highest activations; position 0 excluded as the SAE excludes it), the window of
an activation being the 5 tokens before the peak, the peak token and the 1 token after it (7 tokens, clipped
to the context). A context "contains the word" when the decoded text of its window holds the word or an
inflection (-s, -es, -ed, -d, -ing, -ies for -y, -ing for -e) as a whole word, in any case; as the windows do
not overlap, one occurrence of the word counts for one context at most. The feature
counts when at least 3 of its 10 held-out top contexts contain the word (`MIN_CONTEXTS`); a stricter variant,
at least 5 of 10, is reported beside it (`search_hit_rate_majority`). A word that occurs fewer than 3 times
in the held-out slice cannot be hit, and still counts as a miss (its count is in the per-word detail); the
slice (98,304 tokens with --quick, 131,072 otherwise, --heldout-tokens) bounds how many words can be hit at
all, which search_hit_rate_ceiling reports.

Figures: search_hit_rate (all words), search_hit_rate_tune, search_hit_rate_heldout, the same for the
majority rule, search_hit_rate_ceiling (the share of words for which at least one feature of the whole SAE meets
the rule on this slice: no search can score above it) and search_hit_rate_evaluable (the hit rate among those
words), search_ms (median latency of one search after the token index is built; the first search,
which builds the index and the model-side caches, is timed apart as first_search_s), per-word detail.

    python benchmarks/search.py --quick --json out.json        # builds a small atlas of the default corpus
    python benchmarks/search.py --atlas /work/exp/s4/atlas --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

from thoughtscope.atlas import AtlasConfig, build_atlas, open_with_model, search_concept
from thoughtscope.atlas.search import concept_signals, token_index
from thoughtscope.corpus import Corpus
from thoughtscope.features import excludes_position_0
from thoughtscope.models import load_model
from thoughtscope.plans import ReadPlan
from thoughtscope.sae import load_sae
from thoughtscope.sites import capture

WORDS = Path(__file__).parent / "data" / "search_words.txt"
TOP_HITS = 5  # hits looked at per word
TOP_CONTEXTS = 10  # held-out top contexts per feature (non-overlapping windows)
CANDIDATES = 40  # highest activations per feature kept from the held-out pass, to pick those 10 from
MIN_CONTEXTS = 3  # of them that must contain the word
MAJORITY = 5  # the stricter variant
BEFORE, AFTER = 5, 1  # tokens before / after the peak in the window that must contain the word


def read_words(path: Path) -> list[tuple[str, str]]:
    """(word, 'tune' | 'held-out') per line; without section lines every word is held out."""
    out, part = [], "held-out"
    for line in Path(path).read_text("utf-8").splitlines():
        s = line.strip()
        if s.lower() in ("# tune", "# held-out"):
            part = s[2:].lower()
            continue
        w = s.split("#", 1)[0].strip()
        if w:
            out.append((w, part))
    if not out:
        sys.exit(f"{path}: no words (one word or phrase a line)")
    return out


def word_pattern(phrase: str) -> re.Pattern:
    """The phrase, its last word inflected, as whole words in any case."""
    *head, last = phrase.lower().split()
    forms = {last, last + "s", last + "es", last + "ed", last + "d", last + "ing"}
    if last.endswith("y"):
        forms.add(last[:-1] + "ies")
    if last.endswith("e"):
        forms.add(last[:-1] + "ing")
    pre = r"\s+".join(re.escape(h) for h in head)
    alt = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(r"(?<!\w)" + (pre + r"\s+" if pre else "") + "(" + alt + r")(?!\w)", re.I)


@torch.no_grad()
def heldout_tops(lm, sae, corpus, cfg: dict, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top values [40, F], their flat token index [40, F], the slice's token ids [N, T]) over the held-out slice."""
    ctx, per = cfg["ctx_len"], cfg["contexts_per_batch"]
    batch = ctx * per
    skip = cfg.get("skip_tokens", 0) + math.ceil(math.ceil(cfg["n_tokens"] / ctx) / per) * batch  # the atlas's passes
    plan = ReadPlan(n_tokens=n_tokens, ctx_len=ctx, contexts_per_batch=per, add_bos=cfg["add_bos"], skip_tokens=skip)
    site = sae.cfg.site
    F = int(sae.W_dec.shape[0])
    top_v = torch.zeros(CANDIDATES, F)
    top_i = torch.full((CANDIDATES, F), -1, dtype=torch.long)
    rows, seen = [], 0
    for _, b in plan.batches(corpus, lm.tokenizer):
        ids = b.input_ids.to(lm.device)
        x = capture(lm, [site], ids, torch.ones_like(ids))[lm.check_site(site)]
        a = sae.encode(x.reshape(-1, x.shape[-1]).to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
        if excludes_position_0(sae):
            a.view(ids.shape[0], ids.shape[1], -1)[:, 0] = 0
        v, i = a.topk(CANDIDATES, dim=0)
        v2, j = torch.cat([top_v, v]).topk(CANDIDATES, dim=0)
        top_i = torch.cat([top_i, i + seen]).gather(0, j)
        top_v = v2
        rows.append(b.input_ids)
        seen += ids.numel()
        if seen >= n_tokens:
            break
    return top_v, top_i, torch.cat(rows)


def contexts_with_word(tok, toks: torch.Tensor, top_v, top_i, f: int, pat: re.Pattern) -> int:
    """How many of feature f's held-out top contexts (non-overlapping windows, see the module doc) hold the word."""
    T = toks.shape[1]
    n, kept = 0, []
    for v, i in zip(top_v[:, f].tolist(), top_i[:, f].tolist()):
        if v <= 0 or i < 0 or len(kept) >= TOP_CONTEXTS:
            break
        c, p = divmod(i, T)
        if any(c == c2 and abs(p - p2) <= BEFORE + AFTER for c2, p2 in kept):
            continue
        kept.append((c, p))
        win = toks[c, max(1, p - BEFORE) : min(T, p + AFTER + 1)].tolist()
        n += bool(pat.search(tok.decode(win)))
    return n


def passing_features(tok, toks, top_v, top_i, pats: dict[str, re.Pattern]) -> dict[str, int]:
    """Per word, how many features of the whole SAE meet the rule: 0 means no search could hit it on this slice."""
    T = toks.shape[1]
    wins = []
    for f in range(top_v.shape[1]):
        kept: list[tuple[int, int]] = []
        for v, i in zip(top_v[:, f].tolist(), top_i[:, f].tolist()):
            if v <= 0 or i < 0 or len(kept) >= TOP_CONTEXTS:
                break
            c, p = divmod(i, T)
            if not any(c == c2 and abs(p - p2) <= BEFORE + AFTER for c2, p2 in kept):
                kept.append((c, p))
        wins.append([tok.decode(toks[c, max(1, p - BEFORE) : min(T, p + AFTER + 1)].tolist()) for c, p in kept])
    return {w: sum(sum(bool(pat.search(x)) for x in ws) >= MIN_CONTEXTS for ws in wins) for w, pat in pats.items()}


def heldout(args, lm, sae, at) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The held-out pass, or its saved result (--heldout-cache) when it was made from the same atlas and budget."""
    n_held = args.heldout_tokens or (98_304 if args.quick else 131_072)
    key = {"atlas_created": at.meta.get("created"), "config": at.meta["config"], "n_tokens": n_held}
    c = args.heldout_cache
    if c is not None and c.is_file():
        saved = torch.load(c)
        if saved["key"] == key:
            return saved["top_v"], saved["top_i"], saved["toks"], 0.0
    t = time.perf_counter()
    top_v, top_i, toks = heldout_tops(lm, sae, Corpus("default"), at.meta["config"], n_held)
    if c is not None:
        torch.save({"key": key, "top_v": top_v, "top_i": top_i, "toks": toks}, c)
    return top_v, top_i, toks, time.perf_counter() - t


def tune(args, lm, sae, at, words, toks, top_v, top_i) -> None:
    """Try a grid of weights on the TUNING half only; print each setting's hit rate there."""
    import itertools

    rows = []
    for w, part in words:
        if part == "tune":
            rows.append((concept_signals(lm, sae, at, w, templates=not args.no_templates), word_pattern(w)))
    cache: dict[tuple[int, str], int] = {}
    results = []
    grid = {
        "tokens": (1, 2, 4),
        "neighbours": (0, 0.5, 1),
        "templates": (0.25, 0.5, 1),
        "output": (0, 1),
        "text": (0.5,),
    }
    for combo in itertools.product(*grid.values()):
        wts = dict(zip(grid, combo))
        hit = 0
        for sig, pat in rows:
            for f, _ in sig.top(TOP_HITS, wts):
                key = (f, sig.query)
                if key not in cache:
                    cache[key] = contexts_with_word(lm.tokenizer, toks, top_v, top_i, f, pat)
                if cache[key] >= MIN_CONTEXTS:
                    hit += 1
                    break
        results.append((hit / len(rows), wts))
    results.sort(key=lambda r: -r[0])
    for r, wts in results[:10]:
        print(f"tune-half hit rate {r:.3f}  {json.dumps(wts)}")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small atlas and held-out slice (about 3 minutes)")
    p.add_argument("--atlas", type=Path, help="an atlas of the default SAE (default: build a small one)")
    p.add_argument("--words", type=Path, default=WORDS, help="one word or phrase a line")
    p.add_argument("--heldout-tokens", type=int, help="held-out slice tokens (default 98,304 quick, else 131,072)")
    p.add_argument("--weights", help="JSON: signal weights to try (tuning runs only)")
    p.add_argument("--tune", action="store_true", help="grid-search the weights on the tuning half, print, exit")
    p.add_argument("--heldout-cache", type=Path, help="save the held-out pass here, reuse it when it matches")
    p.add_argument("--no-templates", action="store_true", help="leave out the template signal (no model pass)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own); 1 is steadier on a busy machine")
    p.add_argument("--json", type=Path)
    add_device_arg(p)
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    words = read_words(args.words)
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="search-bench-")
    if args.atlas is not None:
        at, lm, sae = open_with_model(args.atlas, device=args.device)
    else:
        lm = load_model("default", device=args.device)
        sae = load_sae("default", device=args.device)
        cfg = AtlasConfig(n_tokens=16_384 if args.quick else 65_536, ctx_len=128, contexts_per_batch=16)
        path = build_atlas(lm, sae, Corpus("default"), Path(tmp.name) / "atlas", cfg, progress=False)
        at, lm, sae = open_with_model(path.parent, sae_path="default", lm=lm, device=args.device)
    build_s = time.perf_counter() - t0
    top_v, top_i, toks, heldout_s = heldout(args, lm, sae, at)
    if args.tune:
        return tune(args, lm, sae, at, words, toks, top_v, top_i)
    text = lm.tokenizer.decode(toks[:, 1:].reshape(-1).tolist())
    weights = json.loads(args.weights) if args.weights else None
    t2 = time.perf_counter()
    token_index(at)
    index_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    search_concept(lm, sae, at, "water", k=TOP_HITS, weights=weights, templates=not args.no_templates)
    first_s = time.perf_counter() - t3
    passing = passing_features(lm.tokenizer, toks, top_v, top_i, {w: word_pattern(w) for w, _ in words})
    detail, times = [], []
    for w, part in words:
        sync(args.device)
        t = time.perf_counter()
        hits = search_concept(lm, sae, at, w, k=TOP_HITS, weights=weights, templates=not args.no_templates)
        sync(args.device)
        times.append(1000 * (time.perf_counter() - t))
        pat = word_pattern(w)
        found = [(h.feature, contexts_with_word(lm.tokenizer, toks, top_v, top_i, h.feature, pat)) for h in hits]
        detail.append(
            {
                "word": w,
                "part": part,
                "heldout_occurrences": len(pat.findall(text)),
                "features_meeting_rule": passing[w],
                "hit": any(n >= MIN_CONTEXTS for _, n in found),
                "hit_majority": any(n >= MAJORITY for _, n in found),
                "hits": [{**h.to_dict(), "heldout_contexts_with_word": n} for h, (_, n) in zip(hits, found)],
                "ms": round(times[-1], 1),
            }
        )
    out = figures(detail, times)
    out.update(
        atlas=str(at.path),
        atlas_tokens=at.meta.get("n_tokens"),
        heldout_tokens=int(toks.numel()),
        words=str(args.words),
        weights=weights,
        templates=not args.no_templates,
        torch_threads=torch.get_num_threads(),
        setup_s={"atlas": round(build_s, 1), "heldout_pass": round(heldout_s, 1), "token_index": round(index_s, 2)},
        first_search_s=round(first_s, 2),
        rule=f"top {TOP_HITS} hits; >= {MIN_CONTEXTS} of a feature's {TOP_CONTEXTS} held-out top contexts hold the "
        f"word in tokens peak-{BEFORE}..peak+{AFTER} (majority: >= {MAJORITY})",
        **device_info(args.device),
        detail=detail,
    )
    for d in detail:
        print(
            f"{d['word']:<14}{d['part']:<9} occ {d['heldout_occurrences']:>4}  hit {d['hit']!s:<5} "
            f"{[(h['feature'], h['heldout_contexts_with_word']) for h in d['hits']]}"
        )
    print(json.dumps({k: v for k, v in out.items() if k != "detail"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    tmp.cleanup()


def figures(detail: list[dict], times: list[float]) -> dict:
    def rate(rows, key="hit"):
        return round(sum(d[key] for d in rows) / len(rows), 3) if rows else None

    tune = [d for d in detail if d["part"] == "tune"]
    held = [d for d in detail if d["part"] != "tune"]
    can = [d for d in detail if d["features_meeting_rule"]]
    return {
        "search_hit_rate_ceiling": round(len(can) / len(detail), 3),
        "search_hit_rate_evaluable": rate(can),
        "search_hit_rate": rate(detail),
        "search_hit_rate_tune": rate(tune),
        "search_hit_rate_heldout": rate(held),
        "search_hit_rate_majority": rate(detail, "hit_majority"),
        "search_hit_rate_majority_tune": rate(tune, "hit_majority"),
        "search_hit_rate_majority_heldout": rate(held, "hit_majority"),
        "search_ms": round(statistics.median(times), 1),
        "n_words": len(detail),
        "n_tune": len(tune),
        "n_heldout": len(held),
    }


if __name__ == "__main__":
    main()
