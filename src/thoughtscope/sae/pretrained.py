"""Pretrained SAEs by release name: ``saelens:<release>/<sae_id>``, resolved through SAELens' registry.

The ``sae-lens`` wheel ships ``pretrained_saes.yaml``: release -> hub repo, model, conversion function, and per SAE
its id and folder inside the repo (plus l0 and Neuronpedia ids). This module reads that file without importing
``sae_lens`` (slow, heavy), fetches the SAE's files with ``huggingface_hub.hf_hub_download`` (the local hub cache
first; ``HF_HUB_OFFLINE=1`` reads only the cache) and says what layout they are in; ``formats.load_sae`` turns them
into an SAE. Layouts read:

- SAELens native (no conversion function): ``<path>/cfg.json`` + ``<path>/sae_weights.safetensors``;
- Gemma Scope (``gemma_2``): ``<path>/params.npz`` (JumpReLU; the encoder sees raw x);
- Gemma Scope 2 (``gemma_3``): ``<path>/params.safetensors`` (w_enc, w_dec, b_enc, b_dec, threshold), with an
  optional ``<path>/config.json``;
- dictionary_learning (``dictionary_learning_1``): ``<path>/config.json`` + ``<path>/ae.pt``.

Only residual-stream SAEs are read (thoughtscope's sites are ``resid.L`` = ``blocks.L.hook_resid_post``);
transcoders, MLP-out and attention SAEs are refused with a reason. ``check_sae_fits`` refuses an SAE on a model
it was not trained for (width, layer count, model name with aliases such as gemma3-270m = google/gemma-3-270m).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SAEError
from ..models import Site

if TYPE_CHECKING:
    import torch

    from ..models import LoadedModel
    from .base import SAE

PREFIX = "saelens:"
REGISTRY_FILE = "pretrained_saes.yaml"
#: a registry file to read instead of the one inside the sae-lens wheel (tests, or a newer copy)
REGISTRY_ENV = "THOUGHTSCOPE_SAELENS_REGISTRY"
#: SAELens conversion functions whose files this module reads -> the layout formats.load_sae converts
CONVERSIONS = {None: "saelens", "gemma_2": "gemma_scope", "gemma_3": "gemma_scope", "dictionary_learning_1": "dl"}
INSTALL_HINT = 'pip install "thoughtscope[bench]" (or pip install sae-lens)'


@dataclass(frozen=True)
class PretrainedEntry:
    """One SAE of the registry: where its files are and what it was trained on."""

    release: str
    """the release name (a top-level key of the registry)"""
    sae_id: str
    """the SAE's id within the release"""
    repo_id: str
    """the Hugging Face repo holding the files"""
    path: str
    """the SAE's folder inside that repo"""
    model: str
    """the model it was trained on, as the registry names it"""
    conversion: str | None = None
    """SAELens' conversion function name (None: SAELens' own cfg.json + sae_weights.safetensors)"""
    l0: float | None = None
    """the registry's average active features per token (count), when it gives one"""
    neuronpedia: str | None = None
    """the Neuronpedia id of its dashboards, when there is one"""
    norm_scaling_factor: float | None = None
    """the input scale SAELens folds into the weights for this SAE (multiplier), when the registry gives one"""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """keys the registry overrides in the SAE's own config"""

    @property
    def spec(self) -> str:
        return f"{PREFIX}{self.release}/{self.sae_id}"


@dataclass
class PretrainedFiles:
    """A pretrained SAE's files in the local hub cache, and how formats.load_sae converts them."""

    entry: PretrainedEntry
    """what the registry says about it"""
    folder: Path
    """the folder holding its files (a snapshot folder of the hub cache)"""
    layout: str
    """"saelens" (cfg + tensors below, SAELens v6 names) or "dl" (a dictionary_learning folder)"""
    cfg: dict[str, Any] = field(default_factory=dict)
    """layout "saelens": the SAE's config as a SAELens v6 cfg.json holds it"""
    tensors: dict[str, Any] = field(default_factory=dict)
    """layout "saelens": W_enc [d, m], W_dec [m, d], b_enc, b_dec (+ threshold), as torch tensors"""
    cfg_file: Path | None = None
    """the file the config came from (named in errors; for Gemma Scope, the weights file it was read from)"""
    weights_file: Path | None = None
    """the file the tensors came from (named in errors)"""


