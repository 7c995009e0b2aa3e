"""NLA training: `ar-sft` (regression), `av-sft` (supervised warm start), `rl` (GRPO with a live AR),
`rl-continue` (a second GRPO run from where `rl` ended), `ar-refit` (the AR fitted to the final AV's own
explanations), and the control `ar-refit-warm` (the same refit of the warm AR on the warm AV's explanations).

Every stage is resumable: the trainable weights, the optimiser state, the step and the history are
written atomically to ``<nla>/train_state/<stage>.pt`` every ``checkpoint_every`` steps. Batches are a
pure function of (seed, step), and sampling in RL is seeded per step, so an interrupted run resumed
from its checkpoint follows the same trajectory as an uninterrupted one.

The RL stage's GRPO loop (and why it is ours rather than TRL's) is in `grpo.py`; the state file and
the weights each stage publishes in `checkpoint.py`.

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

Why `rl-continue`: `rl` ends near its cosine schedule's floor (or on its time budget), and its optimiser state is not
part of a shipped NLA. A second GRPO run starts from the weights `rl` published (av and ar), with a fresh
optimiser and schedule and the same reference policy (the warm AV, so the KL still measures the distance from
the warm start), and can read other training rows than the first run did.

Why `ar-refit-warm`: most of the refit's gain can be the AR catching up with any fixed AV, not RL. The
stage runs the same refit (same data, same settings) starting from the warm AR on the warm AV's greedy
explanations and writes only `warm_refit_ar.safetensors`, leaving av/ar and the warm weights as they are;
`nla eval` then compares the final NLA with the warm start given the same refit (`warm_start_refit`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .._io import atomic_write_text
from ..distributed import average_gradients
from ..distributed import rank_and_world as world
from ..progress import ProgressBar
from ..renamed import warn_renamed
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
from .checkpoint import load_state, save_state, state_path
from .config import RL_STAGES, STAGES, NLATrainConfig
from .core import NLAConfig, NLAError, normalise
from .curves import write_curves
from .data import NLARows, vector_stats
from .grpo import grpo_step, rl_step
from .metric import fve

__all__ = [
    "REFIT_STAGES",
    "RL_STAGES",
    "STAGES",
    "NLATrainConfig",
    "average_gradients",
    "batch_indices",
    "greedy_explanations",
    "grpo_step",
    "lr_at",
    "prepare_nla",
    "rl_step",
    "train_stage",
    "world",
]

# AR regression on a frozen AV's greedy explanations: stage → the AV file that writes them
REFIT_STAGES = {"ar-refit": AV_FILE, "ar-refit-warm": WARM_AV_FILE}
VAL_ROWS_PER_BATCH = 16  # validation rows per forward pass (av-sft's cross-entropy)
VAL_ROUND_TRIP_VECTORS = 16  # validation vectors the rl stages explain and reconstruct at each validation


def __getattr__(name: str):
    if name == "TrainConfig":  # the old name, before the SAE's TrainConfig and this one were told apart
        warn_renamed("TrainConfig", "NLATrainConfig", "thoughtscope.nla.train")
        return NLATrainConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------- helpers


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of a step: epoch-wise permutations seeded by (seed, epoch), so a step's batch never depends on history."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size : (k + 1) * batch_size]


def lr_at(step: int, cfg: NLATrainConfig, base: float) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ------------------------------------------------------------------------- several processes


MEAN_KEYS = ("loss", "reward", "reward_std", "kl", "length", "well_formed", "ar_loss")


def _mean_over_ranks(rec: dict) -> dict:
    """Average the step's figures over ranks; a figure a rank lacks (no usable rollout) is left out of its mean."""
    import torch.distributed as dist

    if world()[1] == 1:
        return rec
    t = torch.tensor(
        [[rec[k], 1.0] if isinstance(rec.get(k), float) and not math.isnan(rec[k]) else [0.0, 0.0] for k in MEAN_KEYS],
        dtype=torch.float64,
    )
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


def _out_of_time(cfg: NLATrainConfig, t0: float, n_ranks: int) -> bool:
    """Whether the stage's time budget is spent; rank 0's clock decides, so every rank stops after the same step."""
    out_of_time = cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s
    if n_ranks > 1:
        import torch.distributed as dist

        flag = [out_of_time]
        dist.broadcast_object_list(flag, src=0)
        out_of_time = flag[0]
    return out_of_time


