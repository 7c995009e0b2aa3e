"""Attribution graphs on the default model: how fast, how big, how faithful, and whether the forward is shared.

* ``multi_site_speedup``: N single-site transcoder trainings (each its own pass over the corpus, on the fly) timed
  against one N-site training on the same tokens and batches (sae.multisite); goal >= 0.7 x N for N = 4. The
  blocks are spread over the model, ending at the last; a single-site pass stops after its block (early exit), so
  ``multi_site_forward_bound`` (the summed depths of the single passes over the deepest) is the most sharing the
  forward alone can give.
* ``graph_seconds`` and ``peak_rss_mb``: one 32-token prompt's graph (the process's resident memory sampled
  during the build, model and transcoders included; ``graph_rss_increase_mb`` what the build added);
  ``replacement_score`` and ``completeness_score``: means over the held-out prompts (benchmarks/data/
  graph_prompts.json, which no test or tuning uses); ``intervention``: causal.graph_check's summary over them
  (top-5 features against 5 random ones of the same blocks; predicted vs measured direct effects).
* ``circuit_tracer_time_ratio`` (theirs / ours) and ``adjacency_max_rel_diff``: circuit-tracer's nnsight backend,
  run from its own environment (``--ct-python``, default /work/venv-ct/bin/python or $THOUGHTSCOPE_CT_PYTHON) on
  the same prompt, targets and transcoders; where it cannot run, ``circuit_tracer`` says why. Its environment:
  circuit-tracer 0.5.0 with the versions it pins (transformers <= 4.57.3, huggingface-hub < 1, nnsight 0.7) in a
  venv over this one's packages; _circuit_tracer_side.py bridges what differs (see there). The adjacencies are
  compared without the sources at position 0 (``adjacency_max_rel_diff_all`` includes them): both leave the BOS's MLP
  outputs out of the graph by default (GraphConfig.first_token_mlp counts them in the first token's node instead).

The transcoder set: ``--transcoders DIR``, else the shipped ``default_transcoders`` asset, else (--quick only) a
small set trained here for every block from one pass, named as such in ``transcoders``.

    python benchmarks/graph.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

from thoughtscope._io import atomic_save_tensors, atomic_write_json, read_json
from thoughtscope.causal.influence import graph_scores
from thoughtscope.errors import CausalError

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "data" / "graph_prompts.json"
SIDE = HERE / "_circuit_tracer_side.py"
CT_PYTHON = os.environ.get("THOUGHTSCOPE_CT_PYTHON", "/work/venv-ct/bin/python")


# ----------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path = PROMPTS) -> tuple[str, list[str]]:
    """(the timing text, the held-out prompts) of a prompts file."""
    d = read_json(path, CausalError)
    timing, prompts = d.get("timing"), d.get("prompts")
    if not isinstance(timing, str) or not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise CausalError(f"{path}: expected {{'timing': text, 'prompts': [text, ...]}}")
    return timing, prompts


def cut_to_tokens(lm, text: str, n: int) -> str:
    """The longest word prefix of text that tokenizes to at most n tokens (BOS included)."""
    words = text.split(" ")
    best = words[0]
    for i in range(1, len(words) + 1):
        cand = " ".join(words[:i])
        if lm.tokenize(cand)[0].shape[1] > n:
            break
        best = cand
    return best


# ----------------------------------------------------------------------------- memory
class PeakRSS:
    """The largest resident set size seen while inside (sampled every 20 ms from /proc; else the process peak)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.now()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())

    @property
    def mb(self) -> float:
        return self.peak / 2**20


# ----------------------------------------------------------------------------- multi-site speedup
def spread_layers(n_layers: int, n: int) -> list[int]:
    """n blocks spread evenly over the model, the last block included."""
    if n > n_layers:
        raise CausalError(f"{n} sites asked of a model with {n_layers} blocks")
    return sorted({round((i + 1) * n_layers / n) - 1 for i in range(n)})


def _tcfg(lm, layer: int, n_features: int, k: int):
    from thoughtscope.sae.run import transcoder_config

    return transcoder_config(lm, layer, n_features, k)


