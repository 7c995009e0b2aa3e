"""Generation speed on the default model: batch 1 against llama.cpp, steering's cost, batch 24 against
transformers' `generate`, int8 weights' cost, and what the workbench's generating tools gain.

1. **Batch 1** (greedy, `--tokens` new tokens after each prompt, stop at nothing): decode tokens/s, timed from the
   first generated token to the last (the prompt's prefill is left out on every side), median over `--rounds`
   alternating rounds, one thread per side (two threads per side on 2 shared cores only measure spin-waiting).
   Contenders: ours (`steer.generate`, lean decoder, exact weights, and int8 weights), our loop over
   transformers' forward (the path before the lean decoder), transformers' `model.generate` (total rate: it
   has no first-token hook), and llama.cpp (PyPI `llama-cpp-cffi`, its C API, one thread) on an F32 GGUF that
   llama.cpp itself converts from the shipped Q4_1 file (the same float32 weights as ours) and on that Q4_1.
   Keys: `batch1_vs_llamacpp_f32` (ours exact ÷ llama.cpp F32; goal >= 0.8), `batch1_vs_llamacpp_q4`,
   `batch1_int8_vs_llamacpp_f32`, `batch1_vs_transformers_loop`; `exact_same_tokens` (ours == transformers'
   `generate`, token for token), `llamacpp_f32_same_prefix` (tokens llama.cpp F32 agrees with before the
   first difference, as a share).
2. **Steering** (`steered_vs_plain`, goal >= 0.95): the shipped default steering (the sky feature added at
   resid.15 on the answer's tokens) against no intervention, the same lean loop, alternating rounds.
3. **Batch 24** (`batch24_vs_generate`, goal >= 1.5): 24 chat prompts, left-padded, ours against
   `model.generate`, same tokens checked, same threads; and ours with bfloat16 weights (`weights="bf16"`: a batch
   of rows is compute-bound, and oneDNN multiplies bf16 on the CPU's bf16 / AMX units) against `generate` as
   users run it (float32: `batch24_bf16_vs_generate`) and against `generate` on a bfloat16 copy of the model
   (`batch24_bf16_vs_generate_bf16`); `batch24_bf16_same_prefix`: the share of each answer's greedy tokens bf16
   shares with exact before the first difference.
4. **Low-precision cost**: perplexity of held-out corpus text through the lean decoder with exact, int8 and bf16
   weights (`int8_perplexity_ratio`, `bf16_perplexity_ratio`), and the share of greedy tokens int8 shares with
   exact before the first difference.
5. **The workbench** (`equalizer_speedup`, `find_speedup`): the equalizer's three lanes (unsteered, prompt-only
   baseline, steered; 48 tokens) and `steer find` on one concept (full run only, or `--find`; exact weights, since
   bf16 needs the lean decoder), each timed with `$THOUGHTSCOPE_DECODER=transformers` against the default, in one
   process; the same answers are checked.

    python benchmarks/generate.py --quick --json out.json
    python benchmarks/generate.py --parts workbench --json find.json     (one part again: batch1, steering,
                                                                          batch24, int8 (low precision), workbench)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # helpers.llamacpp: the llama.cpp driver the slow tests use

from thoughtscope.models import REGISTERED, load_model, pad_batch  # noqa: E402
from thoughtscope.steer import GenerationConfig, generate  # noqa: E402
from thoughtscope.steer.config import DECODER_ENV  # noqa: E402
from thoughtscope.steer.generate import eos_ids, format_prompt  # noqa: E402

PROMPTS = ["Tell me a short story about a lighthouse.", "Explain how a bicycle works."]
BATCH_QUESTIONS = [
    "Tell me about the sea.", "What is a good breakfast?", "Describe your favourite city.", "How do trees grow?",
    "Why is the sky blue?", "Write a short poem about rain.", "What should I cook tonight?", "How do bees make honey?",
    "What is the best way to learn a language?", "Describe a walk in the mountains.", "Why do cats purr?",
    "How does a train work?", "What makes a good friend?", "Tell me about the moon.", "How is bread made?",
    "What do you like about winter?", "Explain what a river delta is.", "Describe a busy market.",
    "Why do leaves change colour?", "How do birds fly?", "What is a library for?", "Tell me about volcanoes.",
    "How do I plant tomatoes?", "What is your favourite song about?",
]  # fmt: skip


def _cfg(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False, **kw)


def ours_decode(lm, prompt: str, n: int, ivs=(), **kw) -> tuple[float, list[int]]:
    """Decode tokens/s of steer.generate (from the first token to the last) and the tokens."""
    stamps: list[float] = []
    out = generate(lm, [prompt], ivs, _cfg(n, **kw), on_token=lambda ev: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out[0].token_ids


def hf_generate(lm, prompt: str, n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([format_prompt(lm, prompt)], device=lm.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=lm.pad_id)  # fmt: skip
    sync(lm.device)
    dt = time.perf_counter() - t
    return n / dt, out[0, ids.shape[1] :].tolist()


def llamacpp_decode(ll, ids: list[int], n: int) -> tuple[float, list[int]]:
    """llama.cpp's greedy decode, timed like ours: from the first generated token to the last."""
    import numpy as np

    ll.lib.llama_kv_self_clear(ll.ctx)
    logits = ll._logits(list(ids))
    out = [int(np.argmax(logits))]
    t = time.perf_counter()
    for _ in range(n - 1):
        out.append(int(np.argmax(ll._logits([out[-1]]))))
    return (n - 1) / (time.perf_counter() - t), out


