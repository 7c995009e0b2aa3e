"""NLA training: `ar-sft` (regression), `av-sft` (supervised warm start), `rl` (GRPO with a live AR),
`ar-refit` (the AR fitted to the final AV's own explanations).

Every stage is resumable: the trainable weights, the optimiser state, the step and the history are
written atomically to ``<nla>/train_state/<stage>.pt`` every ``checkpoint_every`` steps. Batches are a
pure function of (seed, step), and sampling in RL is seeded per step, so an interrupted run resumed
from its checkpoint follows the same trajectory as an uninterrupted one.

Why our own GRPO loop instead of TRL's GRPOTrainer: the AV sees its vector through an embedding
hook, which TRL can only be made to arm by overriding its private `_generate_and_score_completions`
and log-prob passes (pinned to one TRL version), and the reward model (the AR) must keep training on
the rollouts, which TRL has no place for. The loop below is the whole algorithm in ~80 lines: G
samples per vector, reward −2(1 − cos) from the live AR (−2 for malformed or truncated answers),
group-normalised advantages, a clipped ratio loss, a k3 KL estimate to the warm-started AV, and one
AR step on the well-formed (explanation, vector) pairs.

Several processes (`torchrun --nproc_per_node N -m thoughtscope.nla train …`, the launcher the SAE
trainer uses): every rank builds the same global batch and keeps a disjoint, equal slice of it;
gradients of the trainable (LoRA + head) parameters are averaged across ranks before every optimiser
step, so N ranks follow one process's trajectory; logged figures are averaged too. Rank 0 alone writes
checkpoints and runs validation; an interrupted run resumes on any number of ranks that divides the batch.

Why `ar-refit`: at evaluation and in `nla explain` the AR reads the AV's *greedy* explanations, but
during RL it sees one step per batch of sampled ones, so it lags behind the policy it scores. The
refit freezes the AV, writes its greedy explanation of every training vector once (cached, resumable)
and runs AR regression on those pairs. The AR as RL left it is kept (`rl_ar.safetensors`) so `nla
eval` reports the round trip before and after the refit.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import atomic_torch_save, atomic_write_text
from ..progress import ProgressBar
from .bundle import (
    AR_FILE,
    AV_FILE,
    NLA,
    RL_AR_FILE,
    WARM_AR_FILE,
    WARM_AV_FILE,
    config_for,
    load_weights,
    save_weights,
)
from .core import NLAConfig, NLAError, nla_loss, normalise
from .data import NLARows
from .evaluate import fve

STAGES = ("ar-sft", "av-sft", "rl", "ar-refit")


@dataclass
class TrainConfig:
    """One training stage; the defaults are sized for the 135M default model on 2 CPU cores."""

    stage: str = "ar-sft"
    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: int = 10
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 25
    val_rows: int = 64
    time_budget_s: float | None = None    # stop (with a checkpoint) after this much wall time; resumable
    # --- rl
    group_size: int = 4                   # G samples per vector (4 on CPU, 8 on GPU)
    temperature: float = 1.0
    kl_coef: float = 0.01
    clip: float = 0.2
    ar_lr: float = 5e-5                   # the AR keeps training on rollout pairs
    malformed_reward: float = -2.0
    max_new_tokens: int | None = None

    def check(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise NLAError(f"unknown stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.steps < 1 or self.batch_size < 1 or self.group_size < 2 and self.stage == "rl":
            raise NLAError("steps and batch_size must be ≥ 1, and group_size ≥ 2 for rl")
        return self


# ------------------------------------------------------------------------- helpers


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of a step: epoch-wise permutations seeded by (seed, epoch), so a step's batch never depends on history."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size: (k + 1) * batch_size]


def lr_at(step: int, cfg: TrainConfig, base: float) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ------------------------------------------------------------------------- several processes


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params) -> None:
    """All-reduce the gradients of `params` to their mean over ranks (no-op in one process)."""
    import torch.distributed as dist

    _, n = world()
    if n == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= n


MEAN_KEYS = ("loss", "reward", "reward_std", "kl", "length", "well_formed", "ar_loss")


def _mean_over_ranks(rec: dict) -> dict:
    """Average the step's figures over ranks; a figure a rank lacks (no usable rollout) is left out of its mean."""
    import torch.distributed as dist

    if world()[1] == 1:
        return rec
    t = torch.tensor([[rec[k], 1.0] if isinstance(rec.get(k), float) and not math.isnan(rec[k]) else [0.0, 0.0]
                      for k in MEAN_KEYS], dtype=torch.float64)
    dist.all_reduce(t)
    out = dict(rec)
    for k, (total, count) in zip(MEAN_KEYS, t.tolist()):
        if count:
            out[k] = total / count
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