# ------------------------------------------------------------------------- opening a stage


def _require(nla_dir: Path, files: tuple[str, ...], before: str) -> None:
    for f in files:
        if not (nla_dir / f).is_file():
            raise NLAError(f"{nla_dir / f} missing: {before}")


def _new_config(nla_dir: Path, rows: NLARows, lm, **cfg_overrides) -> NLAConfig:
    """The config of a new NLA, from the dataset's statistics and recipe, saved in the folder."""
    st = rows.meta.get("stats", {})
    cfg = config_for(
        lm,
        site=rows.meta.get("site"),
        injection_scale=st.get("injection_scale", 0.0),
        mean_norm=st.get("mean_norm", 0.0),
        mu_sq=st.get("mu_sq", 0.0),
        warm_start=rows.meta.get("warm_start", {}),
        **cfg_overrides,
    )
    # remembered so `nla eval` can harvest fresh held-out rows with the same recipe and split
    cfg.extra["data_config"] = rows.meta.get("data_config", {})
    cfg.save(nla_dir)
    return cfg


def _load_starting_weights(nla: NLA, nla_dir: Path, stage: str) -> None:
    """Load the weights `stage` starts from (each supervised stage starts from fresh adapters)."""
    if stage in ("rl", "ar-refit-warm"):  # both start from the warm start
        _require(nla_dir, (WARM_AV_FILE, WARM_AR_FILE), f"run the ar-sft and av-sft stages before {stage}")
        nla.av.load_adapter_state(load_weights(nla_dir / WARM_AV_FILE))
        nla.ar.load_adapter_state(load_weights(nla_dir / WARM_AR_FILE))
        if stage == "rl":
            nla.av.set_reference()
    elif stage == "rl-continue":
        _require(nla_dir, (WARM_AV_FILE, AV_FILE, AR_FILE), "run the ar-sft, av-sft and rl stages before rl-continue")
        started = state_path(nla_dir, stage).is_file()  # then its own state file holds the weights it resumes
        if (nla_dir / RL_AR_FILE).is_file() and not started:  # ar.safetensors is a refitted AR, not RL's
            raise NLAError(f"{nla_dir / RL_AR_FILE} exists: rl-continue goes after rl and before ar-refit")
        nla.av.load_adapter_state(load_weights(nla_dir / WARM_AV_FILE))
        nla.av.set_reference()  # the KL is still measured from the warm start
        nla.av.load_adapter_state(load_weights(nla_dir / AV_FILE))
        nla.ar.load_adapter_state(load_weights(nla_dir / AR_FILE))
    elif stage == "ar-refit":
        _require(nla_dir, (AV_FILE, AR_FILE), "run the earlier stages (ar-sft, av-sft, rl) before ar-refit")
        if not (nla_dir / RL_AR_FILE).is_file():  # first run: keep the AR the refit starts from
            save_weights(load_weights(nla_dir / AR_FILE), nla_dir / RL_AR_FILE)
        nla.av.load_adapter_state(load_weights(nla_dir / AV_FILE))
        nla.ar.load_adapter_state(load_weights(nla_dir / RL_AR_FILE))


def prepare_nla(nla_dir: str | os.PathLike, rows: NLARows, lm, *, stage: str, **cfg_overrides) -> NLA:
    """Open (or create) the NLA folder and load the weights this stage starts from."""
    nla_dir = Path(nla_dir)
    if (nla_dir / "nla_config.json").is_file():
        cfg = NLAConfig.load(nla_dir)
    else:
        cfg = _new_config(nla_dir, rows, lm, **cfg_overrides)
    if rows.meta.get("site") and rows.meta["site"] != cfg.site:
        raise NLAError(f"dataset site {rows.meta['site']} differs from the NLA's site {cfg.site} ({nla_dir})")
    nla = NLA(lm, cfg)
    nla.path = nla_dir
    _load_starting_weights(nla, nla_dir, stage)
    return nla