def _same_until_eos(ours: list[int], ref: list[int], stops: set[int]) -> bool:
    """The same tokens up to our first end-of-sequence token (`generate` with min_new_tokens masks it and goes on
    with the next best, where our fixed-length run writes it)."""
    cut = next((i for i, t in enumerate(ours) if t in stops), len(ours))
    return ours[:cut] == ref[:cut]


def _prefix(a: list[int], b: list[int]) -> float:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k / max(1, len(a))


def batch1(lm, args, log) -> dict:
    cpu = lm.device.type == "cpu"
    try:
        if not cpu:
            raise RuntimeError(f"llama.cpp runs on the CPU here; the model is on {lm.device}")
        from helpers.llamacpp import LlamaCpp, to_f32

        src = REGISTERED["default"].locate()
        home = Path(os.environ.get("THOUGHTSCOPE_HOME", Path.home() / ".cache" / "thoughtscope")) / "bench"
        home.mkdir(parents=True, exist_ok=True)
        peers = {"llamacpp_f32": LlamaCpp(to_f32(src, home / "smollm2-135m-f32.gguf")), "llamacpp_q4": LlamaCpp(src)}
        peer_note = "llama-cpp-cffi (C API, one thread)"
    except (ImportError, RuntimeError) as e:
        peers, peer_note = {}, f"llama.cpp not run: {e}"
    log(f"[batch 1] {peer_note}")
    runs: dict[str, list[float]] = {}
    tokens: dict[str, dict[int, list[int]]] = {}

    def record(name, i, rate, toks):
        runs.setdefault(name, []).append(rate)
        tokens.setdefault(name, {})[i] = toks

    n = args.tokens
    for r in range(args.rounds):
        for i, p in enumerate(PROMPTS):
            record("ours", i, *ours_decode(lm, p, n, decoder="lean"))
            if cpu:  # int8 weights are a CPU kernel
                record("ours_int8", i, *ours_decode(lm, p, n, decoder="lean", weights="int8"))
            record("transformers_loop", i, *ours_decode(lm, p, n, decoder="transformers"))
            record("hf_generate", i, *hf_generate(lm, p, n))
            for name, ll in peers.items():
                record(name, i, *llamacpp_decode(ll, format_prompt(lm, p), n))
        log(f"[batch 1] round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()))
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {f"{k}_tok_s": round(v, 2) for k, v in med.items()}
    stops = eos_ids(lm)
    res["exact_same_tokens"] = all(_same_until_eos(tokens["ours"][i], tokens["hf_generate"][i], stops)
                                   for i in tokens["ours"])  # fmt: skip
    res["batch1_vs_transformers_loop"] = round(med["ours"] / med["transformers_loop"], 3)
    res["batch1_vs_hf_generate"] = round(med["ours"] / med["hf_generate"], 3)
    if cpu:
        res["int8_same_prefix"] = round(statistics.mean(_prefix(tokens["ours"][i], tokens["ours_int8"][i])
                                                        for i in tokens["ours"]), 3)  # fmt: skip
    if peers:
        res["batch1_vs_llamacpp_f32"] = round(med["ours"] / med["llamacpp_f32"], 3)
        res["batch1_vs_llamacpp_q4"] = round(med["ours"] / med["llamacpp_q4"], 3)
        res["batch1_int8_vs_llamacpp_f32"] = round(med["ours_int8"] / med["llamacpp_f32"], 3)
        res["batch1_int8_vs_llamacpp_q4"] = round(med["ours_int8"] / med["llamacpp_q4"], 3)
        res["llamacpp_f32_same_prefix"] = round(statistics.mean(_prefix(tokens["ours"][i], tokens["llamacpp_f32"][i])
                                                                for i in tokens["ours"]), 3)  # fmt: skip
    res["peer"] = peer_note
    return res


def sky(lm):
    """The shipped SAE and its sky feature clamped at 1.75x max on the answer's tokens (the default steering)."""
    from thoughtscope.sae import load_sae
    from thoughtscope.steer import clamp
    from thoughtscope.steer.presets import default_sae_path

    sae = load_sae(default_sae_path()).eval().requires_grad_(False)
    return sae, [clamp(sae, 3448, 1.75, unit="max", positions="generated")]


def steering(lm, args, log) -> dict:
    _, ivs = sky(lm)
    plain, steered = [], []
    for _ in range(args.rounds):
        for p in PROMPTS:
            plain.append(ours_decode(lm, p, args.tokens)[0])
            steered.append(ours_decode(lm, p, args.tokens, ivs)[0])
    res = {"plain_tok_s": round(statistics.median(plain), 2), "steered_tok_s": round(statistics.median(steered), 2)}
    res["steered_vs_plain"] = round(res["steered_tok_s"] / res["plain_tok_s"], 3)
    log(f"[steering] {res}")
    return res


def batch24(lm, args, log) -> dict:
    import copy

    n = args.batch_tokens
    rows = [format_prompt(lm, q) for q in BATCH_QUESTIONS]
    ids, mask = pad_batch(rows, lm.pad_id, left=True)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    half = copy.deepcopy(lm.model).to(torch.bfloat16)  # transformers' generate with bfloat16 weights, for bf16's pair

    def hf(model):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=lm.pad_id)  # fmt: skip
        sync(lm.device)
        return time.perf_counter() - t, out

    def ours(weights):
        t = time.perf_counter()
        out = generate(lm, BATCH_QUESTIONS, (), _cfg(n, weights=weights))
        return time.perf_counter() - t, out

    times: dict[str, list[float]] = {k: [] for k in ("ours", "hf", "ours_bf16", "hf_bf16")}
    same, prefix = True, []
    stops = eos_ids(lm)
    for _ in range(max(1, args.rounds - 1)):
        dt, out = ours("exact")
        times["ours"].append(dt)
        dt, ref = hf(lm.model)
        times["hf"].append(dt)
        same = same and all(_same_until_eos(g.token_ids, ref[i, ids.shape[1] :].tolist(), stops)
                            for i, g in enumerate(out))  # fmt: skip
        dt, low = ours("bf16")
        times["ours_bf16"].append(dt)
        prefix += [_prefix(g.token_ids, e.token_ids) for g, e in zip(low, out)]
        times["hf_bf16"].append(hf(half)[0])
    total = len(BATCH_QUESTIONS) * n
    rate = {k: round(total / statistics.median(v), 1) for k, v in times.items()}
    res = {
        "batch24_ours_tok_s": rate["ours"],
        "batch24_generate_tok_s": rate["hf"],
        "batch24_same_tokens": same,
        "batch24_bf16_tok_s": rate["ours_bf16"],
        "batch24_generate_bf16_tok_s": rate["hf_bf16"],
        "batch24_bf16_same_prefix": round(statistics.mean(prefix), 3),
    }
    res["batch24_vs_generate"] = round(rate["ours"] / rate["hf"], 3)
    res["batch24_bf16_vs_generate"] = round(rate["ours_bf16"] / rate["hf"], 3)
    res["batch24_bf16_vs_generate_bf16"] = round(rate["ours_bf16"] / rate["hf_bf16"], 3)
    log(f"[batch 24] {res}")
    return res