# ----------------------------------------------------------------------------- the spec
def is_pretrained_spec(spec: object) -> bool:
    """True for ``saelens:<release>/<sae_id>`` (a str or a Path made from one)."""
    return str(spec).startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str]:
    """(release, sae_id) of ``saelens:<release>/<sae_id>``; the id may hold slashes, a release does not."""
    rest = str(spec)[len(PREFIX) :] if is_pretrained_spec(spec) else str(spec)
    release, _, sae_id = rest.strip().partition("/")
    if not release or not sae_id.strip("/"):
        raise SAEError(
            f"cannot parse pretrained SAE {spec!r}: expected 'saelens:<release>/<sae_id>', "
            "e.g. saelens:gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_small"
        )
    return release, sae_id.strip("/")


# ----------------------------------------------------------------------------- the registry
def registry_path() -> Path:
    """The registry file: $THOUGHTSCOPE_SAELENS_REGISTRY, else pretrained_saes.yaml inside the installed sae-lens
    package, found without importing it."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise SAEError(f"${REGISTRY_ENV} names {p}, which is not a file (expected a pretrained_saes.yaml)")
        return p
    spec = importlib.util.find_spec("sae_lens")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / REGISTRY_FILE
        if p.is_file():
            return p
    if spec is None:
        raise SAEError(f"'{PREFIX}' SAE names are looked up in the registry the sae-lens package ships: {INSTALL_HINT}")
    raise SAEError(f"the sae-lens package is installed but holds no {REGISTRY_FILE}; reinstall it ({INSTALL_HINT})")


def _yaml_load(text: str, where: Path) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise SAEError(f"cannot parse the SAE registry {where}: {e}") from None


def _release_block(text: str, release: str) -> str | None:
    """The lines of one top-level key of a block-style YAML mapping (parsing 40k lines for one entry is slow)."""
    m = re.search(rf"^{re.escape(release)}:[ \t]*(#.*)?$", text, flags=re.MULTILINE)
    if m is None:
        return None
    end = re.search(r"^[^\s#]", text[m.end() :], flags=re.MULTILINE)
    return text[m.start() : m.end() + end.start()] if end else text[m.start() :]


def read_release(release: str, registry: Path | None = None) -> dict[str, Any]:
    """The registry's entry for one release (repo_id, model, conversion_func, saes, ...)."""
    where = registry or registry_path()
    text = where.read_text(encoding="utf-8")
    block = _release_block(text, release)
    data = _yaml_load(block, where) if block is not None else None
    if not isinstance(data, dict) or release not in data:
        data = _yaml_load(text, where)  # an unusual layout, or an unknown release: read the whole file
        if not isinstance(data, dict):
            raise SAEError(f"the SAE registry {where} is not a mapping of release names")
        if release not in data:
            close = difflib.get_close_matches(release, [str(k) for k in data], n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise SAEError(f"unknown SAE release {release!r} in {where} ({len(data)} releases){hint}")
    value = data[release]
    if not isinstance(value, dict):
        raise SAEError(f"{where}: release {release!r} is {value!r:.80}, expected a mapping")
    for key in ("repo_id", "model"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise SAEError(f"{where}: release {release!r} has no {key!r} (a string)")
    if not isinstance(value.get("saes"), list):
        raise SAEError(f"{where}: release {release!r} has no 'saes' list")
    return value


def lookup(release: str, sae_id: str, registry: Path | None = None) -> PretrainedEntry:
    """The registry entry of (release, sae_id); SAEError naming close ids when the id is unknown."""
    where = registry or registry_path()
    value = read_release(release, where)
    saes = [s for s in value["saes"] if isinstance(s, dict) and "id" in s and "path" in s]
    hit = next((s for s in saes if str(s["id"]) == sae_id), None)
    if hit is None:
        ids = [str(s["id"]) for s in saes]
        close = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.5)
        hint = f"; close ids: {', '.join(close)}" if close else f"; for example {', '.join(ids[:3])}"
        raise SAEError(f"release {release!r} in {where} has no SAE with id {sae_id!r} ({len(ids)} ids){hint}")
    overrides = value.get("config_overrides") or {}
    conversion = value.get("conversion_func")
    return PretrainedEntry(
        release=release,
        sae_id=sae_id,
        repo_id=value["repo_id"],
        path=str(hit["path"]).strip("/"),
        model=value["model"],
        conversion=str(conversion) if conversion is not None else None,
        l0=_number(hit.get("l0")),
        neuronpedia=str(hit["neuronpedia"]) if isinstance(hit.get("neuronpedia"), str) else None,
        norm_scaling_factor=_number(hit.get("norm_scaling_factor")),
        config_overrides=dict(overrides) if isinstance(overrides, dict) else {},
    )


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------- the hub
def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    return (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError)


def _is_remote_missing(err: BaseException) -> bool:
    """The hub answered that the file does not exist (not: unreachable, or offline without the file cached)."""
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    return isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError)


