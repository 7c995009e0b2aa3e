"""Cost of one NLA reinforcement-learning step and of one `nla explain`, on the shipped default NLA.

One RL step (`thoughtscope.nla.grpo.rl_step`, the `rl` stage's settings from the shipped recipe: 4 vectors x G = 4
samples, up to 48 new tokens, temperature 1, KL 0.01, the AR co-trained) is timed on two code paths:

  plain    today's path: HF generate for every sample, the reference and policy log-probs from full-sequence
           passes with the LM head on every position, the AR run twice (reward, then its training step)
  cached   each vector's prompt runs once for its group (its KV cache repeated over the samples), a sampler that
           mirrors HF generate's sampling step, logits on the explanation tokens only, one AR pass

Both start every round from the same weights (the shipped warm-start AV as the reference, the final AV and AR
as the policy, fresh AdamW optimisers) on the same 4 training vectors (`baseline_rows.safetensors`, which holds
them normalised: the AV rescales its input and the reward normalises, so this is the same step) and the same
seed; they alternate in rounds (plain first in even rounds) and each ratio is taken within its round, so a
change in machine load favours neither. Reported, medians over rounds:

  rl_step_speedup      plain seconds / cached seconds (the target is >= 3); rl_step_cost_ratio is its inverse
  rl_step_s            seconds of one step on each path, and phases_s: where the time goes (sample, reward,
                       reference, policy_forward, policy_backward, ar_step)
  same_numbers         from the first round: whether both paths sampled the same explanations, and the largest
                       difference between their step figures (loss, reward, KL, AR loss) and gradients
  explain_seconds      `nla explain` for one token with the model and NLA loaded: the greedy explanation of the
                       last token of a short text and its round trip (`explain_text(nla, text, [-1])`)
  load_seconds         loading the target model and the shipped NLA, which the CLI does once per call

    python benchmarks/nla.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

from thoughtscope.nla import NLATrainConfig, explain_text, load_nla
from thoughtscope.nla.bundle import WARM_AV_FILE, load_weights
from thoughtscope.nla.grpo import rl_step
from thoughtscope.nla.recipe import stage_settings

TEXT = "The lighthouse keeper climbed the stairs every night to light the lamp for the"
STATS = ("loss", "reward", "kl", "length", "well_formed", "ar_loss")


def training_vectors(nla, n: int) -> torch.Tensor:
    from safetensors.torch import load_file

    rows = load_file(str(nla.path / "baseline_rows.safetensors"))
    return rows["vectors"][rows["split"] == 0][:n].float()


def one_step(nla, start: dict, vectors: torch.Tensor, cfg: NLATrainConfig, seed: int, cached: bool) -> dict:
    """Restore the starting weights, run one RL step on `vectors` with `seed`; seconds, phases, figures, weights."""
    nla.av.load_adapter_state(start["av"])
    nla.ar.load_adapter_state(start["ar"])
    opt = torch.optim.AdamW(nla.av.trainable_parameters(), lr=cfg.lr)
    ar_opt = torch.optim.AdamW(nla.ar.trainable_parameters(), lr=cfg.ar_lr)
    seen: list = []
    decode = nla.av.decode
    nla.av.decode = lambda comp: seen.append(decode(comp)) or seen[-1]  # records the rollouts, changes nothing
    phases: dict = {}
    try:
        torch.manual_seed(seed)
        sync(nla.lm.device)
        t = time.perf_counter()
        st = rl_step(nla, vectors, opt, ar_opt, cfg, cached=cached, timings=phases)
        sync(nla.lm.device)
        dt = time.perf_counter() - t
    finally:
        del nla.av.decode
    # the gradients the optimisers just applied stay in .grad until the next step
    grads = [p.grad.detach().clone() for p in nla.av.trainable_parameters() + nla.ar.trainable_parameters()]
    return {"s": dt, "phases": phases, "stats": st, "rollouts": seen[0], "grads": grads}


def compare(a: dict, b: dict) -> dict:
    stat_diff = max(abs(a["stats"][k] - b["stats"][k]) for k in STATS if k in a["stats"] and k in b["stats"])
    g_diff = max(float((x - y).abs().max()) for x, y in zip(a["grads"], b["grads"]))
    g_max = max(float(x.abs().max()) for x in a["grads"])
    return {
        "same_rollouts": a["rollouts"] == b["rollouts"],
        "max_abs_diff_step_figures": stat_diff,
        "max_abs_diff_gradients": g_diff,
        "max_abs_gradient": g_max,
        "well_formed": a["stats"]["well_formed"],
        "ar_step_ran": "ar_loss" in a["stats"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (under ~3 minutes on 2 cores)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2 quick, 4 full)")
    p.add_argument("--explain-repeats", type=int, default=None, help="timed explain calls (default 3 quick, 5)")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 4)
    repeats = args.explain_repeats or (3 if args.quick else 5)
    load_before = os.getloadavg()

    t = time.perf_counter()
    if args.device == "cpu":
        nla = load_nla("default")
    else:  # the shipped NLA reads the default model: loaded on the device, the NLA's adapters follow it
        from thoughtscope.models import load_model

        nla = load_nla("default", lm=load_model("default", device=args.device))
    load_s = time.perf_counter() - t
    cfg = NLATrainConfig(**stage_settings("rl"))
    vectors = training_vectors(nla, cfg.batch_size)
    # the rl stage's reference is the warm-start AV; the policy starts from the shipped (final) weights
    final_av = {k: v.detach().clone() for k, v in nla.av.adapter_state().items()}
    nla.av.load_adapter_state(load_weights(nla.path / WARM_AV_FILE))
    nla.av.set_reference()
    start = {"av": final_av, "ar": {k: v.detach().clone() for k, v in nla.ar.adapter_state().items()}}

    one_step(nla, start, vectors, cfg, args.seed + 1, cached=True)  # warm-up: allocator, first-call costs
    per_round = []
    check = None
    for i in range(rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {cached: one_step(nla, start, vectors, cfg, args.seed, cached) for cached in order}
        if check is None:
            check = compare(got[False], got[True])
        r = {
            "order": "plain,cached" if order[0] is False else "cached,plain",
            "plain_s": got[False]["s"],
            "cached_s": got[True]["s"],
            "speedup": got[False]["s"] / got[True]["s"],
            "plain_phases_s": got[False]["phases"],
            "cached_phases_s": got[True]["phases"],
        }
        per_round.append(r)
        print(
            f"round {i + 1}/{rounds} ({r['order']}): plain {r['plain_s']:.2f} s, cached {r['cached_s']:.2f} s "
            f"-> {r['speedup']:.2f}x",
            flush=True,
        )

    nla.av.load_adapter_state(start["av"])
    nla.ar.load_adapter_state(start["ar"])
    explain_text(nla, TEXT, [-1])  # warm-up
    ex = []
    for _ in range(repeats):
        sync(nla.lm.device)
        t = time.perf_counter()
        row = explain_text(nla, TEXT, [-1])[0]
        sync(nla.lm.device)
        ex.append(time.perf_counter() - t)

    med = statistics.median
    phases = {
        path: {k: med(r[f"{path}_phases_s"].get(k, 0.0) for r in per_round) for k in per_round[0][f"{path}_phases_s"]}
        for path in ("plain", "cached")
    }
    res = {
        "model": nla.lm.name,
        "site": nla.cfg.site,
        "rl_settings": {k: getattr(cfg, k) for k in ("batch_size", "group_size", "temperature", "kl_coef", "clip")}
        | {"max_new_tokens": cfg.max_new_tokens or nla.cfg.max_new_tokens},
        "threads": torch.get_num_threads(),
        **device_info(args.device),
        "quick": args.quick,
        "rounds": rounds,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "rl_step_speedup": med(r["speedup"] for r in per_round),
        "rl_step_cost_ratio": med(1 / r["speedup"] for r in per_round),
        "rl_step_s": {"plain": med(r["plain_s"] for r in per_round), "cached": med(r["cached_s"] for r in per_round)},
        "phases_s": phases,
        "same_numbers": check,
        "explain_seconds": med(ex),
        "explain_text": TEXT,
        "explain_example": {k: row[k] for k in ("position", "token", "explanation", "fve")},
        "load_seconds": load_s,
        "per_round": per_round,
    }
    print(
        f"{res['threads']} threads, median of {rounds} alternating rounds: plain {res['rl_step_s']['plain']:.2f} s, "
        f"cached {res['rl_step_s']['cached']:.2f} s, rl_step_speedup {res['rl_step_speedup']:.2f}x (target >= 3)"
    )
    for path in ("plain", "cached"):
        print(f"  {path:7s} " + ", ".join(f"{k} {v:.2f}" for k, v in phases[path].items()))
    print(
        f"same rollouts {check['same_rollouts']}, largest difference: step figures "
        f"{check['max_abs_diff_step_figures']:.2e}, gradients {check['max_abs_diff_gradients']:.2e} "
        f"(largest gradient {check['max_abs_gradient']:.2e})"
    )
    print(f"explain_seconds {res['explain_seconds']:.2f} (one token, loaded; loading takes {load_s:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
