"""`thoughtscope sae ...`: train (one SAE or a sweep, resumable, torchrun-aware), eval, export, import.

Option defaults are read from SAEConfig / TrainConfig (sae/config.py, torch-free), so the command and the
library cannot drift apart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from ..sae.config import SAEConfig, TrainConfig
from .common import _csv, _fail, _load, console

sae_app = typer.Typer(no_args_is_help=True, help="Train, evaluate, import and export sparse autoencoders.")

# `sae eval` reads the store in batches of EVAL_ROWS rows and the corpus for the spliced loss in batches of
# LOSS_CONTEXTS contexts of LOSS_CTX_LEN tokens; sizes only (the metrics are sums over all batches).
EVAL_ROWS = 4096
LOSS_CTX_LEN, LOSS_CONTEXTS = 128, 8


@sae_app.command("train")
def sae_train(
    out: Path = typer.Option(..., help="output folder (one SAE; a sweep writes one subfolder per config)"),
    store: Path | None = typer.Option(None, help="train from this activation store"),
    model: str | None = typer.Option(None, help="or train on the fly from this model ('default', hub id, …)"),
    site: str = typer.Option("resid.15", help="site, when training on the fly"),
    corpus: str = typer.Option("default", help="corpus, when training on the fly"),
    tokens: int | None = typer.Option(None, help="token budget (default: the whole store once)"),
    arch: str = typer.Option(SAEConfig.arch, help="relu-l1, topk, batchtopk or jumprelu (comma-separate to sweep)"),
    k: str = typer.Option(str(SAEConfig.k), help="active latents for topk / batchtopk (comma-separate to sweep)"),
    expansion: str = typer.Option(
        str(SAEConfig.n_features // SAEConfig.d_model), help="dictionary size / d_model (comma-separate to sweep)"
    ),
    l1_coeff: str = typer.Option(
        str(SAEConfig.l1_coeff), help="relu-l1 sparsity coefficient λ (comma-separate to sweep)"
    ),
    l0_coeff: str = typer.Option(str(SAEConfig.l0_coeff), help="jumprelu L0 coefficient (comma-separate to sweep)"),
    batch_size: int = typer.Option(TrainConfig.batch_size, help="rows (tokens) per optimiser step"),
    max_norm_ratio: float | None = typer.Option(
        SAEConfig.max_norm_ratio,
        help="drop tokens whose norm exceeds this × the median (attention sinks); 0 keeps them",
    ),
    lr: float | None = typer.Option(
        TrainConfig.lr, help="learning rate (default: the architecture's, scaled with the dictionary size)"
    ),
    epochs: int = typer.Option(TrainConfig.epochs, help="passes over a store"),
    seed: int = typer.Option(TrainConfig.seed),
    device: str = typer.Option(TrainConfig.device),
    dtype: str = typer.Option(TrainConfig.dtype, help="float32 or bfloat16 (autocast)"),
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every, help="steps between resumable checkpoints"),
    quiet: bool = typer.Option(False),
) -> None:
    """Train one SAE, or a sweep over one pass of the data (re-run the same command to resume)."""
    import itertools

    from ..sae import SAEError, TrainingDiverged, sae_class, train_saes
    from ..store import ActivationStore, StoreError

    if (store is None) == (model is None):
        _fail("give exactly one of --store (train from a store) or --model (train on the fly)")
    try:
        if store is not None:
            source = ActivationStore.open(store)
            d_model, model_name, site_name = source.d_model, source.model, source.site
        else:
            from ..corpus import Corpus
            from ..harvest import stream_activations

            if tokens is None:
                _fail("--tokens is required when training on the fly")
            lm = _load(model, None, None)
            source = stream_activations(lm, Corpus(corpus), site, n_tokens=tokens, batch_size=batch_size, seed=seed)
            d_model, model_name, site_name = lm.d_model, lm.name, str(lm.check_site(site))
        cfgs, names = [], []
        for a, kk, e, l1, l0 in itertools.product(
            _csv(arch, str), _csv(k, int), _csv(expansion, int), _csv(l1_coeff, float), _csv(l0_coeff, float)
        ):
            cfg = SAEConfig(
                arch=a,
                d_model=d_model,
                n_features=d_model * e,
                k=kk,
                l1_coeff=l1,
                l0_coeff=l0,
                model=model_name,
                site=site_name,
                max_norm_ratio=max_norm_ratio or None,
            )
            name = sae_class(a).run_name(cfg)
            if name not in names:
                cfgs.append(cfg)
                names.append(name)
        out_dirs = [out] if len(cfgs) == 1 else [out / n for n in names]
        tc = TrainConfig(
            batch_size=batch_size,
            n_tokens=tokens,
            lr=lr,
            epochs=epochs,
            seed=seed,
            device=device,
            dtype=dtype,
            checkpoint_dir=str(out / ".checkpoint"),
            checkpoint_every=checkpoint_every,
            progress=not quiet,
        )
        t0 = time.perf_counter()
        saes = train_saes(cfgs, source, tc, out_dirs=out_dirs)
    except (SAEError, StoreError, TrainingDiverged, ValueError) as e:
        _fail(str(e))
    dt = time.perf_counter() - t0
    table = Table(title=f"trained in {dt:.0f} s")
    for col in ("SAE", "folder", "FVU", "L0", "dead"):
        table.add_column(col)
    for name, sae, d in zip(names, saes, out_dirs):
        m = getattr(sae, "train_metrics", {}) or {}
        table.add_row(
            name,
            str(d),
            f"{m.get('fvu', float('nan')):.3f}",
            f"{m.get('l0', float('nan')):.1f}",
            f"{m.get('dead_frac', float('nan')):.3f}",
        )
    console.print(table)


@sae_app.command("eval")
def sae_eval(
    path: Path = typer.Argument(..., help="an SAE folder (native, SAELens, sparsify or dictionary_learning)"),
    store: Path | None = typer.Option(None, help="held-out activations for MSE / FVU / L0 / dead fraction"),
    max_tokens: int = typer.Option(200_000, help="at most this many store tokens"),
    model: str | None = typer.Option(None, help="model for the spliced language-model loss (e.g. default)"),
    corpus: str = typer.Option("default", help="corpus for the spliced loss"),
    loss_tokens: int = typer.Option(16_384, help="tokens for the spliced loss"),
    skip_contexts: int = typer.Option(0, help="skip this many corpus contexts first (keep eval text held out)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the metrics here"),
) -> None:
    """Measure an SAE: reconstruction on a store and/or spliced LM loss on a corpus."""
    from ..sae import SAEError, evaluate_sae, load_sae, spliced_lm_loss
    from ..store import ActivationStore, StoreError

    if store is None and model is None:
        _fail("give --store (reconstruction metrics) and/or --model (spliced language-model loss)")
    try:
        sae = load_sae(path)
        result: dict = {
            "sae": str(path),
            "arch": sae.cfg.arch,
            "n_features": sae.cfg.n_features,
            "excluded": "position 0 of every context (attention sink)" if sae.cfg.exclude_bos else "none",
        }
        if store is not None:
            st = ActivationStore.open(store)
            if st.d_model != sae.cfg.d_model:
                _fail(f"store {store} has d_model {st.d_model} but the SAE expects {sae.cfg.d_model}")
            batches = st.batches(
                EVAL_ROWS, shuffle=False, exclude_bos=sae.cfg.exclude_bos, max_norm_ratio=sae.cfg.max_norm_ratio
            )
            result["reconstruction"] = evaluate_sae(sae, batches, max_batches=max(1, max_tokens // EVAL_ROWS))
        if model is not None:
            from ..corpus import Corpus

            lm = _load(model, None, None)
            if sae.cfg.model and sae.cfg.model != lm.name:
                _fail(f"the SAE was trained on {sae.cfg.model!r}, not {lm.name!r}")
            site = lm.check_site(sae.cfg.site or "resid.15")
            ctx = Corpus(corpus).batches(lm.tokenizer, LOSS_CTX_LEN, LOSS_CONTEXTS)
            ids = (b.input_ids for i, b in enumerate(ctx) if i >= skip_contexts // LOSS_CONTEXTS)
            per_batch = LOSS_CTX_LEN * LOSS_CONTEXTS
            result["spliced"] = spliced_lm_loss(lm, sae, site, ids, max_batches=max(1, loss_tokens // per_batch))
    except (SAEError, StoreError) as e:
        _fail(str(e))
    console.print_json(json.dumps(result, default=float))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=float))


@sae_app.command("export")
def sae_export(
    path: Path = typer.Argument(..., help="an SAE folder"),
    out: Path = typer.Option(..., help="destination folder"),
    format: str = typer.Option("saelens", help="saelens or native"),
) -> None:
    """Write an SAE in SAELens' folder format (cfg.json + sae_weights.safetensors) or ours."""
    from ..sae import SAEError, export_saelens, load_sae, save_sae

    try:
        sae = load_sae(path)
        if format == "saelens":
            export_saelens(sae, out)
        elif format == "native":
            save_sae(sae, out)
        else:
            _fail(f"unknown format {format!r}: expected saelens or native")
    except SAEError as e:
        _fail(str(e))
    console.print(f"wrote {out}")


@sae_app.command("import")
def sae_import(
    path: Path = typer.Argument(..., help="an SAELens, sparsify or dictionary_learning SAE folder"),
    out: Path = typer.Option(..., help="destination folder (native format)"),
) -> None:
    """Convert a peer's SAE checkpoint into thoughtscope's format."""
    from ..sae import SAEError, load_sae, save_sae

    try:
        save_sae(load_sae(path), out)
    except SAEError as e:
        _fail(str(e))
    console.print(f"wrote {out}")
