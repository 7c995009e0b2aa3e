"""`thoughtscope sae train` and `sae eval` as library calls: a data source (an activation store, or a model read
on the fly), a grid of SAE configs (every combination of the swept values) trained on one pass of it, and the
measurements of one SAE folder. The CLI parses its flags, calls `train_grid` or `evaluate_folder` and prints.

Every SAE trained here records, in its folder's metrics file (`data`), which corpus text it was trained on (the
store's corpus record and token range, or the text read on the fly), and in its config how to load its model again
(`model_source`). `evaluate_folder` measures the spliced loss on the text after it by default (held-out text of the
same corpus), loading the recorded model when none is given; `loss_recovered_vs_mean` stands beside FVU.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, read_json
from ..errors import ModelError, SAEError
from .config import SAEConfig, TrainConfig
from .registry import sae_class

# `evaluate_folder` reads the store in batches of EVAL_ROWS rows and the corpus for the spliced loss in batches of
# LOSS_CONTEXTS contexts of LOSS_CTX_LEN tokens; sizes only (the metrics are sums over all batches).
EVAL_ROWS = 4096
LOSS_CTX_LEN, LOSS_CONTEXTS = 128, 8
METRICS_FILE = "metrics.json"  # the SAE folder's metrics (formats.METRICS_FILE)
TRAIN_LOSS_TOKENS = 2048  # held-out tokens of the spliced loss measured right after training, when a model is at hand
TRANSCODER_OF = {"topk": "transcoder", "jumprelu": "jumprelu-transcoder"}  # --target-site: the SAE arch's transcoder


@dataclass(frozen=True)
class Source:
    """Training data and what it says about itself: an ActivationStore, or `f(start_batch)` reading a model."""

    data: Any
    d_model: int
    model: str
    site: str
    model_source: dict | None = None
    """How to load the model again (LoadedModel.source, as the store recorded it); None = not recorded."""
    text: dict | None = None
    """The corpus text the data comes from (`training_text`); None = unknown."""
    lm: Any = None
    """The loaded model, when the data is read on the fly."""
    target_site: str = ""
    """The site a transcoder reconstructs from `site` (the data then pairs both, [B, 2, d]); "" = an SAE's data."""


@dataclass(frozen=True)
class Trained:
    """One SAE of a grid: its run name, the folder it was saved to, the SAE."""

    name: str
    folder: Path
    sae: Any


def open_source(
    store=None,
    model: str | None = None,
    *,
    site: str,
    corpus: str,
    train_cfg: TrainConfig,
    target_site: str | None = None,
) -> Source:
    """The store at `store`, or activations of `model` at `site` on `corpus`, computed as training reads them
    (`train_cfg.n_tokens` tokens in batches of `train_cfg.batch_size` rows, shuffled with `train_cfg.seed`); with
    `target_site`, pairs of `site` and `target_site` rows from the same pass (a transcoder's data)."""
    if store is not None and target_site:
        raise SAEError("a transcoder (--target-site) trains on the fly from --model; stores hold one site each")
    if store is not None:
        from ..store import ActivationStore

        st = ActivationStore.open(store)
        extra = st.manifest.get("extra") or {}
        src = extra.get("model_source") if isinstance(extra.get("model_source"), dict) else None
        return Source(st, st.d_model, st.model, st.site, src, store_text(st))
    from ..corpus import Corpus
    from ..harvest import stream_activations
    from ..models import load_model

    lm = load_model(model)
    tc = train_cfg
    c = Corpus(corpus)
    data = stream_activations(
        lm, c, site, n_tokens=tc.n_tokens, batch_size=tc.batch_size, seed=tc.seed, target_site=target_site or None
    )
    target = str(lm.check_site(target_site)) if target_site else ""
    site = str(lm.check_site(site))
    return Source(data, lm.d_model, lm.name, site, lm.source, streamed_text(c, tc.n_tokens), lm, target)


def store_text(st) -> dict:
    """The corpus text a store holds: its corpus record and token range (BOS included, as harvest counts)."""
    extra = st.manifest.get("extra") or {}
    return {
        "from": f"store {st.path}",
        "corpus": st.manifest.get("corpus"),
        "skip_tokens": int(extra.get("skip_tokens") or 0),
        "n_tokens": int(st.n_tokens),
        "ctx_len": int(extra.get("ctx_len") or LOSS_CTX_LEN),
        "add_bos": bool(extra.get("add_bos", True)),
    }