# ------------------------------------------------------------------------- GRPO


def grpo_step(av, vectors: torch.Tensor, reward_fn: Callable, opt: torch.optim.Optimizer, *, group_size: int = 4,
              temperature: float = 1.0, kl_coef: float = 0.01, clip: float = 0.2,
              max_new_tokens: int | None = None, before_step: Callable[[], None] | None = None) -> dict:
    """One GRPO update of the AV on a batch of vectors.

    reward_fn(parsed, vectors_rep, completion_ids) -> rewards [N·G], where parsed is a list of
    (explanation, well_formed). Returns the step's statistics and the rollouts for the AR step.
    before_step runs between backward and the optimiser step (the gradient all-reduce of several ranks).
    """
    G = group_size
    av.model.eval()       # no dropout: sampling and the loss see the same function
    comp = av.generate_ids(vectors, samples=G, do_sample=True, temperature=temperature,
                           max_new_tokens=max_new_tokens)
    parsed = av.decode(comp)
    v_rep = vectors.repeat_interleave(G, 0)
    rewards = torch.as_tensor(reward_fn(parsed, v_rep, comp), dtype=torch.float32).flatten()
    r = rewards.view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten().to(av.device)
    # sequences = prompt + completion; the completion counts up to and including its first end token
    P = len(av.prompt)
    prompt = torch.tensor([av.prompt] * comp.shape[0], device=av.device)
    ids = torch.cat([prompt, comp.to(av.device)], 1)
    valid = torch.ones_like(comp, dtype=torch.bool)
    for i, row in enumerate(comp.tolist()):
        for j, t in enumerate(row):
            if t in av.end_ids:
                valid[i, j + 1:] = False
                break
    att = torch.cat([torch.ones_like(prompt), valid.long()], 1)
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, P:] = valid.float()
    mask = mask[:, 1:]
    with torch.no_grad(), av.reference():
        ref = av.token_logprobs(v_rep, ids, att)
    av.model.train()
    new = av.token_logprobs(v_rep, ids, att)
    old = new.detach()      # one update per batch: the ratio starts at 1 and the clip bounds the step
    ratio = torch.exp(new - old)
    A = adv[:, None]
    pg = -torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
    log_r = ref - new
    kl = torch.exp(log_r) - log_r - 1          # k3 estimator of KL(policy ‖ reference), ≥ 0
    per_tok = pg + kl_coef * kl
    per_seq = (per_tok * mask).sum(1) / mask.sum(1).clamp_min(1)
    loss = per_seq.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    opt.step()
    av.model.eval()
    lengths = valid.sum(1).float()
    return {"loss": float(loss.detach()), "reward": float(rewards.mean()), "reward_std": float(r.std(1).mean()),
            "kl": float((kl.detach() * mask).sum() / mask.sum().clamp_min(1)), "length": float(lengths.mean()),
            "well_formed": float(sum(ok for _, ok in parsed) / len(parsed)), "parsed": parsed, "vectors": v_rep}


# ------------------------------------------------------------------------- stages


def _state_path(nla_dir: Path, stage: str) -> Path:
    return nla_dir / "train_state" / f"{stage}.pt"


def prepare_nla(nla_dir: str | os.PathLike, rows: NLARows, lm, *, stage: str, **cfg_overrides) -> NLA:
    """Open (or create) the NLA folder and load the weights this stage starts from."""
    nla_dir = Path(nla_dir)
    if (nla_dir / "nla_config.json").is_file():
        cfg = NLAConfig.load(nla_dir)
    else:
        st = rows.meta.get("stats", {})
        cfg = config_for(lm, site=rows.meta.get("site"), injection_scale=st.get("injection_scale", 0.0),
                         mean_norm=st.get("mean_norm", 0.0), mu_sq=st.get("mu_sq", 0.0),
                         warm_start=rows.meta.get("warm_start", {}), **cfg_overrides)
        # remembered so `nla eval` can harvest fresh held-out rows with the same recipe and split
        cfg.extra["data_config"] = rows.meta.get("data_config", {})
        cfg.save(nla_dir)
    if rows.meta.get("site") and rows.meta["site"] != cfg.site:
        raise NLAError(f"dataset site {rows.meta['site']} differs from the NLA's site {cfg.site} ({nla_dir})")
    nla = NLA(lm, cfg)
    nla.path = nla_dir
    if stage == "rl":
        for f in (WARM_AV_FILE, WARM_AR_FILE):
            if not (nla_dir / f).is_file():
                raise NLAError(f"{nla_dir / f} missing: run the ar-sft and av-sft stages before rl")
        nla.av.load_adapter_state(load_weights(nla_dir / WARM_AV_FILE))
        nla.ar.load_adapter_state(load_weights(nla_dir / WARM_AR_FILE))
    elif stage == "ar-refit":
        for f in (AV_FILE, AR_FILE):
            if not (nla_dir / f).is_file():
                raise NLAError(f"{nla_dir / f} missing: run the earlier stages (ar-sft, av-sft, rl) before ar-refit")
        if not (nla_dir / RL_AR_FILE).is_file():       # first run: keep the AR the refit starts from
            save_weights(load_weights(nla_dir / AR_FILE), nla_dir / RL_AR_FILE)
        nla.av.load_adapter_state(load_weights(nla_dir / AV_FILE))
        nla.ar.load_adapter_state(load_weights(nla_dir / RL_AR_FILE))
    else:
        # each supervised stage starts from its own warm weights if a previous run finished them
        pass
    return nla