def _stage_rows(data: str | os.PathLike | NLARows, cfg: NLATrainConfig) -> tuple[NLARows, NLARows, NLARows]:
    """(rows, train, val) a stage reads; with `train_rows`, as if the dataset held only the first N training rows."""
    rows = data if isinstance(data, NLARows) else NLARows.load(data)
    train, val = rows.subset("train"), rows.subset("val")
    if len(train) == 0:
        raise NLAError("the dataset has no training rows")
    if cfg.train_rows is not None:  # a stage sized for fewer rows than a later stage reads
        train = train.subset(torch.arange(min(cfg.train_rows, len(train))))
        # as if the dataset held only those rows: a new NLA's vector statistics come from them too
        rows = replace(rows, meta={**rows.meta, "stats": vector_stats(train.vectors)})
    return rows, train, val


def _target_model(nla_dir: Path, rows: NLARows, device: str | None):
    """Load the target: the NLA's model, or for a new NLA the model its rows were harvested from."""
    from thoughtscope.models import load_model

    cfg_model = (
        NLAConfig.load(nla_dir).model
        if (nla_dir / "nla_config.json").is_file()
        else rows.meta.get("model_source") or rows.meta.get("model", "default")  # how it was loaded
    )
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return load_model(cfg_model, device=device)


def _open_on_every_rank(nla_dir: Path, rows: NLARows, lm, stage: str, rank: int) -> NLA:
    if rank == 0:
        nla = prepare_nla(nla_dir, rows, lm, stage=stage)
    _barrier()  # rank 0 writes the config (and rl_ar) first; the others then read the same files
    if rank != 0:
        nla = prepare_nla(nla_dir, rows, lm, stage=stage)
    return nla


def _refit_texts(
    nla: NLA, nla_dir: Path, train: NLARows, val: NLARows, stage: str, rank: int, progress: bool
) -> tuple[dict[str, list[str]], list[int]]:
    """The frozen AV's greedy explanations the refit stages train on, and the training rows with a non-empty one."""
    sets = {"train": train.vectors, "val": val.vectors}
    if rank == 0:  # one rank writes the explanations, the others read the finished cache
        greedy_explanations(nla, nla_dir, sets, progress=progress, stage=stage)
    _barrier()
    refit = greedy_explanations(nla, nla_dir, sets, progress=False, stage=stage)
    usable_rows = [i for i, e in enumerate(refit["train"]) if e.strip()]
    if not usable_rows:
        raise NLAError("the AV wrote no non-empty explanation for any training vector; nothing to refit on")
    return refit, usable_rows


# ------------------------------------------------------------------------- one stage's run


@dataclass
class _Run:
    """What a stage's steps read and update, once `train_stage` has opened the stage."""

    cfg: NLATrainConfig
    nla_dir: Path
    nla: NLA
    train: NLARows
    val: NLARows
    refit: dict[str, list[str]]
    pool: torch.Tensor  # training rows a step draws from
    params: list
    base_lr: float
    opt: torch.optim.Optimizer
    ar_opt: torch.optim.Optimizer | None
    rank: int
    n_ranks: int

    @property
    def is_refit(self) -> bool:
        return self.cfg.stage in REFIT_STAGES

    @property
    def is_rl(self) -> bool:
        return self.cfg.stage in RL_STAGES


def _sft_ce(nla: NLA, vectors: torch.Tensor, explanations: list[str]) -> float:
    """The AV's mean cross-entropy on (vector, explanation) rows, VAL_ROWS_PER_BATCH rows per forward pass."""
    n, per = len(explanations), VAL_ROWS_PER_BATCH
    return (
        sum(
            float(nla.av.sft_loss(vectors[i : i + per], explanations[i : i + per])) * len(explanations[i : i + per])
            for i in range(0, n, per)
        )
        / n
    )