def fetch(entry: PretrainedEntry, name: str, *, optional: bool = False) -> Path | None:
    """The local path of `name` inside the SAE's folder: the hub cache's copy when there is one (no network: a file
    at a registry path does not change, and a machine without the hub would wait through the client's retries),
    else downloaded. An optional file is read from the cache only (None when absent); a missing required one is an
    SAEError naming the release, id, repo and file."""
    from huggingface_hub import hf_hub_download

    filename = f"{entry.path}/{name}" if entry.path else name
    try:
        return Path(hf_hub_download(repo_id=entry.repo_id, filename=filename, local_files_only=True))
    except _hub_errors() as e:
        if optional:
            return None
        err: BaseException = e
    if not _hub_offline():
        try:
            return Path(hf_hub_download(repo_id=entry.repo_id, filename=filename))
        except _hub_errors() as e:
            err = e
    why = "the hub answered that it does not exist" if _is_remote_missing(err) else f"{type(err).__name__}: {err}"
    raise SAEError(
        f"{entry.spec}: cannot get {filename} from the Hugging Face repo {entry.repo_id}: it is not in the local hub "
        f"cache ({_cache_dir()}){' and HF_HUB_OFFLINE is set' if _hub_offline() else ''}, and the hub did not "
        f"provide it ({why[:300]}). Connect and retry, or fetch it once with `hf download {entry.repo_id} {filename}`"
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# ----------------------------------------------------------------------------- layouts
def fetch_pretrained(spec: str, *, registry: Path | None = None) -> PretrainedFiles:
    """Resolve ``saelens:<release>/<sae_id>`` to its files in the local hub cache (fetching what is missing)."""
    entry = lookup(*parse_spec(spec), registry=registry)
    if entry.conversion not in CONVERSIONS:
        known = ", ".join(sorted(str(c) for c in CONVERSIONS if c))
        raise SAEError(
            f"{entry.spec}: its files are in the {entry.conversion!r} layout, which thoughtscope does not read "
            f"(it reads SAELens' own layout and {known})"
        )
    layout = CONVERSIONS[entry.conversion]
    if layout == "dl":
        cfg_path = fetch(entry, "config.json")
        fetch(entry, "ae.pt")
        return PretrainedFiles(entry, cfg_path.parent, "dl", cfg_file=cfg_path)
    if layout == "gemma_scope":
        return _gemma_scope(entry)
    return _saelens_native(entry)


def _saelens_native(entry: PretrainedEntry) -> PretrainedFiles:
    from .._io import read_json

    cfg_path = fetch(entry, "cfg.json")
    weights = fetch(entry, "sae_weights.safetensors")
    raw = read_json(cfg_path, SAEError)
    if not isinstance(raw, dict):
        raise SAEError(f"{cfg_path}: expected a JSON object (a SAELens cfg.json)")
    cfg = _v6_config({**raw, **entry.config_overrides}, entry, cfg_path)
    return PretrainedFiles(entry, cfg_path.parent, "saelens", cfg, _read_tensors(weights), cfg_path, weights)


def _v6_config(raw: dict[str, Any], entry: PretrainedEntry, where: Path) -> dict[str, Any]:
    """A SAELens cfg.json of any version in the v6 form formats.load_saelens reads (older ones name the hook
    `hook_point`, keep the model and hook at the top level and give normalize_activations as a bool)."""
    cfg = dict(raw)
    meta = dict(cfg.get("metadata") or {}) if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or entry.sae_id
    meta["hook_name"] = hook
    meta.setdefault("model_name", cfg.get("model_name") or entry.model)
    cfg["metadata"] = meta
    norm = cfg.get("normalize_activations", "none")
    if norm is False or norm is None:
        norm = "none"
    if norm is True:
        norm = "expected_average_only_in"
    if norm != "none":
        how = (
            f" (the registry's norm_scaling_factor {entry.norm_scaling_factor:g} is not folded in by thoughtscope)"
            if entry.norm_scaling_factor is not None
            else ""
        )
        raise SAEError(f"{entry.spec} ({where}): normalize_activations={norm!r} is not supported{how}")
    cfg["normalize_activations"] = "none"
    if "activation_fn_str" in cfg and "architecture" not in cfg:
        kw = cfg.get("activation_fn_kwargs") or {}
        if cfg["activation_fn_str"] == "topk" and isinstance(kw, dict) and "k" in kw:
            cfg["architecture"], cfg["k"] = "topk", kw["k"]
    _check_resid(hook, entry)
    return cfg


def _check_resid(hook: str, entry: PretrainedEntry) -> None:
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", str(hook))
    if m is None or (m.group(2) == "pre" and int(m.group(1)) == 0):
        raise SAEError(
            f"{entry.spec} reads {hook!r}; thoughtscope reads the residual stream between blocks only "
            "(resid.L = blocks.L.hook_resid_post = blocks.L+1.hook_resid_pre)"
        )


def _gemma_scope(entry: PretrainedEntry) -> PretrainedFiles:
    """Gemma Scope (params.npz) and Gemma Scope 2 (params.safetensors): JumpReLU, encoder on raw x."""
    path = entry.path
    m = re.search(r"layer_(\d+)", path)
    resid = "resid_post" in path if entry.conversion == "gemma_3" else "res" in entry.repo_id
    if m is None or not resid or "embedding" in path or "transcoder" in path or "clt" in path:
        raise SAEError(
            f"{entry.spec} ({entry.repo_id}/{path}) is not a residual-stream SAE after a block; thoughtscope reads "
            "resid.L only (Gemma Scope's resid_post / res SAEs), not transcoders, MLP, attention or embedding SAEs"
        )
    if entry.conversion == "gemma_3":
        conf = fetch(entry, "config.json", optional=True)  # Gemma Scope 2 has it for some folders: checked if cached
        if conf is not None:
            _check_gemma_config(conf, entry)
        weights = fetch(entry, "params.safetensors")
    else:
        weights = fetch(entry, "params.npz")
    t = _read_tensors(weights)
    t = {("W_" + k[2:] if k in ("w_enc", "w_dec") else k): v for k, v in t.items()}
    w = t.get("W_enc")
    if w is None or w.dim() != 2:
        raise SAEError(f"{weights} lacks a 2-D tensor 'w_enc'/'W_enc' (has {sorted(t)})")
    cfg = {
        "architecture": "jumprelu",
        "d_in": int(w.shape[0]),
        "d_sae": int(w.shape[1]),
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"model_name": entry.model, "hook_name": f"blocks.{int(m.group(1))}.hook_resid_post"},
    }
    keep = {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k in t}
    return PretrainedFiles(entry, weights.parent, "saelens", cfg, keep, weights, weights)


