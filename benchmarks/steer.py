"""Steering overhead and steering-vector fitting on the default model, in one run.

1. Generation tokens/s with three active interventions (an SAE feature clamp and a projection at the
   SAE's site, a vector added to generated tokens two blocks earlier) versus the same loop with none,
   interleaved repeats, median; also Hugging Face `model.generate` (greedy, same length) for reference.
   `overhead_ratio` = steered / plain tokens per second (target >= 0.95).
2. Steering-vector fitting from contrastive pairs: ours (`fit_vector`, method "pca" = repeng's pca_diff)
   versus repeng's `read_representations` on the same pairs and site: seconds and the cosine between
   the two vectors. repeng 0.4 pins numpy<2 and names `np.float_` (gone in numpy 2); we alias it before
   importing. Without repeng, the reference is our own re-implementation of its documented method
   (sklearn PCA of paired differences + its sign rule) and the output says so.

    python benchmarks/steer.py --quick --json out.json      (--tiny for a random tiny model)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync
from _repeng import repeng_direction

from thoughtscope.models import load_model, tiny_model
from thoughtscope.steer import FeatureEdit, GenerationConfig, VectorEdit, fit_vector, generate
from thoughtscope.steer.presets import default_sae_path

PAIRS_POS = [
    "I am so happy today, everything is",
    "What a wonderful, joyful day, I feel",
    "I love this, it makes me smile and",
    "Great news! I am thrilled that",
    "Life is beautiful and I am grateful for",
    "I feel cheerful and excited about",
]
PAIRS_NEG = [
    "I am so sad today, everything is",
    "What a terrible, gloomy day, I feel",
    "I hate this, it makes me cry and",
    "Bad news. I am upset that",
    "Life is hard and I am tired of",
    "I feel miserable and worried about",
]
TOPICS = ["work", "the weather", "my family", "the weekend", "school", "dinner", "the city", "my garden"]


def pairs(n):
    out = []
    for i in range(n):
        t = TOPICS[i // len(PAIRS_POS) % len(TOPICS)]
        out.append((f"{PAIRS_POS[i % len(PAIRS_POS)]} {t}", f"{PAIRS_NEG[i % len(PAIRS_NEG)]} {t}"))
    return out


def get_sae(lm, site, tiny):
    from thoughtscope.sae import SAE, SAEConfig, load_sae

    p = default_sae_path()
    if not tiny and p.is_dir():
        return load_sae(p, device=lm.device).eval().requires_grad_(False), f"default SAE ({p})"
    n = 512 if tiny else 9216
    cfg = SAEConfig(arch="topk", d_model=lm.d_model, n_features=n, k=32, site=site)
    sae = SAE.from_config(cfg, seed=0).to(lm.device).eval().requires_grad_(False)
    return sae, f"random topk SAE ({n} features; default SAE not installed)"


def time_gen(lm, prompts, ivs, cfg):
    """(tokens/s by wall clock, tokens/s by process CPU time): CPU time is robust to a machine shared
    with other jobs, where wall-clock time mostly measures the neighbours."""
    t, c = time.perf_counter(), time.process_time()
    out = generate(lm, prompts, ivs, cfg)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    n = sum(len(g.token_ids) for g in out)
    return n / dt, n / dc


def time_hf(lm, prompts, n):
    from thoughtscope.steer.generate import encode_prompts

    ids, mask, _, _ = encode_prompts(lm, prompts, GenerationConfig(max_new_tokens=n))
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    sync(lm.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id or 0,
        )
    sync(lm.device)
    dt = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) * len(prompts) / dt


def reference_pca_diff(h_pos, h_neg):
    """repeng's documented pca_diff: sklearn-style (centred) PCA of differences, sign by pairwise projection."""
    d = (h_pos - h_neg).double()
    d = d - d.mean(0)
    v = torch.linalg.svd(d, full_matrices=False)[2][0].float()
    if ((h_pos @ v) < (h_neg @ v)).float().mean() > ((h_pos @ v) > (h_neg @ v)).float().mean():
        v = -v
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (smoke test of the script)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=None)
    add_device_arg(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = tiny_model("llama", d_model=64, n_layers=4) if args.tiny else load_model(args.model, device=args.device)
    lm.model.to(args.device)
    site_layer = min(15, lm.n_layers - 2)  # not the last block: HF applies the final norm to its hidden_states
    site = f"resid.{site_layer}"
    sae, sae_desc = get_sae(lm, site, args.tiny)
    site = sae.cfg.site or site
    site_layer = int(site.split(".")[1])
    vec_site = f"resid.{max(0, site_layer - 2)}"
    g = torch.Generator().manual_seed(0)
    ivs = [
        FeatureEdit(sae, 7, "clamp", 5.0, site=site, label="clamp"),
        VectorEdit(torch.randn(lm.d_model, generator=g), vec_site, "add", strength=0.1, positions="generated"),
        VectorEdit(sae.W_dec[11].detach(), site, "project_out"),
    ]
    n_new = 16 if args.quick else 64
    reps = 4 if args.quick else 8
    prompts = [
        "Tell me about your day.",
        "What is the capital of France?",
        "Write a haiku about rain.",
        "How do I bake bread?",
    ]
    cfg = GenerationConfig(max_new_tokens=n_new, temperature=0.7, seed=0, stop_at_eos=False)
    time_gen(lm, prompts[:1], [], GenerationConfig(max_new_tokens=4, stop_at_eos=False))  # warm-up
    plain, steered, ratios, ratios_cpu = [], [], [], []
    for r in range(reps):
        # alternate the order so drift in machine load does not favour one side
        first_plain = r % 2 == 0
        a = time_gen(lm, prompts, [] if first_plain else ivs, cfg)
        b = time_gen(lm, prompts, ivs if first_plain else [], cfg)
        p_, s_ = (a, b) if first_plain else (b, a)
        plain.append(p_[0])
        steered.append(s_[0])
        ratios.append(s_[0] / p_[0])
        ratios_cpu.append(s_[1] / p_[1])
    hf = time_hf(lm, prompts, n_new)
    res = {
        "model": lm.name,
        "sae": sae_desc,
        "batch": len(prompts),
        "new_tokens": n_new,
        "repeats": reps,
        "threads": torch.get_num_threads(),
        **device_info(args.device),
        "plain_tokens_per_s": statistics.median(plain),
        "steered_tokens_per_s": statistics.median(steered),
        "hf_generate_tokens_per_s": hf,
    }
    res["overhead_ratio"] = statistics.median(ratios)  # median over adjacent (plain, steered) pairs
    res["overhead_ratio_cpu_time"] = statistics.median(ratios_cpu)
    res["overhead_ratios"] = ratios
    res["loop_vs_hf_generate"] = res["plain_tokens_per_s"] / hf
    print(
        f"generation ({len(prompts)} prompts x {n_new} new tokens, median of {reps}): plain "
        f"{res['plain_tokens_per_s']:.1f} tok/s, 3 interventions {res['steered_tokens_per_s']:.1f} tok/s "
        f"-> overhead_ratio {res['overhead_ratio']:.3f} (by CPU time {res['overhead_ratio_cpu_time']:.3f}; "
        f"target >= 0.95); HF generate {hf:.1f} tok/s "
        f"(our loop {res['loop_vs_hf_generate']:.2f}x)"
    )

    prs = pairs(12 if args.quick else 48)
    t = time.perf_counter()
    ours = fit_vector(lm, site, prs, method="pca", add_bos=False, typical_norm=False).vector
    t_ours = time.perf_counter() - t
    try:
        ref, t_ref = repeng_direction(lm, site_layer, prs)
        ref_name = "repeng " + __import__("importlib.metadata").metadata.version("repeng")
    except Exception as e:  # not installed or not runnable here
        from thoughtscope.steer.vectors import last_token_acts

        t = time.perf_counter()
        h = last_token_acts(lm, site, [x for p in prs for x in p], add_bos=False)
        ref = reference_pca_diff(h[0::2], h[1::2])
        t_ref = time.perf_counter() - t
        ref_name = f"re-implementation of repeng's pca_diff (repeng unavailable: {type(e).__name__}: {e})"
    cos = float(torch.nn.functional.cosine_similarity(ours.float(), ref.float(), dim=0))
    res.update(
        vector_pairs=len(prs),
        vector_site=site,
        vector_reference=ref_name,
        vector_fit_seconds_ours=t_ours,
        vector_fit_seconds_reference=t_ref,
        vector_fit_speedup=t_ref / t_ours,
        vector_cosine=cos,
    )
    print(
        f"vector fit ({len(prs)} pairs at {site}): ours {t_ours:.2f} s, {ref_name} {t_ref:.2f} s "
        f"(speed-up {t_ref / t_ours:.2f}x), cosine {cos:.4f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