def int8_cost(lm, args, log) -> dict:
    """Perplexity of held-out corpus contexts (far from the start the shipped SAE trained on) with exact, int8 and
    bfloat16 weights."""
    from thoughtscope.corpus import Corpus
    from thoughtscope.decoding import LeanDecoder

    it = Corpus("default").contexts(lm.tokenizer, 256)
    ctxs = []
    for i, c in enumerate(it):
        if i >= 2000:
            ctxs.append(c.input_ids)
        if len(ctxs) >= args.ppl_contexts:
            break
    nll = {"exact": 0.0, "int8": 0.0, "bf16": 0.0}
    count = 0
    with torch.inference_mode():
        for ids in ctxs:
            ids = torch.as_tensor(ids).view(1, -1)
            T = ids.shape[1]
            for w in nll:
                dec = LeanDecoder(lm.model, 1, T, precision=w)
                logits = dec.prefill(ids, torch.ones_like(ids), torch.arange(T)[None], every=True)
                nll[w] += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += T - 1
    res = {f"{w}_perplexity": round(math.exp(v / count), 4) for w, v in nll.items()}
    res["int8_perplexity_ratio"] = round(res["int8_perplexity"] / res["exact_perplexity"], 4)
    res["bf16_perplexity_ratio"] = round(res["bf16_perplexity"] / res["exact_perplexity"], 4)
    res["ppl_tokens"] = count
    log(f"[int8] {res}")
    return res


