"""What the server works on, fixed at start: one model, one SAE, its atlas, an NLA, presets and probes.

Nothing here is ever chosen by a request path: requests name features by index and presets by the names
listed at start. `load_workbench` loads everything and reports its stage to a `LoadStatus`, which the "building"
page shows. With no atlas given it builds a small one on first start: before returning, or (`atlas_in_background`,
what `thoughtscope serve` does) in a background thread after it, so the workbench serves at once with
`wb.atlas` None and `wb.atlas_build` saying how far the build is (`atlas_job.AtlasBuild`); the atlas is attached
when it is ready.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ServerError
from .atlas_job import AtlasBuild

# The small atlas built on first start: enough text for every page to have contexts, a few minutes on 2 cores.
FIRST_START_TOKENS = 32_768


@dataclass
class LoadStatus:
    """The loader's progress, read by the building page (stage names are shown to the user)."""

    stage: str = "starting"
    detail: str = ""
    error: str | None = None
    started: float = field(default_factory=time.time)
    ready: bool = False
    atlas: AtlasBuild | None = None  # an atlas built before the workbench serves (its progress on the building page)

    def set(self, stage: str, detail: str = "") -> None:
        self.stage, self.detail = stage, detail

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "detail": self.detail,
            "error": self.error,
            "ready": self.ready,
            "elapsed_s": round(time.time() - self.started, 1),
            **({"atlas": self.atlas.to_dict()} if self.atlas is not None else {}),
        }


@dataclass
class VectorSlider:
    """A steering-vector item of a preset named at start, exposed as a slider (strength as in the preset)."""

    key: str
    label: str
    preset: str
    edit: object  # the VectorEdit built at strength 1 (its strength multiplied by the slider)
    op: str
    strength: float
    range: tuple[float, float]