def _check_gemma_config(path: Path, entry: PretrainedEntry) -> None:
    from .._io import read_json

    raw = read_json(path, SAEError)
    arch = raw.get("architecture") if isinstance(raw, dict) else None
    if arch not in (None, "jump_relu", "jumprelu"):
        raise SAEError(f"{entry.spec}: {path} gives architecture {arch!r}; a Gemma Scope SAE is jump_relu")
    if isinstance(raw, dict) and raw.get("affine_connection"):
        raise SAEError(f"{entry.spec}: {path} describes a transcoder with an affine skip connection, not an SAE")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every array of a .safetensors or .npz file as a torch tensor; SAEError naming the file if it is damaged."""
    import torch

    try:
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - numpy, zipfile and safetensors raise many types for a damaged file
        raise SAEError(f"corrupt weights file {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- after conversion
def finish(sae: SAE, found: PretrainedFiles) -> SAE:
    """Record where a converted pretrained SAE came from (cfg.extra["pretrained"], the model's registered name
    when it is one of ours) and refuse one whose site thoughtscope cannot read."""
    from .stats import read_feature_stats

    e = found.entry
    cfg = sae.cfg
    cfg.model = cfg.model or e.model
    try:
        cfg.site = str(Site.parse(cfg.site))
    except ValueError:
        raise SAEError(
            f"{e.spec} reads {cfg.site!r}; thoughtscope reads residual-stream sites (resid.L) only"
        ) from None
    registered = registered_name(cfg.model)
    if cfg.model_source is None and registered is not None:
        cfg.model_source = {"spec": registered, "registered": registered, "name": cfg.model}
    cfg.extra["pretrained"] = {
        "spec": e.spec,
        "release": e.release,
        "sae_id": e.sae_id,
        "repo_id": e.repo_id,
        "path": e.path,
        "conversion": e.conversion,
        "l0": e.l0,
        "neuronpedia": e.neuronpedia,
    }
    sae.feature_stats = read_feature_stats(found.folder, int(sae.W_dec.shape[0]))
    sae.source_dir = found.folder
    sae.source_spec = e.spec  # how to load it again (a preset or an atlas records this, not the cache folder)
    return sae


# ----------------------------------------------------------------------------- does it fit the model
#: names a registry, a hub or a file gives the same model under (after canonical_model_name's own rules)
MODEL_ALIASES = {
    "gpt2-small": "gpt2",
    "meta-llama-3-8b-instruct": "llama-3-8b-instruct",
    "smollm2-135m-instruct-q8-0": "smollm2-135m-instruct",
}


def canonical_model_name(name: str) -> str:
    """One spelling per model: the last path part, lower case, no .gguf or quantisation suffix (-q4_k_m, -f16),
    "gemma3-" = "gemma-3-", and a base checkpoint's "-pt" dropped (google/gemma-3-270m = gemma-3-270m-pt)."""
    s = str(name).strip().replace("\\", "/").rstrip("/").split("/")[-1].lower()
    s = s.removesuffix(".gguf").replace("_", "-")
    s = MODEL_ALIASES.get(s, s)
    while True:
        t = re.sub(r"-(i?q\d(-[a-z0-9]{1,2})*|f16|bf16|fp16|f32|fp32|gguf)$", "", s)
        if t == s:
            break
        s = t
    s = re.sub(r"^gemma(\d)-", r"gemma-\1-", s)
    s = MODEL_ALIASES.get(s, s)
    return s.removesuffix("-pt")