def _timed_env(value: str, fn):
    old = os.environ.get(DECODER_ENV)
    os.environ[DECODER_ENV] = value
    try:
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out
    finally:
        if old is None:
            os.environ.pop(DECODER_ENV, None)
        else:
            os.environ[DECODER_ENV] = old


def workbench(lm, args, log) -> dict:
    from thoughtscope.steer.lanes import Lane, stream_lanes

    sae, ivs = sky(lm)
    lanes = [Lane("unsteered"), Lane("prompt-only", system="Talk about the sky."), Lane("steered", ivs)]

    def equalizer():
        cfg = GenerationConfig(max_new_tokens=48, temperature=0.7, seed=0, stop_at_eos=False)
        out: dict[str, list[int]] = {}
        for name, ev in stream_lanes(lm, "Tell me about your day.", lanes, cfg):
            out.setdefault(name, []).append(ev.token_id)
        return out

    res = {}
    times = {"transformers": [], "auto": []}
    outs = {}
    for _ in range(args.rounds):
        for mode in times:
            dt, outs[mode] = _timed_env(mode, equalizer)
            times[mode].append(dt)
    res["equalizer_seconds"] = {k: round(statistics.median(v), 2) for k, v in times.items()}
    res["equalizer_speedup"] = round(statistics.median(times["transformers"]) / statistics.median(times["auto"]), 3)
    res["equalizer_same_answers"] = outs["transformers"] == outs["auto"]
    log(f"[equalizer] {res}")
    if args.find:
        from thoughtscope.steer.find import Concept, FindConfig, find_handle

        concept = Concept("sky", ["sky", "skies", "clouds", "sun", "moon", "stars"])
        small = dict(n_features=1, n_screen=2, n_calibrate=1, max_new_tokens=24) if args.quick else {}
        cfg = FindConfig(weights="exact", **small)  # the decoders compared on the same arithmetic (bf16 needs lean)
        found = {}
        for mode in ("transformers", "auto"):
            dt, found[mode] = _timed_env(mode, lambda: find_handle(lm, sae, concept, config=cfg, progress=False))
            res[f"find_seconds_{mode}"] = round(dt, 1)
            log(f"[steer find] {mode}: {dt:.0f} s")
        res["find_speedup"] = round(res["find_seconds_transformers"] / res["find_seconds_auto"], 3)
        res["find_same_result"] = _summary(found["transformers"]) == _summary(found["auto"])
    return res


def _summary(result) -> str:
    """What a search found (its frontier and winner), without its wall time."""
    d = result.to_dict()
    return json.dumps({k: d[k] for k in ("frontier", "best", "baseline", "prompt_only")}, sort_keys=True, default=str)


PARTS = {"batch1": batch1, "steering": steering, "batch24": batch24, "int8": int8_cost, "workbench": workbench}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (under ~3 minutes)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (llama.cpp always runs one)")
    add_device_arg(ap)
    ap.add_argument("--find", action="store_true", help="time steer find in a --quick run too (small budget)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (of {', '.join(PARTS)})")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}: expected some of {', '.join(PARTS)}")
    args.tokens = 48 if args.quick else 128
    args.batch_tokens = 16 if args.quick else 64
    args.rounds = 2 if args.quick else 5
    args.ppl_contexts = 4 if args.quick else 32
    args.find = args.find or not args.quick
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    lm = load_model("default", device=args.device)
    if lm.device.type != "cpu":  # llama.cpp runs on the CPU here, and int8 weights are a CPU kernel
        parts = [p for p in parts if p not in ("int8",)]
    res = {
        **device_info(args.device),
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "quick": args.quick,
    }
    res["parts"] = parts
    for name in parts:
        res.update(PARTS[name](lm, args, log))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    keys = ("batch1_vs_llamacpp_f32", "batch1_vs_llamacpp_q4", "batch1_int8_vs_llamacpp_f32", "steered_vs_plain",
            "batch24_vs_generate", "batch24_bf16_vs_generate", "batch24_bf16_vs_generate_bf16", "int8_perplexity_ratio",
            "bf16_perplexity_ratio", "equalizer_speedup", "find_speedup")  # fmt: skip
    for k in keys:
        if k in res:
            log(f"{k}: {res[k]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