def multi_site_speedup(
    lm,
    corpus,
    layers: list[int],
    *,
    n_tokens: int,
    n_features: int,
    k: int,
    batch_size: int,
    ctx_len: int = 128,
    buffer_tokens: int = 16384,
    repeats: int = 1,
    device: str = "cpu",
    log=print,
) -> dict:
    """Seconds of len(layers) single-site trainings (each streaming its own pass) and of one multi-site training
    on the same tokens and batches (one shuffle buffer size for all, so every run sees the same rows in the same
    order), and their ratio. Returns the multi-site transcoders too (key "trained")."""
    from thoughtscope.harvest import stream_activations
    from thoughtscope.sae import TrainConfig, train_sae
    from thoughtscope.sae.multisite import train_multisite

    tc = TrainConfig(
        batch_size=batch_size, n_tokens=n_tokens, progress=False, checkpoint_every=0, log_every=10**9, device=device
    )

    def stream(sites, targets):
        return stream_activations(
            lm,
            corpus,
            sites,
            target_site=targets,
            n_tokens=n_tokens,
            batch_size=batch_size,
            ctx_len=ctx_len,
            seed=0,
            buffer_tokens=buffer_tokens,
        )

    def timed(fn, *a) -> tuple[float, object]:
        sync(device)
        t0 = time.perf_counter()
        out = fn(*a)
        sync(device)
        return time.perf_counter() - t0, out

    def one(layer: int):
        return train_sae(_tcfg(lm, layer, n_features, k), stream(f"mlp_in.{layer}", f"mlp_out.{layer}"), tc)

    def together():
        cfgs = [_tcfg(lm, i, n_features, k) for i in layers]
        return train_multisite(cfgs, stream([f"mlp_in.{i}" for i in layers], [f"mlp_out.{i}" for i in layers]), tc)

    single = [math.inf] * len(layers)
    multi = math.inf
    for _ in range(repeats):  # alternated, each run's fastest kept: a busy machine slows runs, never speeds them
        for j, layer in enumerate(layers):
            s, _trained = timed(one, layer)
            single[j] = min(single[j], s)
            log(f"  single-site block {layer}: {s:.1f} s")
        s, trained = timed(together)
        multi = min(multi, s)
        log(f"  {len(layers)}-site: {s:.1f} s")
    depth = [i + 1 for i in layers]
    return {
        "multi_site_speedup": sum(single) / multi,
        "single_site_seconds": sum(single),
        "single_site_seconds_each": single,
        "multi_site_seconds": multi,
        "multi_site_n": len(layers),
        "multi_site_layers": layers,
        "multi_site_goal": 0.7 * len(layers),
        "multi_site_forward_bound": sum(depth) / max(depth),
        "multi_site_tokens": n_tokens,
        "multi_site_repeats": repeats,
        "multi_site_dictionary": {
            "arch": "transcoder",
            "n_features": n_features,
            "k": k,
            "skip": True,
            "batch_size": batch_size,
        },
        "trained": trained,
    }


# ----------------------------------------------------------------------------- the transcoder set
def shipped_set() -> Path | None:
    from thoughtscope.sae.transcoder_set import default_transcoders_path

    p = default_transcoders_path()
    return p if p.is_dir() else None


def train_small_set(lm, corpus, *, n_tokens: int, n_features: int, k: int, batch_size: int, device: str = "cpu"):
    """A transcoder for every block from one multi-site pass: a stand-in when no set is given or shipped."""
    from thoughtscope.harvest import stream_activations
    from thoughtscope.sae import TrainConfig
    from thoughtscope.sae.multisite import train_multisite
    from thoughtscope.sae.transcoder_set import TranscoderSet

    L = len(lm.layers)
    tc = TrainConfig(
        batch_size=batch_size, n_tokens=n_tokens, progress=False, checkpoint_every=0, log_every=10**9, device=device
    )
    src = stream_activations(
        lm,
        corpus,
        [f"mlp_in.{i}" for i in range(L)],
        target_site=[f"mlp_out.{i}" for i in range(L)],
        n_tokens=n_tokens,
        batch_size=batch_size,
    )
    tcs = train_multisite([_tcfg(lm, i, n_features, k) for i in range(L)], src, tc)
    return TranscoderSet(tcs, model=lm.source, source="trained by benchmarks/graph.py")