@dataclass
class Workbench:
    lm: object
    sae: object
    sae_spec: str = ""  # how a saved preset names the SAE ("default" or a folder)
    atlas: object | None = None
    nla: object | None = None
    presets: dict = field(default_factory=dict)  # name -> Preset
    vectors: dict = field(default_factory=dict)  # key -> VectorSlider
    preset_ivs: dict = field(default_factory=dict)  # preset name -> its interventions, built once (a slider)
    sweeps: dict = field(default_factory=dict)  # feature id -> sweep dict (points, baseline)
    probes: dict = field(default_factory=dict)  # name -> probe (score(x) per token, threshold)
    notes: list = field(default_factory=list)  # things the user should know (skipped presets ...)
    db_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    atlas_build: AtlasBuild | None = None  # the first-start atlas while it is built in the background (then done)
    graphs: object | None = None  # pages_graph.GraphSource: the graph page's transcoder set (serve --transcoders)

    def __post_init__(self) -> None:
        self._label_cache: dict[int, tuple[str, bool]] = {}
        self._label_stamp: tuple = ()
        self.n_features = int(self.sae.W_dec.shape[0])
        self.atlas_max = np.ones(self.n_features)  # information only: never scales a slider
        self.alive = np.ones(self.n_features, dtype=bool)
        if self.atlas is not None:
            at, self.atlas = self.atlas, None
            self.attach_atlas(at)
        self._slider_reference()

    def attach_atlas(self, at) -> None:
        """Start using the atlas `at` (an `Atlas` of this SAE): its maxima and alive features first, then the atlas
        itself, so a page that sees `wb.atlas` set also sees them."""
        if at.n_features != self.n_features:
            raise ServerError(
                f"the atlas {at.path} has {at.n_features} features but the SAE has "
                f"{self.n_features}: pass the atlas built from this SAE"
            )
        st = at.stats()
        from ..atlas.search import token_index

        token_index(at)  # what a first search by meaning would build (~2 s), before any page sees the atlas
        with self.db_lock:
            self.atlas_max = np.where(st["max_act"] > 0, st["max_act"], 1.0)
            self.alive = st["n_active"] > 0
            self._label_cache, self._label_stamp = {}, ()
            self.atlas = at

    @property
    def atlas_pending(self) -> bool:
        """True while the first-start atlas is still being built in the background (`wb.atlas` is None then, and
        `wb.atlas_build` says how far it is or why it failed)."""
        return self.atlas is None and self.atlas_build is not None

    def _slider_reference(self) -> None:
        """Feature sliders are in × the max stored with the SAE (`features.feature_max`), the reference the library
        and the CLI use; an SAE that stores none gets sliders in raw activation units, and a note says so."""
        from ..features import feature_max

        ref = feature_max(self.sae)
        self.slider_unit = "max" if ref is not None else "raw"
        self.slider_max = ref.values.double().cpu().numpy() if ref is not None else None
        self.slider_source = ref.source if ref is not None else ""
        if ref is None:
            self.notes.append(
                "the SAE stores no feature maxima, so feature sliders are in raw activation units, not × max "
                "(run 'thoughtscope features stats --sae FOLDER' to store them)"
            )

    @property
    def logit_typical(self) -> np.ndarray:
        """Per feature, the median |logit change| a random direction with its decoder norm makes: feature pages
        show logit effects divided by it ("x typical"; `atlas.writer.typical_logit_change`), computed once."""
        if getattr(self, "_logit_typical", None) is None:
            from ..atlas.writer import typical_logit_change

            self._logit_typical = typical_logit_change(self.lm, self.sae.W_dec).double().numpy()
        return self._logit_typical

    @property
    def max_acts(self) -> np.ndarray:
        """Deprecated: what 1 on a feature slider is in activation units (the max stored with the SAE, or 1 where
        sliders are raw). It used to be the atlas's maxima, which no slider uses now (`atlas_max`)."""
        import warnings

        warnings.warn(
            "Workbench.max_acts is deprecated: sliders use slider_max (stored with the SAE); atlas_max is the "
            "atlas's observed max, for display",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.slider_max if self.slider_max is not None else np.ones(self.n_features)

    def to_slider(self, feature: int, strength: float, unit: str, max_act: float | None) -> float:
        """A feature strength as a preset or sweep gives it (unit "max" against its own `max_act`, or the SAE's
        when it has none; or "raw"), in this workbench's slider unit: the same absolute activation."""
        ref = float(self.slider_max[feature]) if self.slider_max is not None else None
        absolute = strength
        if unit == "max":
            m = max_act if max_act is not None else ref
            if m is None:
                raise ServerError(f"feature {feature}: strength in × max, but neither the item nor the SAE gives one")
            absolute = strength * float(m)
        return absolute / ref if self.slider_unit == "max" and ref else absolute

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def label(self, n: int) -> str:
        """The atlas's explanation of feature n, or '' when there is none."""
        return self.labels([n])[int(n)]

    def labels(self, ids) -> dict[int, str]:
        """Explanations of several features; cached until the atlas file changes (`atlas explain` may add some)."""
        return {n: text for n, (text, _) in self._label_records(ids).items()}

    def distrusted(self, ids) -> set[int]:
        """The features among ids whose explanation scores at or below its shuffled control (atlas.best's one
        rule): every page that shows such a label marks it, not only the feature page."""
        return {n for n, (_, below) in self._label_records(ids).items() if below}

    @property
    def residual_cache(self):
        """The last analyzed text's residuals at every block and its attribution graph (causal.residuals), for the
        token panel: the analyzer's pass fills the blocks up to the SAE's site, the first click the rest."""
        if not hasattr(self, "_residual_cache"):
            from ..causal.residuals import ResidualCache

            self._residual_cache = ResidualCache(self.sae)
        return self._residual_cache

    def jacobian_lens(self):
        """The shipped Jacobian lens when it was fitted for this model, else None (pages offer the logit lens)."""
        if not hasattr(self, "_jlens"):
            from ..causal.lens import JacobianLens
            from ..errors import CausalError

            try:
                self._jlens = JacobianLens.load("default", self.lm)
            except CausalError:
                self._jlens = None
        return self._jlens

    def with_labels(self, rows: list[dict]) -> list[dict]:
        """Rows keyed by "feature" gain its "label" and "below_control" (whether to warn not to trust it)."""
        recs = self._label_records([r["feature"] for r in rows])
        for r in rows:
            r["label"], r["below_control"] = recs[int(r["feature"])]
        return rows

    def _label_records(self, ids) -> dict[int, tuple[str, bool]]:
        ids = [int(i) for i in ids]
        if self.atlas is None:
            return dict.fromkeys(ids, ("", False))
        stamp = self._atlas_stamp()
        with self.db_lock:
            if stamp != self._label_stamp:
                self._label_cache, self._label_stamp = {}, stamp
            for n in ids:
                if n not in self._label_cache:
                    from ..atlas.best import at_or_below_control

                    ex = self.atlas.explanation(n) or {}
                    ok = ex.get("status", "ok") == "ok"
                    self._label_cache[n] = ((ex.get("explanation") or "") if ok else "", bool(at_or_below_control(ex)))
            return {n: self._label_cache[n] for n in ids}

    def baseline_for(self, n: int) -> str:
        """The prompt-only baseline instruction for steering with feature n: "Talk about <what it is about>."

        An explanation written as a description is used whole; one written as cues (the offline method's
        `fires on "a", "b"; promotes ...`) contributes the strings it says the feature fires on (atlas.parse_cues).
        Display glyphs an explanation quotes tokens with (⏎ for a newline, ⇥, control pictures, runs of spaces)
        are prompt text no one would type: they become one space, and a cue with no letter left is dropped.
        """
        text = _plain_words(self.label(n))
        if not text:
            return ""
        if '"' in text:
            from ..atlas import parse_cues

            cues = []
            for c in parse_cues(text):
                cue = _plain_words(c.text).strip(" .,;:'\"")
                if c.main and c.literal and any(ch.isalpha() for ch in cue) and cue not in cues:
                    cues.append(cue)
            if not cues:
                return ""
            text = ", ".join(cues[:4])
        return f"Talk about {text.rstrip('.')}."

    def _atlas_stamp(self) -> tuple:
        """Modification times of the database and its write-ahead log: `atlas explain` may add explanations."""
        p = Path(self.atlas.path)
        return tuple(q.stat().st_mtime_ns if q.exists() else 0 for q in (p, p.with_name(p.name + "-wal")))


_GLYPHS = r"[\s⏎⇥␡\u2400-\u2421·]+"  # whitespace and the symbols tokens are displayed with


def _plain_words(text: str) -> str:
    """Text as a person would type it: display glyphs and whitespace runs as one space."""
    import re

    return re.sub(_GLYPHS, " ", text or "").strip()


def default_atlas_dir(sae) -> Path:
    """Where the first start builds the atlas of an SAE: the thoughtscope cache, keyed by the SAE's weights."""
    from ..atlas.build import sae_fingerprint
    from ..models import cache_dir

    return cache_dir() / "atlases" / sae_fingerprint(sae)[:16]  # (the fingerprint reads the weights on the CPU)


def load_presets(wb: Workbench, dirs=None) -> None:
    """Every preset JSON in the preset folders (see steer.presets.preset_dirs), its vector sliders and sweeps."""
    from ..steer import Preset, SteerError
    from ..steer.presets import preset_dirs

    seen = set()
    for d in dirs if dirs is not None else preset_dirs():
        d = Path(d)
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.json")):
            try:
                p = Preset.load(path)
            except (SteerError, OSError, TypeError) as e:
                if "interventions" in path.read_text(errors="replace")[:4000]:
                    wb.notes.append(f"preset {path.name} skipped: {e}")
                continue
            name = p.name or path.stem
            if name in seen:
                continue
            seen.add(name)
            wb.presets[name] = p
            _vector_sliders(wb, name, p)
            _preset_slider(wb, name, p)
            _sweep_beside(wb, path, p)


def _vector_sliders(wb: Workbench, name: str, p) -> None:
    from ..steer import Preset, SteerError

    for i, it in enumerate(p.items):
        if it.type != "vector":
            continue
        try:
            one = Preset(p.name, [replace(it, strength=1.0)], path=p.path).build(wb.lm)[0]
        except (SteerError, OSError, ValueError) as e:
            wb.notes.append(f"preset {name}, vector {it.label or i} skipped: {e}")
            continue
        s = it.strength
        default = {"add": [-2.0, 2.0], "swap": [0.0, 1.0]}.get(it.op, [-abs(s) * 4 - 1, abs(s) * 4 + 1])
        lo, hi = it.range or default
        key = f"{name}.{i}"
        wb.vectors[key] = VectorSlider(
            key, it.label or f"{name} #{i}", name, one, it.op, float(s), (float(lo), float(hi))
        )


def _preset_slider(wb: Workbench, name: str, p) -> None:
    """The whole preset as one slider: its interventions built once here (so a vector's 'norm' unit and any
    other SAE it names are resolved at start), then scaled by the slider on each request."""
    from ..sae.formats import default_sae_path
    from ..steer import SteerError

    if not p.items:
        return
    if str(wb.sae_spec).startswith("saelens:"):
        ours = str(wb.sae_spec)  # a pretrained SAE is keyed by its name (steer.presets.load_sae_cached)
    else:
        ours = str((default_sae_path() if wb.sae_spec in ("", "default") else Path(wb.sae_spec)).resolve())
    try:
        wb.preset_ivs[name] = p.build(wb.lm, sae_cache={ours: wb.sae})
    except (SteerError, OSError, ValueError) as e:
        wb.notes.append(f"preset {name} cannot be a slider: {e}")


def _sweep_beside(wb: Workbench, path: Path, p) -> None:
    """`steer sweep --out X` writes X.json beside X.preset.json: its curve goes next to that feature's slider."""
    import json

    if not path.name.endswith(".preset.json"):
        return
    sweep = path.with_name(path.name[: -len(".preset.json")] + ".json")
    if not sweep.is_file():
        return
    try:
        d = json.loads(sweep.read_text())
        pts = [(float(q["strength"]), float(q["concept_rate"]), float(q["perplexity"])) for q in d["points"]]
        base = float(d["baseline"]["perplexity"])
    except (ValueError, KeyError, TypeError):
        return
    for it in p.items:
        if it.type == "feature" and it.feature is not None and 0 <= it.feature < wb.n_features:
            try:  # the curve is drawn along the slider: strengths in its unit
                slider = [(wb.to_slider(it.feature, s, it.unit, it.max_act), r, q) for s, r, q in pts]
            except ServerError as e:
                wb.notes.append(f"sweep {sweep.name} not shown: {e}")
                continue
            wb.sweeps[int(it.feature)] = {
                "points": slider,
                "baseline_ppl": base,
                "suggested": d.get("suggested"),
                "unit": wb.slider_unit,
                "source": sweep.name,
            }


def load_workbench(
    model: str | None = None,
    sae: str = "default",
    atlas: str | None = None,
    nla: str | None = None,
    probes=(),
    *,
    status: LoadStatus | None = None,
    build_tokens: int = FIRST_START_TOKENS,
    preset_dirs=None,
    progress: bool = True,
    atlas_in_background: bool = False,
    corpus: str = "default",
    build_config=None,
    on_atlas_progress=None,
) -> Workbench:
    """Load everything `thoughtscope serve` names; build and cache a small atlas when none is given. The model is
    `model`, else the one the atlas (or else the SAE) recorded (`models.load_recorded`).

    The first-start atlas reads `build_tokens` tokens of `corpus` (or what `build_config`, an `AtlasConfig`, says)
    into `default_atlas_dir`, then gets offline explanations (see `atlas_job`). `atlas_in_background`: return as
    soon as the model, SAE, NLA, probes and presets are loaded, with `wb.atlas` None, and build in a thread
    (`wb.atlas_build` shows its progress; the atlas is attached when built). `on_atlas_progress(build)` is called
    in the building thread after every step of progress (an exception from it stops the build)."""
    from ..atlas import Atlas
    from ..atlas.build import check_sae_matches, sae_model_source
    from ..models import describe_source, load_recorded
    from ..sae import load_sae

    status = status or LoadStatus()
    status.set("loading the SAE", sae)
    sae_obj = load_sae(sae)
    recorded = _atlas_model_source(atlas) if atlas is not None else sae_model_source(sae_obj)
    status.set("loading the model", model or describe_source(recorded))
    lm = load_recorded(recorded, model)
    check_sae_matches(lm, sae_obj)
    notes = []
    if nla == "default" and lm.source.get("registered") != "default":
        nla = None
        notes.append("the shipped NLA is for the default model: no NLA view (pass --nla FOLDER for yours)")
    sae_obj = sae_obj.to(lm.device).eval().requires_grad_(False)
    first_start = None
    if atlas is None:
        first_start = _FirstStart(lm, sae_obj, sae, corpus, build_config, build_tokens, on_atlas_progress, progress)
        if not atlas_in_background:
            status.atlas = first_start.job
            status.set("building the atlas", f"into {first_start.out} (first start only; later starts reuse it)")
            first_start.run(lambda path: None)
            atlas = str(first_start.out)
            first_start = None
    if first_start is not None and (first_start.out / "atlas.sqlite").is_file():
        atlas = str(first_start.out)  # built whole by an earlier start: served at once (explanations may follow)
    at = None
    if atlas is not None:
        status.set("opening the atlas", str(atlas))
        at = Atlas.open(atlas)
        if first_start is not None and not _unexplained(at):
            first_start = None  # a later start: nothing left to build
    wb = Workbench(lm=lm, sae=sae_obj, sae_spec=sae, atlas=at)
    wb.notes.extend(notes)
    if nla:
        from ..nla import load_nla

        status.set("loading the NLA", nla)
        wb.nla = load_nla(nla, lm=lm)
    if probes:
        status.set("loading probes")
        wb.probes = load_probes(lm, probes)
    status.set("loading presets")
    load_presets(wb, preset_dirs)
    if first_start is not None:
        wb.atlas_build = first_start.job
        first_start.start(lambda path: wb.atlas is None and wb.attach_atlas(Atlas.open(path)))
    return wb


def _unexplained(at) -> set[int]:
    """Alive features of the atlas `at` that have no explanation (nor a failed attempt) yet."""
    return set(np.flatnonzero(at.stats()["n_active"] > 0).tolist()) - at.explained(None)


class _FirstStart:
    """The first-start atlas of an SAE: where it goes, what it reads, and its build (here or in a thread)."""

    def __init__(self, lm, sae_obj, sae_spec, corpus, build_config, build_tokens, on_progress, progress):
        from ..plans import AtlasConfig

        self.lm, self.sae, self.sae_spec, self.corpus_spec = lm, sae_obj, sae_spec, corpus
        self.on_progress, self.progress = on_progress, progress
        self.out = default_atlas_dir(sae_obj)
        # the atlas defaults keep enough examples for held-out scoring (top 20, 10 bins x 5); 64 random
        # contexts leave 32 unseen ones for the scorer's silent windows
        self.cfg = build_config or AtlasConfig(n_tokens=build_tokens, n_random_contexts=64)
        self.cfg.validate()  # a bad value fails now, before the server starts
        self.job = AtlasBuild(self.out, n_tokens=self.cfg.n_tokens)

    def run(self, attach, *, beside_server: bool = False) -> None:
        """Build here; `beside_server`: the workbench already serves, so the build reads through its own copy of
        the model and tokenizer (`atlas_job.private_copy`), dropped once the read is done."""
        import copy

        from .atlas_job import private_copy, run_first_start

        lm = self.lm
        run_first_start(
            (lambda: private_copy(lm)) if beside_server else (lambda: lm),
            copy.deepcopy(lm.tokenizer) if beside_server else lm.tokenizer,
            self.sae,
            self.corpus_spec,  # opened only when the atlas has to be read
            self.out,
            self.cfg,
            self.job,
            attach,
            sae_path=self.sae_spec,
            on_progress=self.on_progress,
            progress=self.progress,
        )

    def start(self, attach) -> None:
        from .atlas_job import start_in_background

        self.thread = start_in_background(lambda: self.run(attach, beside_server=True), self.job)


def _atlas_model_source(atlas: str):
    """What an atlas recorded about its model (its `model_source`, else its model's name)."""
    from ..atlas import Atlas

    with Atlas.open(atlas) as at:
        return at.meta.get("model_source") or at.meta.get("model")


def load_probes(lm, folders) -> dict:
    """Probes named at start ({folder name: probe}), each checked against the model."""
    try:
        from ..probes.probe import load_probe
    except ImportError:
        raise ServerError(
            "--probe needs thoughtscope.probes with load_probe(folder), which this installation does not have"
        ) from None
    out = {}
    for f in folders:
        name = Path(f).name or str(f)
        if name in out:
            raise ServerError(f"two --probe folders are named {name!r}: give them different folder names")
        probe = load_probe(f, lm)
        try:
            lm.check_site(probe.cfg.site)
        except ValueError as e:
            raise ServerError(f"probe {f} reads {probe.cfg.site!r}, which the analyzer cannot read: {e}") from None
        out[name] = probe
    return out