def validation_figures(run: _Run) -> dict:
    """The stage's validation figures: cross-entropy (av-sft, also with shuffled vectors) or FVE (the others)."""
    nla, val = run.nla, run.val
    if len(val) == 0:
        return {}
    if run.cfg.stage == "av-sft":
        with torch.no_grad():
            nla.av.model.eval()
            loss = _sft_ce(nla, val.vectors, val.explanations)
            shuf = val.vectors[torch.randperm(len(val), generator=torch.Generator().manual_seed(1))]
            loss_s = _sft_ce(nla, shuf, val.explanations)
        return {"val_ce": loss, "val_ce_shuffled_vectors": loss_s}
    nla.ar.eval()
    if run.is_refit:
        return {
            "val_fve_round_trip": fve(nla.ar.predict(run.refit["val"], allow_empty=True, truncate=True), val.vectors)
        }
    out = {"val_fve_warm_text": fve(nla.ar.predict(val.explanations), val.vectors)}
    if run.is_rl:
        sub = val.vectors[:VAL_ROUND_TRIP_VECTORS]
        nla.av.model.eval()
        with torch.no_grad():
            expl = nla.av.explain(sub)
        out["val_fve_round_trip"] = fve(
            nla.ar.predict(expl, allow_empty=True, truncate=True), sub, mu=normalise(val.vectors).mean(0)
        )
    return out


def _supervised_loss(run: _Run, idx: torch.Tensor) -> torch.Tensor:
    nla, train, rows_ = run.nla, run.train, idx.tolist()
    if run.cfg.stage == "av-sft":
        nla.av.model.train()
        return nla.av.sft_loss(train.vectors[idx], [train.explanations[i] for i in rows_])
    nla.ar.train()
    if run.is_refit:
        return nla.ar.loss([run.refit["train"][i] for i in rows_], train.vectors[idx], truncate=True)
    return nla.ar.loss([train.explanations[i] for i in rows_], train.vectors[idx])


def _one_step(run: _Run, step: int) -> dict:
    """Optimiser step `step` (0-based) on this rank's slice of the global batch; its figures, averaged over ranks."""
    cfg = run.cfg
    lr = lr_at(step, cfg, run.base_lr)
    for g in run.opt.param_groups:
        g["lr"] = lr
    idx = run.pool[batch_indices(len(run.pool), cfg.batch_size, step, cfg.seed)]
    share = cfg.batch_size // run.n_ranks
    idx = idx[run.rank * share : (run.rank + 1) * share]  # this rank's slice of the global batch
    rec: dict = {"step": step + 1, "lr": lr}
    if run.is_rl:
        torch.manual_seed(cfg.seed * 1_000_003 + step * run.n_ranks + run.rank)  # each rank samples its own
        rec.update(rl_step(run.nla, run.train.vectors[idx], run.opt, run.ar_opt, cfg))
    else:
        loss = _supervised_loss(run, idx)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(run.params)
        run.opt.step()
        rec["loss"] = float(loss.detach())
    return _mean_over_ranks(rec)


def _run_steps(run: _Run, step: int, history: list[dict], *, progress: bool, log: Callable[[dict], None] | None) -> int:
    """Step until the schedule ends or the time budget is spent, validating and checkpointing; the steps done."""
    cfg, rank = run.cfg, run.rank
    bar = ProgressBar(f"nla {cfg.stage}", cfg.steps, start=step, unit="steps", enabled=progress and rank == 0)
    t0 = time.time()
    try:
        while step < cfg.steps:
            rec = _one_step(run, step)
            step += 1
            if rank == 0 and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                rec.update(validation_figures(run))
            history.append(rec)
            if log and rank == 0:
                log(rec)
            shown = (f"{k}={v:.3f}" for k, v in rec.items() if k not in ("step", "lr") and isinstance(v, float))
            bar.update(step, info=" ".join(shown))
            out_of_time = _out_of_time(cfg, t0, run.n_ranks)
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time):
                done = step == cfg.steps
                write_curves(run.nla_dir, cfg.stage, history)  # before the state file, which commits the step
                save_state(
                    run.nla_dir, cfg, run.nla, run.opt, run.ar_opt, step, history, done=done, stopped=out_of_time
                )
            if out_of_time:
                break
    finally:
        bar.close()
    return step