# ----------------------------------------------------------------------------- graphs
def graph_figures(
    lm,
    transcoders,
    timing: str,
    prompts: list[str],
    cfg,
    *,
    k: int = 5,
    n_direct: int = 30,
    device: str = "cpu",
    log=print,
) -> tuple[dict, object]:
    """graph_seconds and peak_rss_mb on the timing prompt; scores and the intervention check over prompts.
    Returns (figures, the timing prompt's graph)."""
    from thoughtscope.causal import attribution_graph, graph_check, influence

    t0 = time.perf_counter()  # one small graph first: the timed one should not pay for first-call setup
    attribution_graph.build(
        lm, transcoders, cut_to_tokens(lm, timing, 8), cfg=dataclasses.replace(cfg, max_feature_nodes=8)
    )
    warmup = time.perf_counter() - t0
    sync(device)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        g = attribution_graph.build(lm, transcoders, timing, cfg=cfg)
        sync(device)
        seconds = time.perf_counter() - t0
    log(f"  timing graph: {g.n_pos} tokens, {g.n_selected} feature nodes, {seconds:.1f} s, {mem.mb:.0f} MB")
    rows, scores = [], []
    for p in prompts:
        t1 = time.perf_counter()
        gp = attribution_graph.build(lm, transcoders, p, cfg=cfg)
        rep, comp = influence.graph_scores(gp)
        row = graph_check.prompt_check(lm, transcoders, gp, k=k, n_direct=n_direct)
        rows.append(row)
        scores.append(
            {
                "prompt": p,
                "replacement": rep,
                "completeness": comp,
                "n_active": len(gp.active_features),
                "n_selected": gp.n_selected,
                "seconds": time.perf_counter() - t1,
            }
        )
        log(f"  {p!r}: replacement {rep:.3f} completeness {comp:.3f}")
    finite = [s["replacement"] for s in scores if s["replacement"] == s["replacement"]]
    fig = {
        "graph_seconds": seconds,
        "graph_warmup_seconds": warmup,
        "graph_tokens": g.n_pos,
        "graph_prompt": timing,
        "graph_feature_nodes": g.n_selected,
        "graph_active_features": len(g.active_features),
        "graph_config": {kk: v for kk, v in g.config.items() if kk != "seconds"},
        "peak_rss_mb": mem.mb,
        "graph_rss_increase_mb": (mem.peak - mem.start) / 2**20,
        "graph_scores": dict(zip(("replacement", "completeness"), influence.graph_scores(g))),
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "replacement_score": sum(finite) / len(finite) if finite else None,
        "completeness_score": sum(s["completeness"] for s in scores) / len(scores) if scores else None,
        "graph_prompts": scores,
        "intervention": {**graph_check.summarise(rows), "k": k, "n_direct": n_direct, "prompts": rows}
        if rows
        else None,
    }
    return fig, g