def streamed_text(corpus, n_tokens: int, ctx_len: int = 128, contexts_per_batch: int = 16) -> dict:
    """The corpus text `stream_activations` reads for `n_tokens` rows (position 0 left out): whole forward passes
    of `contexts_per_batch` contexts of `ctx_len` tokens from the start of the corpus (an upper bound)."""
    contexts = math.ceil(n_tokens / (ctx_len - 1) / contexts_per_batch) * contexts_per_batch
    return {
        "from": "read on the fly",
        "corpus": corpus.describe(),
        "skip_tokens": 0,
        "n_tokens": contexts * ctx_len,
        "ctx_len": ctx_len,
        "add_bos": True,
    }


def config_grid(
    source: Source,
    *,
    arch: Sequence[str],
    k: Sequence[int],
    expansion: Sequence[int],
    l1_coeff: Sequence[float],
    l0_coeff: Sequence[float],
    max_norm_ratio: float | None = SAEConfig.max_norm_ratio,
    skip_connection: Sequence[bool] = (False,),
    decoder_norm: Sequence[str | None] = (None,),
) -> tuple[list[SAEConfig], list[str]]:
    """One SAEConfig per combination of the swept values (expansion = n_features / d_model), with its run name;
    combinations that give the same run (a value its architecture ignores) are kept once. `skip_connection` (a
    transcoder's linear skip path) needs a source with a target site."""
    if any(skip_connection) and not source.target_site:
        raise SAEError("a skip connection belongs to a transcoder: give a target site (--target-site) too")
    cfgs: list[SAEConfig] = []
    names: list[str] = []
    for a, kk, e, l1, l0, sk, dn in itertools.product(
        arch, k, expansion, l1_coeff, l0_coeff, skip_connection, decoder_norm
    ):
        if source.target_site:  # a transcoder: topk -> transcoder, jumprelu -> jumprelu-transcoder
            a = TRANSCODER_OF.get(a, a)
            if a not in TRANSCODER_OF.values():
                raise SAEError(
                    f"a transcoder (--target-site) has a TopK or JumpReLU activation; arch {a!r} has no transcoder form"
                )
        cfg = SAEConfig(
            arch=a,
            d_model=source.d_model,
            n_features=source.d_model * e,
            k=kk,
            l1_coeff=l1,
            l0_coeff=l0,
            model=source.model,
            model_source=source.model_source,
            site=source.site,
            target_site=source.target_site,
            skip_connection=sk,
            decoder_norm=dn,
            max_norm_ratio=max_norm_ratio,
        )
        name = sae_class(a).run_name(cfg)
        if name not in names:
            cfgs.append(cfg)
            names.append(name)
    return cfgs, names


def train_grid(
    out: str | Path,
    *,
    store=None,
    model: str | None = None,
    site: str = "resid.15",
    corpus: str = "default",
    grid: dict[str, Sequence],
    max_norm_ratio: float | None = SAEConfig.max_norm_ratio,
    train_cfg: TrainConfig,
    loss_tokens: int = 0,
    target_site: str | None = None,
) -> tuple[list[Trained], float]:
    """Train every config of `grid` (keys of `config_grid`) on one pass over the source and save each SAE: one
    SAE goes to `out`, a grid to one subfolder per run. Resumable from `out/.checkpoint` unless `train_cfg`
    names its own checkpoint folder. Each folder's metrics file records the training text (`data`); with
    `loss_tokens`, the spliced loss on that many held-out tokens is added (`heldout`) when the model can be loaded
    (the one read on the fly, or the store's recorded one); a model that cannot leaves a note instead. With
    `target_site` (on the fly only) it trains transcoders from `site` to `target_site`. Returns the SAEs and the
    training time in seconds."""
    from ..distributed import rank_and_world
    from .train import train_saes

    out = Path(out)
    if train_cfg.checkpoint_dir is None:
        train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(out / ".checkpoint"))
    source = open_source(store, model, site=site, corpus=corpus, train_cfg=train_cfg, target_site=target_site)
    cfgs, names = config_grid(source, max_norm_ratio=max_norm_ratio, **grid)
    folders = [out] if len(cfgs) == 1 else [out / n for n in names]
    t0 = time.perf_counter()
    saes = train_saes(cfgs, source.data, train_cfg, out_dirs=folders)
    seconds = time.perf_counter() - t0
    runs = [Trained(n, f, s) for n, f, s in zip(names, folders, saes)]
    if rank_and_world()[0] == 0:
        record_after_training(runs, source, loss_tokens=loss_tokens, progress=train_cfg.progress)
    return runs, seconds