def registered_name(model: str) -> str | None:
    """Our registered model name (models.REGISTERED) for a model name, e.g. google/gemma-3-270m -> gemma3-270m."""
    from ..models import REGISTERED

    want = canonical_model_name(model)
    for key, entry in REGISTERED.items():
        names = {key, entry.name or "", Path(entry.file).stem}
        if want in {canonical_model_name(n) for n in names if n}:
            return key
    return None


def model_names(lm: LoadedModel) -> set[str]:
    """Every canonical name a loaded model goes by: its name, spec, registered name and file."""
    src = lm.source if isinstance(lm.source, dict) else {}
    raw = {lm.name, src.get("spec"), src.get("name"), src.get("registered")}
    raw |= {Path(str(src[k])).stem for k in ("gguf", "path") if src.get(k)}
    return _names_of(*raw)


def _names_of(*names: str | None) -> set[str]:
    """The canonical names of `names`, a registered name (models.REGISTERED) standing for its model's names too."""
    from ..models import REGISTERED

    raw = {str(n) for n in names if n}
    for key in [r for r in raw if r in REGISTERED]:
        raw |= {REGISTERED[key].name or "", Path(REGISTERED[key].file).stem}
    return {canonical_model_name(r) for r in raw if r}


def same_model(model: str, lm: LoadedModel) -> bool:
    """Whether a recorded model name (an SAE's cfg.model, a registry's model) names the loaded model: compared by
    canonical_model_name, a registered name standing for its model (so gemma3-270m = google/gemma-3-270m)."""
    return bool(_names_of(model) & model_names(lm))


def _label(sae: SAE) -> str:
    pre = (sae.cfg.extra or {}).get("pretrained") or {}
    where = pre.get("spec") or getattr(sae, "source_spec", None) or getattr(sae, "source_dir", None) or "the SAE"
    return f"{where} (trained on {sae.cfg.model or 'an unnamed model'})"


def check_sae_fits(sae: SAE, lm: LoadedModel, site: Site | str | None = None) -> Site:
    """The site to read, or SAEError naming both the SAE and the model: the SAE's width must be the model's,
    its site's layer within the model's blocks, and its model name the model's (aliases allowed)."""
    cfg = sae.cfg
    if cfg.d_model != lm.d_model:
        raise SAEError(
            f"{_label(sae)} reads {cfg.d_model} numbers per token but {lm.name} has width d_model={lm.d_model}: "
            f"it was trained on another model"
        )
    site = Site.parse(site) if site is not None else (Site.parse(cfg.site) if cfg.site else None)
    if site is None:
        raise SAEError(f"{_label(sae)} names no site (cfg.site is empty); name the site to read")
    if site.layer >= lm.n_layers:
        raise SAEError(
            f"{_label(sae)} reads {site} but {lm.name} has {lm.n_layers} blocks (resid.0..resid.{lm.n_layers - 1})"
        )
    if cfg.model and not same_model(cfg.model, lm):
        raise SAEError(
            f"{_label(sae)} was trained on {cfg.model!r}, not on {lm.name!r}; load {cfg.model!r} "
            f"(--model) or use an SAE trained on {lm.name}"
        )
    return site