def train_stage(
    nla_dir: str | os.PathLike,
    data: str | os.PathLike | NLARows,
    cfg: NLATrainConfig,
    *,
    lm=None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    device: str | None = None,
) -> dict:
    """Run (or resume) one stage; returns {'history': [...], 'done': bool, 'step': int}.

    ar-sft: AR regression on (warm-start explanation → vector), validation FVE logged.
    av-sft: AV cross-entropy on the warm-start explanation with the vector injected.
    rl:     GRPO on the AV with the live AR as the reward, the AR co-trained on rollouts.
    rl-continue: the same from the av/ar `rl` published (fresh optimiser and schedule, warm AV as reference).
    ar-refit: AR regression on the final AV's greedy explanations.
    ar-refit-warm: the same from the warm AR on the warm AV's greedy explanations; writes only
              warm_refit_ar.safetensors (the control for `ar-refit`).
    device: where to load the target when lm is not given (default: this rank's GPU if there is one, else CPU).
    """
    cfg.check()
    nla_dir = Path(nla_dir)
    rows, train, val = _stage_rows(data, cfg)
    rank, n_ranks = world()
    if cfg.batch_size % n_ranks:
        raise NLAError(f"batch_size {cfg.batch_size} does not split evenly over {n_ranks} processes")
    if lm is None:
        lm = _target_model(nla_dir, rows, device)
    nla = _open_on_every_rank(nla_dir, rows, lm, cfg.stage, rank)
    val = val.subset(torch.arange(min(cfg.val_rows, len(val))))
    refit: dict[str, list[str]] = {}
    pool = torch.arange(len(train))  # every training row; for a refit, those the AV wrote a non-empty explanation for
    if cfg.stage in REFIT_STAGES:
        refit, usable_rows = _refit_texts(nla, nla_dir, train, val, cfg.stage, rank, progress)
        pool = torch.tensor(usable_rows)
    # ar-sft and the refits train the AR; av-sft and rl the AV (rl's reference policy was set by prepare_nla)
    trains_ar = cfg.stage == "ar-sft" or cfg.stage in REFIT_STAGES
    params = nla.ar.trainable_parameters() if trains_ar else nla.av.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ar_opt = torch.optim.AdamW(nla.ar.trainable_parameters(), lr=cfg.ar_lr) if cfg.stage in RL_STAGES else None
    step, history = load_state(nla_dir, cfg, nla, opt, ar_opt)
    run = _Run(cfg, nla_dir, nla, train, val, refit, pool, params, cfg.lr, opt, ar_opt, rank, n_ranks)
    step = _run_steps(run, step, history, progress=progress, log=log)
    _barrier()  # the last checkpoint is on disk before any rank returns
    return {"history": history, "done": step >= cfg.steps, "step": step, "nla": nla}


def greedy_explanations(
    nla: NLA,
    nla_dir: Path,
    sets: dict[str, torch.Tensor],
    *,
    vectors_per_batch: int | None = None,
    progress: bool = True,
    stage: str = "ar-refit",
) -> dict[str, list[str]]:
    """The frozen AV's greedy explanation of every vector, cached after every batch so an interrupted run resumes.

    `stage` (a REFIT_STAGES key) names the cache (``train_state/<stage>.explanations.json``) and the AV file
    the loaded AV came from. The cache names the AV weights it was written with; a cache from other weights
    is an error rather than silently training the AR on someone else's explanations.
    """
    import hashlib

    per_batch = vectors_per_batch or nla.vectors_per_batch(on_cpu=32)
    av_file = nla_dir / REFIT_STAGES[stage]
    path = nla_dir / "train_state" / f"{stage}.explanations.json"
    av_sha = hashlib.sha256(av_file.read_bytes()).hexdigest()
    cache = json.loads(path.read_text()) if path.is_file() else {"av_sha256": av_sha, "sets": {}}
    if cache["av_sha256"] != av_sha:
        raise NLAError(f"{path} was written by other AV weights than {av_file}; delete it to refit anew")
    total = sum(len(v) for v in sets.values())
    done = sum(len(cache["sets"].get(k, [])) for k in sets)
    bar = ProgressBar(
        f"nla {stage}: AV explanations", total, start=done, unit="rows", enabled=progress and done < total
    )
    try:
        nla.av.model.eval()
        for name, vectors in sets.items():
            got = cache["sets"].setdefault(name, [])
            while len(got) < len(vectors):
                got += nla.av.explain(vectors[len(got) : len(got) + per_batch])
                atomic_write_text(path, json.dumps(cache))
                bar.advance(min(per_batch, len(vectors)))
    finally:
        bar.close()
    return {k: cache["sets"][k][: len(v)] for k, v in sets.items()}