def train_stage(nla_dir: str | os.PathLike, data: str | os.PathLike | NLARows, cfg: TrainConfig, *, lm=None,
                progress: bool = True, log: Callable[[dict], None] | None = None, device: str | None = None) -> dict:
    """Run (or resume) one stage; returns {'history': [...], 'done': bool, 'step': int}.

    ar-sft: AR regression on (warm-start explanation → vector), validation FVE logged.
    av-sft: AV cross-entropy on the warm-start explanation with the vector injected.
    rl:     GRPO on the AV with the live AR as the reward, the AR co-trained on rollouts.
    ar-refit: AR regression on the final AV's greedy explanations.
    device: where to load the target when lm is not given (default: this rank's GPU if there is one, else CPU).
    """
    from thoughtscope.models import load_model

    cfg.check()
    nla_dir = Path(nla_dir)
    rows = data if isinstance(data, NLARows) else NLARows.load(data)
    train, val = rows.subset("train"), rows.subset("val")
    if len(train) == 0:
        raise NLAError("the dataset has no training rows")
    rank, n_ranks = world()
    if cfg.batch_size % n_ranks:
        raise NLAError(f"batch_size {cfg.batch_size} does not split evenly over {n_ranks} processes")
    if lm is None:
        # a new NLA is for the model its rows were harvested from
        cfg_model = (NLAConfig.load(nla_dir).model if (nla_dir / "nla_config.json").is_file()
                     else rows.meta.get("model", "default"))
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        lm = load_model(cfg_model, device=device)
    if rank == 0:
        nla = prepare_nla(nla_dir, rows, lm, stage=cfg.stage)
    _barrier()          # rank 0 writes the config (and rl_ar) first; the others then read the same files
    if rank != 0:
        nla = prepare_nla(nla_dir, rows, lm, stage=cfg.stage)
    val = val.subset(torch.arange(min(cfg.val_rows, len(val))))

    refit: dict[str, list[str]] = {}
    if cfg.stage == "ar-refit":
        sets = {"train": train.vectors, "val": val.vectors}
        if rank == 0:       # one rank writes the explanations, the others read the finished cache
            greedy_explanations(nla, nla_dir, sets, progress=progress)
        _barrier()
        refit = greedy_explanations(nla, nla_dir, sets, progress=False)
        usable_rows = [i for i, e in enumerate(refit["train"]) if e.strip()]
        if not usable_rows:
            raise NLAError("the AV wrote no non-empty explanation for any training vector; nothing to refit on")
    if cfg.stage in ("ar-sft", "ar-refit"):
        params, base_lr = nla.ar.trainable_parameters(), cfg.lr
    elif cfg.stage == "av-sft":
        params, base_lr = nla.av.trainable_parameters(), cfg.lr
    else:
        params, base_lr = nla.av.trainable_parameters(), cfg.lr
        nla.av.set_reference()
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay)
    ar_opt = torch.optim.AdamW(nla.ar.trainable_parameters(), lr=cfg.ar_lr) if cfg.stage == "rl" else None

    step, history = 0, []
    sp = _state_path(nla_dir, cfg.stage)
    if sp.is_file():
        st = torch.load(sp, weights_only=False, map_location=nla.ar.device)
        if st["config"]["seed"] != cfg.seed or st["config"]["batch_size"] != cfg.batch_size:
            raise NLAError(f"{sp} was written with a different seed/batch size; delete it to start over")
        step, history = st["step"], st["history"]
        if "av" in st:
            nla.av.load_adapter_state(st["av"])
        if "ar" in st:
            nla.ar.load_adapter_state(st["ar"])
        opt.load_state_dict(st["opt"])
        if ar_opt is not None and "ar_opt" in st:
            ar_opt.load_state_dict(st["ar_opt"])

    def save_checkpoint(done: bool, stopped: bool = False) -> None:
        if rank != 0:
            return
        st = {"step": step, "history": history, "config": asdict(cfg), "opt": opt.state_dict(), "done": done}
        if cfg.stage in ("av-sft", "rl"):
            st["av"] = {k: v.detach().clone() for k, v in nla.av.adapter_state().items()}
        if cfg.stage in ("ar-sft", "rl", "ar-refit"):
            st["ar"] = {k: v.detach().clone() for k, v in nla.ar.adapter_state().items()}
        if ar_opt is not None:
            st["ar_opt"] = ar_opt.state_dict()
        atomic_torch_save(st, sp)
        # publish the weights so later stages and `nla eval` can use them
        if cfg.stage == "ar-sft":
            save_weights(nla.ar.adapter_state(), nla_dir / AR_FILE)
            if done or stopped:     # a budget-stopped stage still hands its weights to the next stage
                save_weights(nla.ar.adapter_state(), nla_dir / WARM_AR_FILE)
        elif cfg.stage == "av-sft":
            save_weights(nla.av.adapter_state(), nla_dir / AV_FILE)
            if done or stopped:
                save_weights(nla.av.adapter_state(), nla_dir / WARM_AV_FILE)
        elif cfg.stage == "ar-refit":
            save_weights(nla.ar.adapter_state(), nla_dir / AR_FILE)
        else:
            save_weights(nla.av.adapter_state(), nla_dir / AV_FILE)
            save_weights(nla.ar.adapter_state(), nla_dir / AR_FILE)
        atomic_write_text(nla_dir / "train_state" / f"{cfg.stage}.history.json", json.dumps(history, indent=1))

    def evaluate() -> dict:
        if len(val) == 0:
            return {}
        if cfg.stage == "av-sft":
            with torch.no_grad():
                nla.av.model.eval()
                loss = sum(float(nla.av.sft_loss(val.vectors[i:i + 16], val.explanations[i:i + 16])) *
                           len(val.explanations[i:i + 16]) for i in range(0, len(val), 16)) / len(val)
                shuf = val.vectors[torch.randperm(len(val), generator=torch.Generator().manual_seed(1))]
                loss_s = sum(float(nla.av.sft_loss(shuf[i:i + 16], val.explanations[i:i + 16])) *
                             len(val.explanations[i:i + 16]) for i in range(0, len(val), 16)) / len(val)
            return {"val_ce": loss, "val_ce_shuffled_vectors": loss_s}
        nla.ar.eval()
        if cfg.stage == "ar-refit":
            return {"val_fve_round_trip": fve(nla.ar.predict(refit["val"], allow_empty=True, truncate=True),
                                              val.vectors)}
        out = {"val_fve_warm_text": fve(nla.ar.predict(val.explanations), val.vectors)}
        if cfg.stage == "rl":
            sub = val.vectors[:16]
            nla.av.model.eval()
            with torch.no_grad():
                expl = nla.av.explain(sub)
            out["val_fve_round_trip"] = fve(nla.ar.predict(expl, allow_empty=True, truncate=True), sub,
                                            mu=normalise(val.vectors).mean(0))
        return out

    # training rows a step draws from: every row, or for ar-refit those the AV wrote a non-empty explanation for
    pool = torch.tensor(usable_rows) if cfg.stage == "ar-refit" else torch.arange(len(train))

    def supervised_loss(idx: torch.Tensor) -> torch.Tensor:
        rows_ = idx.tolist()
        if cfg.stage == "av-sft":
            nla.av.model.train()
            return nla.av.sft_loss(train.vectors[idx], [train.explanations[i] for i in rows_])
        nla.ar.train()
        if cfg.stage == "ar-refit":
            return nla.ar.loss([refit["train"][i] for i in rows_], train.vectors[idx], truncate=True)
        return nla.ar.loss([train.explanations[i] for i in rows_], train.vectors[idx])

    bar = ProgressBar(f"nla {cfg.stage}", cfg.steps, start=step, unit="steps", enabled=progress and rank == 0)
    t0 = time.time()
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg, base_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = pool[batch_indices(len(pool), cfg.batch_size, step, cfg.seed)]
            share = cfg.batch_size // n_ranks
            idx = idx[rank * share:(rank + 1) * share]          # this rank's slice of the global batch
            rec: dict = {"step": step + 1, "lr": lr}
            if cfg.stage == "rl":
                torch.manual_seed(cfg.seed * 1_000_003 + step * n_ranks + rank)   # each rank samples its own
                rec.update(rl_step(nla, train.vectors[idx], opt, ar_opt, cfg))
            else:
                loss = supervised_loss(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                opt.step()
                rec["loss"] = float(loss.detach())
            rec = _mean_over_ranks(rec)
            step += 1
            if rank == 0 and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                rec.update(evaluate())
            history.append(rec)
            if log and rank == 0:
                log(rec)
            bar.update(step, info=" ".join(f"{k}={v:.3f}" for k, v in rec.items()
                                           if k not in ("step", "lr") and isinstance(v, float)))
            out_of_time = cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s
            if n_ranks > 1:     # rank 0's clock decides, so every rank stops after the same step
                import torch.distributed as dist

                flag = [out_of_time]
                dist.broadcast_object_list(flag, src=0)
                out_of_time = flag[0]
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                save_checkpoint(done=step == cfg.steps, stopped=out_of_time)
            if out_of_time:
                break
    finally:
        bar.close()
    _barrier()          # the last checkpoint is on disk before any rank returns
    return {"history": history, "done": step >= cfg.steps, "step": step, "nla": nla}


def greedy_explanations(nla: NLA, nla_dir: Path, sets: dict[str, torch.Tensor], *, chunk: int = 32,
                        progress: bool = True) -> dict[str, list[str]]:
    """The frozen AV's greedy explanation of every vector, cached per chunk so an interrupted run resumes.

    The cache names the AV weights it was written with; a cache from other weights is an error rather
    than silently training the AR on someone else's explanations.
    """
    import hashlib

    path = nla_dir / "train_state" / "ar-refit.explanations.json"
    av_sha = hashlib.sha256((nla_dir / AV_FILE).read_bytes()).hexdigest()
    cache = json.loads(path.read_text()) if path.is_file() else {"av_sha256": av_sha, "sets": {}}
    if cache["av_sha256"] != av_sha:
        raise NLAError(f"{path} was written by other AV weights than {nla_dir / AV_FILE}; delete it to refit anew")
    total = sum(len(v) for v in sets.values())
    done = sum(len(cache["sets"].get(k, [])) for k in sets)
    bar = ProgressBar("nla ar-refit: AV explanations", total, start=done, unit="rows",
                      enabled=progress and done < total)
    try:
        nla.av.model.eval()
        for name, vectors in sets.items():
            got = cache["sets"].setdefault(name, [])
            while len(got) < len(vectors):
                got += nla.av.explain(vectors[len(got): len(got) + chunk])
                atomic_write_text(path, json.dumps(cache))
                bar.advance(min(chunk, len(vectors)))
    finally:
        bar.close()
    return {k: cache["sets"][k][: len(v)] for k, v in sets.items()}


def rl_step(nla: NLA, vectors: torch.Tensor, opt, ar_opt, cfg: TrainConfig) -> dict:
    """One GRPO step on the AV, rewarded by the live AR, then one AR step on the well-formed rollouts."""
    ar = nla.ar

    def fits(e: str) -> bool:
        return len(ar.tokenizer(e, add_special_tokens=False)["input_ids"]) <= ar.cfg.max_explanation_tokens

    def usable(parsed) -> list[int]:
        # malformed, truncated, empty or over-long answers get the orthogonal reward and stay out of AR training
        return [i for i, (e, good) in enumerate(parsed) if good and e.strip() and fits(e)]

    def reward_fn(parsed, v_rep, comp):
        ok = usable(parsed)
        r = torch.full((len(parsed),), cfg.malformed_reward)
        if ok:
            ar.eval()
            with torch.no_grad():
                pred = ar([parsed[i][0] for i in ok])
            r[ok] = -nla_loss(pred, v_rep[ok].to(pred.device), reduction="none").cpu()
        return r

    st = grpo_step(nla.av, vectors, reward_fn, opt, group_size=cfg.group_size, temperature=cfg.temperature,
                   kl_coef=cfg.kl_coef, clip=cfg.clip, max_new_tokens=cfg.max_new_tokens,
                   before_step=lambda: average_gradients(nla.av.trainable_parameters()))
    parsed, v_rep = st.pop("parsed"), st.pop("vectors")
    ok = usable(parsed)
    if ar_opt is not None and (ok or world()[1] > 1):
        # with several ranks every rank takes part in the all-reduce, contributing zero if it has no usable pair
        ar.train()
        ar_opt.zero_grad(set_to_none=True)
        if ok:
            loss = ar.loss([parsed[i][0] for i in ok], v_rep[ok])
            loss.backward()
            st["ar_loss"] = float(loss.detach())
        params = ar.trainable_parameters()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_gradients(params)
        ar_opt.step()
    return st