def record_after_training(runs: list[Trained], source: Source, *, loss_tokens: int, progress: bool = False) -> None:
    """Add the training text (`data`) and, with `loss_tokens`, the held-out spliced loss (`heldout`) to each saved
    folder's metrics file; the figures also go to `sae.heldout` for the caller to print."""
    lm, note = source.lm, None
    if loss_tokens > 0 and lm is None:
        try:
            recorded = loadable_record(source.model_source, source.model)
            if recorded is None:
                raise ModelError(f"the store records no way to load its model {source.model!r}")
            lm = _load_model(recorded, None)
        except ModelError as e:
            note = f"no spliced loss: {e}; run sae eval --model"
    for run in runs:
        m = _read_metrics(run.folder)
        m["data"] = source.text
        if loss_tokens > 0 and lm is not None:
            try:
                spliced, where = heldout_loss(lm, run.sae, None, loss_tokens, source.text, progress=progress)
                m["heldout"] = {**m.get("heldout", {}), "spliced": spliced, "spliced_text": where}
            except (SAEError, ModelError) as e:  # the SAE is trained and saved: say why, never fail now
                m["heldout"] = {**m.get("heldout", {}), "spliced_skipped": str(e)}
        elif loss_tokens > 0:
            m["heldout"] = {**m.get("heldout", {}), "spliced_skipped": note}
        run.sae.heldout = m.get("heldout", {})
        atomic_write_json(run.folder / METRICS_FILE, m, default=float)


def _read_metrics(folder: Path) -> dict:
    f = Path(folder) / METRICS_FILE
    if not f.is_file():
        return {}
    m = read_json(f, SAEError)
    return m if isinstance(m, dict) else {}


def training_text(folder: str | Path) -> dict | None:
    """The training-text record (`data`) of an SAE folder's metrics file; None when it has none."""
    rec = _read_metrics(Path(folder)).get("data") if Path(folder).is_dir() else None
    return rec if isinstance(rec, dict) else None


def heldout_contexts(text: dict | None, corpus: Any, ctx_len: int = LOSS_CTX_LEN) -> tuple[int, str]:
    """Contexts of `ctx_len` tokens to skip in `corpus` (a Corpus) to start past the text an SAE trained on, and a
    sentence saying where the measured text starts."""
    from ..store.format import json_normal

    here = json_normal(corpus.describe())
    if text is None:
        return 0, (
            f"the start of corpus {here.get('spec')!r}: the SAE folder does not record the text it was trained on, "
            "so this may overlap it (give --skip-tokens or --skip-contexts to hold text out)"
        )
    rec = text.get("corpus") if isinstance(text.get("corpus"), dict) else {}
    if rec != here and (rec.get("spec"), rec.get("kind")) != (here.get("spec"), here.get("kind")):
        return 0, f"the start of corpus {here.get('spec')!r}, not the corpus the SAE trained on ({rec.get('spec')!r})"
    try:
        end = int(text["skip_tokens"]) + int(text["n_tokens"])
        rec_ctx, bos = int(text.get("ctx_len", LOSS_CTX_LEN)), bool(text.get("add_bos", True))
        body = math.ceil(end / rec_ctx) * (rec_ctx - int(bos))  # text tokens (no BOS) those contexts held
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise SAEError(
            f"the training-text record {text!r} is damaged: expected skip_tokens, n_tokens, ctx_len"
        ) from None
    skip = math.ceil(body / (ctx_len - 1))
    return skip, (
        f"held-out text of corpus {here.get('spec')!r}: after the {end:,} tokens the SAE trained on "
        f"({text.get('from', 'recorded')}), i.e. {skip:,} contexts of {ctx_len} skipped"
    )