# ----------------------------------------------------------------------------- circuit-tracer
def export_for_circuit_tracer(transcoders, folder: str | Path) -> Path:
    """Our transcoders in circuit-tracer's orientation: the input centring b_in folded into b_enc (and through the
    skip path into b_dec), W_skip transposed to [d_out, d_in]; TopK ("topk" with k) or JumpReLU thresholds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arches = {tc.cfg.arch for tc in transcoders}
    if len(arches) != 1 or not arches <= {"transcoder", "jumprelu-transcoder"}:
        raise CausalError(f"circuit-tracer export takes one transcoder kind per set, got {sorted(arches)}")
    ks = {int(tc.cfg.k or 0) for tc in transcoders}
    topk = arches == {"transcoder"}
    if topk and len(ks) != 1:
        raise CausalError(f"circuit-tracer export needs one k for the set, got {sorted(ks)}")
    for i, tc in enumerate(transcoders):
        with torch.no_grad():
            enc, b_in = tc.enc.detach().float().cpu(), tc.b_in.detach().float().cpu()
            t = {
                "W_enc": enc,
                "b_enc": tc.b_enc.detach().float().cpu() - enc @ b_in,
                "W_dec": tc.W_dec.detach().float().cpu(),
                "b_dec": tc.b_dec.detach().float().cpu(),
            }
            if tc.W_skip is not None:
                ws = tc.W_skip.detach().float().cpu()
                t["W_skip"] = ws.t().contiguous()
                t["b_dec"] = t["b_dec"] - b_in @ ws
            if not topk:
                t["threshold"] = tc.threshold.detach().float().cpu()
        atomic_save_tensors(t, folder / f"layer_{i}.safetensors")
    meta = {"n_layers": len(transcoders), "activation": "topk" if topk else "jumprelu", "k": ks.pop() if topk else 0}
    atomic_write_json(folder / "export.json", meta)
    return folder


def model_folder(lm) -> str | None:
    """The local Hugging Face folder the model loads from (a converted GGUF's folder, or a local path)."""
    src = lm.source or {}
    for key in ("converted", "path"):
        p = src.get(key)
        if p and Path(p).is_dir() and (Path(p) / "config.json").is_file():
            return str(p)
    return None


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest |a - b| over the largest |a|; largest entrywise |a - b| / |a| where |a| > 1e-3 of the largest)."""
    scale = float(a.abs().max().clamp_min(1e-12))
    diff = (a - b).abs()
    big = a.abs() > 1e-3 * scale
    rel = float((diff[big] / a.abs()[big]).max()) if bool(big.any()) else 0.0
    return float(diff.max()) / scale, rel


def align(ours, theirs: dict) -> dict:
    """Compare two graphs of one prompt entry by entry over the nodes both have: the selected features in both
    (matched by layer, position, feature), every error and token node, and the logits.

    Position 0 (BOS) is defined differently: circuit-tracer zeroes its error vectors and leaves its MLP outputs out of
    the graph (a constant), while ours credit them to the first token's node. The main figure leaves the columns of
    position 0 (its error nodes and token node) out; ``adjacency_max_rel_diff_all`` includes them."""
    g = ours
    if not torch.equal(g.input_tokens.cpu(), theirs["input_tokens"].cpu()):
        raise CausalError("circuit-tracer's graph is of other tokens than ours")
    if not torch.equal(g.logit_tokens.cpu(), theirs["logit_tokens"].cpu()):
        raise CausalError("circuit-tracer's graph has other target tokens than ours")

    def keys(af, sel):
        return {tuple(int(v) for v in af[j]): i for i, j in enumerate(sel.tolist())}

    ko, kt = keys(g.active_features, g.selected_features), keys(theirs["active_features"], theirs["selected_features"])
    common = sorted(set(ko) & set(kt))
    n_o, n_t = len(ko), len(kt)
    rest = g.n_nodes - n_o  # errors, tokens, logits: the same order in both
    idx_o = torch.tensor([ko[c] for c in common] + list(range(n_o, n_o + rest)), dtype=torch.long)
    idx_t = torch.tensor([kt[c] for c in common] + list(range(n_t, n_t + rest)), dtype=torch.long)
    a = g.adjacency.float().cpu()[idx_o][:, idx_o]
    b = theirs["adjacency"].float().cpu()[idx_t][:, idx_t]
    if a.shape != b.shape:
        raise CausalError(f"aligned adjacencies differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    everything, _ = _max_rel(a, b)
    first = len(common)  # where the error nodes start in the aligned order
    bos = [first + layer * g.n_pos for layer in range(g.n_layers)] + [first + g.n_layers * g.n_pos]
    keep = torch.ones(a.shape[1], dtype=torch.bool)
    keep[bos] = False
    rel, entry = _max_rel(a[:, keep], b[:, keep])
    return {
        "adjacency_max_rel_diff": rel,
        "adjacency_max_entry_rel_diff": entry,
        "adjacency_max_rel_diff_all": everything,
        "adjacency_compared": "max |ours - theirs| / max |ours| over the feature nodes both selected, every error, "
        "token and logit node; sources at position 0 left out (circuit-tracer leaves the BOS's MLP outputs out of "
        "the graph, ours credit them to the first token)",
        "adjacency_compared_nodes": len(idx_o),
        "common_feature_nodes": len(common),
        "ours_feature_nodes": n_o,
        "theirs_feature_nodes": n_t,
    }


def their_scores(ours, theirs: dict) -> dict:
    """Replacement and completeness of circuit-tracer's graph (its adjacency and node lists, our influence code,
    which follows its definitions): the same prompt scored with its position-0 rule."""
    from thoughtscope.causal.graph import AttributionGraph

    g = AttributionGraph(
        prompt=ours.prompt,
        input_tokens=theirs["input_tokens"],
        token_strs=ours.token_strs,
        logit_tokens=theirs["logit_tokens"],
        logit_probabilities=theirs["logit_probabilities"],
        active_features=theirs["active_features"],
        activation_values=theirs["activation_values"],
        selected_features=theirs["selected_features"],
        adjacency=theirs["adjacency"].float(),
        n_layers=ours.n_layers,
        model=ours.model,
    )
    g.check()
    return dict(zip(("replacement", "completeness"), graph_scores(g)))


def circuit_tracer(
    lm,
    transcoders,
    graph,
    cfg,
    *,
    device: str = "cpu",
    python: str = CT_PYTHON,
    threads: int | None = None,
    timeout: float = 1800,
    log=print,
) -> dict:
    """circuit-tracer's graph of the same prompt, targets and transcoders from its own environment; its time
    against ours, and how far the adjacencies are apart. {"circuit_tracer": reason} where it cannot run."""
    if not Path(python).is_file():
        return {"circuit_tracer": f"no circuit-tracer environment: {python} is missing (--ct-python)"}
    folder = model_folder(lm)
    if folder is None:
        return {"circuit_tracer": f"{lm.name} has no local Hugging Face folder for circuit-tracer to load"}
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="graph-ct-") as tmp:
        export = export_for_circuit_tracer(transcoders, Path(tmp) / "set")
        out = Path(tmp) / "ct.safetensors"
        cmd = [
            python,
            str(SIDE),
            "--model-dir",
            folder,
            "--transcoders",
            str(export),
            "--prompt-ids",
            ",".join(str(int(t)) for t in graph.input_tokens),
            "--targets",
            ",".join(str(int(t)) for t in graph.logit_tokens),
            "--max-feature-nodes",
            str(graph.config["max_feature_nodes"]),
            "--batch-size",
            str(graph.config.get("targets_per_batch", graph.config.get("batch_size", 128))),
            "--out",
            str(out),
            "--device",
            device,
            *(["--threads", str(threads)] if threads else []),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return {"circuit_tracer": f"circuit-tracer did not finish within {timeout:.0f} s"}
        if r.returncode != 0 or not out.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-12:]
            return {"circuit_tracer": f"circuit-tracer failed (exit {r.returncode}): " + " | ".join(tail)}
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        theirs = load_file(str(out))
    ours_s = float(graph.config["seconds"])
    res = {
        "circuit_tracer": "ran",
        "circuit_tracer_version": meta.get("circuit_tracer"),
        "circuit_tracer_backend": meta.get("backend"),
        "circuit_tracer_seconds": float(meta["seconds"]),
        "circuit_tracer_load_seconds": float(meta["load_seconds"]),
        "ours_seconds": ours_s,
        "circuit_tracer_time_ratio": float(meta["seconds"]) / ours_s,
        **align(graph, theirs),
        "circuit_tracer_graph_scores": their_scores(graph, theirs),
        "ours_graph_scores": dict(zip(("replacement", "completeness"), graph_scores(graph))),
    }
    log(
        f"  circuit-tracer {res['circuit_tracer_seconds']:.1f} s (ours {ours_s:.1f} s), max rel diff "
        f"{res['adjacency_max_rel_diff']:.2e}"
    )
    return res


# ----------------------------------------------------------------------------- main
def sizes(args) -> dict:
    q = args.quick
    return {
        "speed_tokens": args.speed_tokens or (2048 if q else 32768),
        "speed_features": 2048,
        "speed_k": 32,
        "speed_batch": 1024 if q else 4096,
        "repeats": args.repeats or (1 if q else 3),
        "n_prompts": args.prompts or (3 if q else None),
        "max_feature_nodes": args.max_feature_nodes or (256 if q else 2048),
        "n_direct": 10 if q else 30,
        "set_tokens": 4096 if q else 65536,
    }


def _set(args, lm, corpus, sz, log):
    from thoughtscope.sae.transcoder_set import load_transcoder_set

    path = Path(args.transcoders) if args.transcoders else shipped_set()
    if path is not None:
        ts = load_transcoder_set(path, lm=lm)
        return ts, str(path)
    if not args.quick and not args.train_set:
        raise CausalError(
            "no transcoder set: give --transcoders DIR (the shipped default_transcoders asset is absent)"
            " or --train-set for a small one trained here"
        )
    log(f"no transcoder set given or shipped: training a small one for every block on {sz['set_tokens']} tokens")
    t0 = time.perf_counter()
    ts = train_small_set(
        lm,
        corpus,
        n_tokens=sz["set_tokens"],
        n_features=sz["speed_features"],
        k=sz["speed_k"],
        batch_size=sz["speed_batch"],
        device=args.device,
    )
    return ts, (
        f"trained here (the shipped default_transcoders asset is absent): every block, "
        f"{sz['speed_features']} features, k {sz['speed_k']}, {sz['set_tokens']} tokens, "
        f"{time.perf_counter() - t0:.0f} s"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few tokens, 3 prompts, 256 feature nodes")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--model", default="default")
    p.add_argument("--corpus", default="default")
    p.add_argument("--transcoders", default=None, help="a transcoder set folder (default: the shipped set)")
    p.add_argument("--train-set", action="store_true", help="without a set, train a small one here (--quick does)")
    p.add_argument("--prompts-file", type=Path, default=PROMPTS)
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts to graph (default: all; 3 quick)")
    p.add_argument("--max-feature-nodes", type=int, default=None, help="feature nodes per graph (2048; 256 quick)")
    p.add_argument("--speed-tokens", type=int, default=None, help="tokens for the multi-site speedup")
    p.add_argument("--sites", type=int, default=4, help="N of the multi-site speedup")
    p.add_argument("--layers", default=None, help="the speedup's blocks, comma-separated (default: N spread evenly)")
    p.add_argument("--repeats", type=int, default=None, help="speedup runs per setting, fastest kept (1; 3 full)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: speedup, graph, circuit_tracer")
    p.add_argument("--intervention-json", type=Path, help="also write the intervention check alone here (examples/)")
    p.add_argument("--ct-python", default=CT_PYTHON, help="the python of circuit-tracer's own environment")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_device_arg(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    from thoughtscope.causal.attribution_graph import GraphConfig
    from thoughtscope.corpus import Corpus
    from thoughtscope.models import load_model

    def log(msg):
        print(msg, flush=True)

    t_all = time.perf_counter()
    sz = sizes(args)
    lm = load_model(args.model, device=args.device)
    corpus = Corpus(args.corpus)
    timing_text, prompts = load_prompts(args.prompts_file)
    prompts = prompts[: sz["n_prompts"]] if sz["n_prompts"] else prompts
    fig: dict = {"model": lm.name, "quick": args.quick, "threads": torch.get_num_threads(), **device_info(args.device)}
    if "speedup" not in skip:
        layers = [int(v) for v in args.layers.split(",")] if args.layers else spread_layers(len(lm.layers), args.sites)
        log(f"multi-site speedup: blocks {layers} on {sz['speed_tokens']} tokens")
        sp = multi_site_speedup(
            lm,
            corpus,
            layers,
            n_tokens=sz["speed_tokens"],
            repeats=sz["repeats"],
            n_features=sz["speed_features"],
            k=sz["speed_k"],
            batch_size=sz["speed_batch"],
            device=args.device,
            log=log,
        )
        sp.pop("trained")
        fig |= sp
    if "graph" not in skip or "circuit_tracer" not in skip:
        ts, where = _set(args, lm, corpus, sz, log)
        fig["transcoders"] = where
        cfg = GraphConfig(max_feature_nodes=sz["max_feature_nodes"])
        timing = cut_to_tokens(lm, timing_text, 32)
        log(f"graphs: {len(prompts)} prompts, {cfg.max_feature_nodes} feature nodes")
        gfig, g = graph_figures(
            lm,
            list(ts),
            timing,
            [] if "graph" in skip else prompts,
            cfg,
            n_direct=sz["n_direct"],
            device=args.device,
            log=log,
        )
        fig |= gfig
        if "circuit_tracer" not in skip:
            log("circuit-tracer on the timing prompt")
            fig |= circuit_tracer(
                lm, list(ts), g, cfg, device=args.device, python=args.ct_python, threads=args.threads, log=log
            )
    fig["seconds"] = time.perf_counter() - t_all
    for key in (
        "multi_site_speedup",
        "graph_seconds",
        "peak_rss_mb",
        "replacement_score",
        "completeness_score",
        "circuit_tracer_time_ratio",
        "adjacency_max_rel_diff",
    ):
        if key in fig:
            log(f"{key}: {fig[key]}")
    if "circuit_tracer" in fig and fig["circuit_tracer"] != "ran":
        log(f"circuit_tracer: {fig['circuit_tracer']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, fig, default=float)
    if args.intervention_json and fig.get("intervention"):
        args.intervention_json.parent.mkdir(parents=True, exist_ok=True)
        keep = ("model", "transcoders", "graph_config", "graph_prompts", "quick")
        atomic_write_json(
            args.intervention_json, {**{k: fig.get(k) for k in keep}, **fig["intervention"]}, default=float
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