def store_overlap(store: dict, trained: dict | None) -> str:
    """Whether a store's text is text the SAE trained on (same corpus, overlapping token ranges), in words."""
    if trained is None:
        return "unknown whether the SAE trained on this store's text (its folder does not record its training text)"
    a, b = store.get("corpus") or {}, trained.get("corpus") if isinstance(trained.get("corpus"), dict) else {}
    same = a == b or (a.get("spec"), a.get("kind")) == (b.get("spec"), b.get("kind"))
    try:
        lo, hi = int(trained["skip_tokens"]), int(trained["skip_tokens"]) + int(trained["n_tokens"])
    except (KeyError, TypeError, ValueError):
        raise SAEError(f"training-text record {trained!r} is damaged: expected skip_tokens and n_tokens") from None
    s_lo, s_hi = store["skip_tokens"], store["skip_tokens"] + store["n_tokens"]
    if same and s_lo < hi and lo < s_hi:
        return "training text: this store overlaps the text the SAE trained on, so FVU here is not held out"
    return "held out: this store's text is not the text the SAE trained on"


def _check_model(sae, lm) -> None:
    """The SAE fits `lm`: the same width, and the same model name or (a moved file or folder) the same content."""
    if lm.d_model != sae.cfg.d_model:
        raise SAEError(f"the SAE reads {sae.cfg.d_model} numbers per token but {lm.name!r} has width {lm.d_model}")
    digest = (sae.cfg.model_source or {}).get("sha256")
    if sae.cfg.model and sae.cfg.model != lm.name and not (digest and digest == lm.source.get("sha256")):
        raise SAEError(f"the SAE was trained on {sae.cfg.model!r}, not {lm.name!r}")


def loadable_record(source: dict | None, name: str | None) -> dict | None:
    """What to load an artefact's model from: its recorded source, else its model name when that is a registered
    one; None otherwise (a bare name would be tried on the hub, which offline means a minute of retries)."""
    from ..models import recorded_spec

    if isinstance(source, dict) and source.get("spec"):
        return source
    rec = recorded_spec(name or None)
    return rec if rec.get("registered") else None


def _load_model(recorded: dict | str | None, given: str | None, device: str | None = None):
    from ..models import load_recorded

    return load_recorded(recorded, given, device=device)


def loss_batches(lm, corpus, skip: int, n_contexts: int) -> list:
    """`n_contexts` contexts of LOSS_CTX_LEN tokens after the first `skip`, in batches of LOSS_CONTEXTS."""
    import torch

    rows = [c.input_ids for c in itertools.islice(corpus.contexts(lm.tokenizer, LOSS_CTX_LEN), skip, skip + n_contexts)]
    if not rows:
        raise SAEError(
            f"corpus {corpus.spec!r} has no text left after skipping {skip:,} contexts of {LOSS_CTX_LEN} tokens; "
            "give a larger corpus, or --skip-contexts / --skip-tokens"
        )
    return [torch.stack(rows[i : i + LOSS_CONTEXTS]) for i in range(0, len(rows), LOSS_CONTEXTS)]


def heldout_loss(
    lm,
    sae,
    corpus: str | None,
    loss_tokens: int,
    text: dict | None,
    *,
    skip_contexts: int | None = None,
    skip_tokens: int | None = None,
    progress: bool = False,
) -> tuple[dict, dict]:
    """The SAE's spliced loss on `loss_tokens` tokens of `corpus` (default: the one it trained on, else the default
    corpus), by default after the text it trained on (`text`, its training record); `skip_contexts` or
    `skip_tokens` (counted as this read counts them: contexts of LOSS_CTX_LEN tokens, BOS included) override.
    Returns the figures and where the text came from."""
    from ..corpus import Corpus
    from .metrics import spliced_lm_loss

    _check_model(sae, lm)
    rec = (text or {}).get("corpus") if isinstance((text or {}).get("corpus"), dict) else {}
    c = Corpus(corpus or rec.get("spec") or "default")
    if skip_contexts is not None:
        skip, said = skip_contexts, f"corpus {c.spec!r} after {skip_contexts:,} contexts (--skip-contexts)"
    elif skip_tokens is not None:
        skip = math.ceil(skip_tokens / LOSS_CTX_LEN)
        said = f"corpus {c.spec!r} after {skip_tokens:,} tokens = {skip:,} contexts of {LOSS_CTX_LEN} (--skip-tokens)"
    else:
        skip, said = heldout_contexts(text, c)
    site = lm.check_site(sae.cfg.site or "resid.15")
    batches = loss_batches(lm, c, skip, max(1, math.ceil(loss_tokens / LOSS_CTX_LEN)))
    if getattr(sae, "paired", False):  # a transcoder: its target site replaced by its prediction from its own input
        from .transcoder import spliced_transcoder_loss

        spliced = spliced_transcoder_loss(lm, sae, batches, progress=progress)
    else:
        spliced = spliced_lm_loss(lm, sae, site, batches, progress=progress)
    return spliced, {"corpus": c.spec, "skip_contexts": skip, "ctx_len": LOSS_CTX_LEN, "text": said}


def evaluate_folder(
    path: str | Path,
    *,
    store=None,
    model: str | None = None,
    corpus: str | None = None,
    n_tokens: int = 200_000,
    loss_tokens: int = 16_384,
    skip_contexts: int | None = None,
    skip_tokens: int | None = None,
    progress: bool = False,
    write: bool = False,
    device: str | None = None,
) -> dict:
    """Reconstruction metrics of the SAE at `path` on at most `n_tokens` store tokens, and its spliced language-model
    loss on `loss_tokens` corpus tokens (held out from its training text by default; see `heldout_loss`) with the
    model given, else the one it recorded (none given or recorded: reconstruction only; `loss_tokens=0` skips the
    loss). `loss_recovered_vs_mean` and `fvu` lead the result. `write` stores it in the folder's metrics file
    (`heldout`). `device`: where the SAE and the model run (default: the CPU)."""
    from .formats import load_sae
    from .metrics import evaluate_sae

    sae = load_sae(path, device=device)
    folder = getattr(sae, "source_dir", Path(path))
    recon = spliced = where = skipped = None
    if store is not None and getattr(sae, "paired", False):
        raise SAEError(
            f"{path} is a transcoder ({sae.cfg.site} -> {sae.cfg.target_site}); a store holds one site, so it cannot "
            "measure its reconstruction: give --model for the loss with the transcoder in place of the MLP"
        )
    if store is not None:
        from ..store import ActivationStore

        st = ActivationStore.open(store)
        if st.d_model != sae.cfg.d_model:
            raise SAEError(f"store {store} has d_model {st.d_model} but the SAE expects {sae.cfg.d_model}")
        batches = st.batches(
            EVAL_ROWS, shuffle=False, exclude_bos=sae.cfg.exclude_bos, max_norm_ratio=sae.cfg.max_norm_ratio
        )
        recon = evaluate_sae(sae, batches, max_batches=max(1, n_tokens // EVAL_ROWS))
        recon["text"] = store_overlap(store_text(st), training_text(folder))
    recorded = loadable_record(sae.cfg.model_source, sae.cfg.model)
    if loss_tokens <= 0:
        skipped = "loss_tokens is 0"
    elif model is None and recorded is None:
        skipped = f"no model given (--model) and no way to load {sae.cfg.model or 'its model'!r} recorded with the SAE"
    else:
        try:
            lm = _load_model(recorded, model, device)
        except ModelError as e:
            if recon is None:
                raise
            lm, skipped = None, f"the SAE's model could not be loaded: {e}"
        if lm is not None:
            text = training_text(folder)
            spliced, where = heldout_loss(
                lm,
                sae,
                corpus,
                loss_tokens,
                text,
                skip_contexts=skip_contexts,
                skip_tokens=skip_tokens,
                progress=progress,
            )
    if recon is None and spliced is None:
        raise SAEError(f"nothing to measure: give --store (reconstruction) and/or --model (spliced loss): {skipped}")
    result = _eval_result(path, sae, recon, spliced, where, skipped)
    if write:
        m = _read_metrics(folder)
        m["heldout"] = result
        atomic_write_json(Path(folder) / METRICS_FILE, m, default=float)
    return result


def _eval_result(path, sae, recon, spliced, where, skipped) -> dict:
    out: dict = {}
    if spliced is not None:
        out["loss_recovered_vs_mean"] = spliced["loss_recovered_vs_mean"]
    if recon is not None:
        out["fvu"] = recon["fvu"]
    out.update(
        sae=str(path),
        arch=sae.cfg.arch,
        n_features=sae.cfg.n_features,
        excluded="position 0 of every context (attention sink)" if sae.cfg.exclude_bos else "none",
    )
    if recon is not None:
        out["reconstruction"] = recon
    if spliced is not None:
        out["spliced"] = spliced
        out["spliced_text"] = where
    else:
        out["spliced_skipped"] = skipped
    return out


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """ "all", "3", "0-5" or "0,4,8" as block numbers (SAEError naming the bad part and the model's range)."""
    if spec.strip() == "all":
        return list(range(n_layers))
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise SAEError(
                f"layers {spec!r}: {part!r} is not a block number or range (expected e.g. all, 3, 0-5, 0,4)"
            ) from None
        if not 0 <= lo <= hi < n_layers:
            raise SAEError(f"layers {spec!r}: {part!r} is outside the model's blocks 0-{n_layers - 1}")
        out += [i for i in range(lo, hi + 1) if i not in out]
    return out


def layer_folder(out: str | Path, layer: int) -> Path:
    """Where a transcoder set's block `layer` is saved (`out/layer_07`)."""
    return Path(out) / f"layer_{layer:02d}"


def transcoder_config(
    lm, layer: int, n_features: int, k: int, *, arch: str = "transcoder", skip_connection: bool = True
) -> SAEConfig:
    """The config of block `layer`'s transcoder (mlp_in.L -> mlp_out.L) on `lm`; arch topk or jumprelu names its
    transcoder form."""
    return SAEConfig(
        arch=TRANSCODER_OF.get(arch, arch), d_model=lm.d_model, n_features=n_features, k=k, model=lm.name,
        model_source=lm.source, site=f"mlp_in.{layer}", target_site=f"mlp_out.{layer}", skip_connection=skip_connection,
    )  # fmt: skip


def train_transcoders(
    out: str | Path,
    *,
    model: str,
    layers: str = "all",
    corpus: str = "default",
    n_features: int,
    k: int,
    arch: str = "transcoder",
    skip_connection: bool = True,
    train_cfg: TrainConfig,
) -> tuple[list[Trained], float]:
    """A transcoder for each chosen block (mlp_in.L -> mlp_out.L), all trained from one pass over the corpus
    (sae.multisite), each saved to `layer_folder(out, L)`; resumable from `out/.checkpoint`. Returns the runs
    and the training time in seconds."""
    from ..corpus import Corpus
    from ..harvest import stream_activations
    from ..models import load_model
    from .multisite import train_multisite

    out = Path(out)
    if train_cfg.checkpoint_dir is None:
        train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(out / ".checkpoint"))
    if train_cfg.n_tokens is None and train_cfg.steps is None:
        raise SAEError("give a token budget (--tokens) for the transcoders' pass over the corpus")
    lm = load_model(model, device=train_cfg.device if train_cfg.device != "cpu" else None)
    blocks = parse_layers(layers, len(lm.layers))
    c = Corpus(corpus)
    tc = train_cfg
    n_tokens = tc.n_tokens if tc.n_tokens is not None else tc.steps * tc.batch_size
    data = stream_activations(
        lm, c, [f"mlp_in.{i}" for i in blocks], target_site=[f"mlp_out.{i}" for i in blocks],
        n_tokens=n_tokens, batch_size=tc.batch_size, seed=tc.seed,
    )  # fmt: skip
    cfgs = [transcoder_config(lm, i, n_features, k, arch=arch, skip_connection=skip_connection) for i in blocks]
    folders = [layer_folder(out, i) for i in blocks]
    t0 = time.perf_counter()
    saes = train_multisite(cfgs, data, tc, out_dirs=folders)
    seconds = time.perf_counter() - t0
    text = streamed_text(c, n_tokens)
    for f in folders:
        m = _read_metrics(f)
        m["data"] = text
        atomic_write_json(f / METRICS_FILE, m, default=float)
    return [Trained(f"layer_{i:02d}", f, s) for i, f, s in zip(blocks, folders, saes)], seconds
