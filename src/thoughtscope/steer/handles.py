"""Candidate handles for a concept: the concept itself, and the feature / vector handles built for it.

A concept is keywords (how its presence in an answer is measured) plus texts with and without it. Handles
come from both sides of the SAE (input contrast, output effect; see `thoughtscope.features`), from CAA
vectors at a few sites, and from the concept tokens' own output direction added late in the model (the
vector-level counterpart of "output effect": it needs no SAE and no texts); `steer.find` screens and
calibrates them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..features import (
    FeatureError,
    concept_token_ids,
    contrast_features,
    feature_max,
    feature_max_acts,
    norm_scale,
    output_features,
)
from ..models import LoadedModel, Site, capture
from .calibrate import mentions
from .interventions import SteerError, add_vector, clamp

CONTROL_TEXTS = [
    "The meeting has been moved to Tuesday afternoon.",
    "She bought a new laptop for her studies.",
    "Add the flour and stir until the batter is smooth.",
    "The train to the city leaves at nine o'clock.",
    "He fixed the broken chair in the garage.",
    "The report covers last year's sales figures.",
    "Please remember to water the plants on Friday.",
    "The students finished their homework before dinner.",
    "Our neighbours painted their fence white.",
    "The library closes early on public holidays.",
    "I need to renew my passport next month.",
    "The committee approved the new budget.",
]
PROMPT_TEMPLATES = [
    "Let me tell you about {kw}.",
    "Everyone was talking about the {kw}.",
    "This is a story about {kw}.",
    "I have always loved {kw}.",
]


@dataclass
class Concept:
    """What to steer towards: keywords (also the concept-rate test), texts with it and texts without."""

    name: str
    keywords: list[str]
    prompts: list[str] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)
    match: str = "word"  # "word": whole words, case-insensitive; "substring": anywhere (no word breaks)
    evoke: list[str] = field(default_factory=list)  # questions that normally make the model mention it

    def __post_init__(self) -> None:
        if self.match not in ("word", "substring"):
            raise SteerError(f"concept {self.name!r}: match must be 'word' or 'substring', got {self.match!r}")
        self.keywords = [k.strip() for k in self.keywords if k and k.strip()]
        if not self.keywords:
            raise SteerError(f"concept {self.name!r}: give keywords (they are how the concept rate is measured)")
        if not self.prompts:
            kws, T = self.keywords[:12], PROMPT_TEMPLATES
            texts = [T[(i + j) % len(T)].format(kw=k) for j in range(len(T)) for i, k in enumerate(kws)]
            self.prompts = list(dict.fromkeys(texts))[: max(8, len(kws))]
        if not self.controls:
            self.controls = list(CONTROL_TEXTS)

    @classmethod
    def load(cls, path: str | Path) -> Concept:
        """A JSON file {"name", "keywords", "prompts"?, "controls"?, "match"?}."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SteerError(f"{path}: not a readable concept JSON file ({e})") from None
        unknown = set(d) - {"name", "keywords", "prompts", "controls", "match", "evoke"}
        if unknown or "keywords" not in d:
            raise SteerError(f"{path}: expected keys name, keywords, prompts, controls, match, evoke; got {sorted(d)}")
        return cls(
            str(d.get("name", path.stem)),
            list(d["keywords"]),
            list(d.get("prompts", [])),
            list(d.get("controls", [])),
            str(d.get("match", "word")),
            list(d.get("evoke", [])),
        )

    @classmethod
    def from_spec(
        cls,
        spec: str,
        keywords: Sequence[str] = (),
        prompts: str | Path | None = None,
        controls: str | Path | None = None,
    ) -> Concept:
        """A concept as the command line names it: a concept JSON file (see `load`) or just a name. `keywords`
        replace the file's (a name alone is its own keyword); `prompts` / `controls` are prompt files
        (`documents.read_prompts`: a .json list, .jsonl or one text per line) replacing the texts."""
        from dataclasses import replace

        from ..documents import read_prompts

        if Path(spec).suffix == ".json" and Path(spec).is_file():
            c = cls.load(spec)
            c = replace(c, keywords=list(keywords)) if keywords else c
        else:
            c = cls(spec, list(keywords) or [spec])
        if prompts:
            c.prompts = read_prompts(prompts)
        if controls:
            c.controls = read_prompts(controls)
        return c

    def mentioned(self, text: str) -> bool:
        if self.match == "word":
            return mentions(text, self.keywords)
        t = text.lower()
        return any(k.lower() in t for k in self.keywords)


@dataclass
class Handle:
    """One way to steer: an SAE feature clamp (strength in × the reference max) or a vector added at a
    site (strength in multiples of the site's median residual norm): CAA, or the concept tokens' logit
    direction; or a "pair" of two handles pushed together (strength t applies each part at t x its own
    reference strength)."""

    kind: str  # "feature" | "caa" | "logit" | "pair"
    id: str
    site: str
    grid: list[float]
    feature: int | None = None
    max_act: float | None = None  # the feature's reference max
    max_source: str = ""
    direction: torch.Tensor | None = field(default=None, repr=False)
    typical_norm: float | None = None
    found_by: dict = field(default_factory=dict)
    parts: list[tuple[Handle, float]] = field(default_factory=list, repr=False)  # "pair": (handle, its strength)

    def interventions(self, sae, strength: float, positions: str) -> list:
        if self.kind == "pair":
            return [iv for h, ref in self.parts for iv in h.interventions(sae, strength * ref, positions)]
        if self.kind == "feature":
            return [
                clamp(
                    sae, self.feature, strength, unit="max", max_act=self.max_act, positions=positions, site=self.site
                )
            ]
        return [add_vector(self.direction * self.typical_norm, self.site, strength, positions=positions)]

    def describe(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("direction", "parts")}
        if self.parts:
            d["parts"] = [{"id": h.id, "reference_strength": ref} for h, ref in self.parts]
        return d


def pair(a: Handle, a_strength: float, b: Handle, b_strength: float, grid: Sequence[float]) -> Handle:
    """Two handles pushed together, each at a share of the strength it reached alone: a CAA vector carries
    the topic and the logit direction the words, so together each needs less of the push that breaks text."""
    return Handle(
        "pair",
        f"{a.id}+{b.id}",
        f"{a.site}+{b.site}",
        list(grid),
        found_by={"pair": {a.id: a_strength, b.id: b_strength}},
        parts=[(a, float(a_strength)), (b, float(b_strength))],
    )


@torch.no_grad()
def _token_mean(lm: LoadedModel, site: Site, texts: Sequence[str]) -> tuple[torch.Tensor, float]:
    """Mean activation over the texts' ordinary tokens (sink, pads and >10x median-norm tokens excluded)
    and their median norm."""
    ids, mask = lm.tokenize(list(texts))
    h = capture(lm, site, ids, mask)[site].float().cpu()
    keep = mask.bool().clone().cpu()
    keep[:, 0] = False
    x = h[keep]
    n = x.norm(dim=-1)
    x = x[n <= 10 * n.median()]
    return x.mean(0), float(n.median())


def caa_sites(lm: LoadedModel, sae) -> list[str]:
    """The SAE's site plus residual sites at about 1/3 and 2/3 of the depth (distinct, in order)."""
    L = lm.n_layers
    out = [str(Site.parse(sae.cfg.site))] if sae is not None else []
    for layer in (round(L / 3), round(2 * L / 3)):
        s = str(Site(min(max(layer, 0), L - 1)))
        if s not in out:
            out.append(s)
    return sorted(out, key=lambda s: Site.parse(s).layer)


def logit_sites(lm: LoadedModel) -> list[str]:
    """Where the logit direction is added: about 5/6 of the depth. Later, the last blocks have no room to
    fold it into fluent text (at the final layer it only adds stray tokens); earlier, it is rewritten
    before it reaches the output (measured on the default model, docs/steering.md)."""
    return [str(Site(min(max(round(5 * lm.n_layers / 6), 0), lm.n_layers - 1)))]


@torch.no_grad()
def logit_direction(lm: LoadedModel, token_ids: Sequence[int]) -> torch.Tensor:
    """The residual direction that raises the tokens' logits: the mean of their unembedding rows minus
    the vocabulary's mean row, scaled elementwise by the final norm's weight (the path a residual
    direction takes to the logits), unit length."""
    U = lm.unembed.weight.detach().float().cpu()
    v = U[torch.as_tensor(list(token_ids), dtype=torch.long)].mean(0) - U.mean(0)
    g = norm_scale(lm.final_norm)
    if g is not None:
        v = v * g.cpu()
    return v / v.norm()


def build_handles(lm: LoadedModel, sae, concept: Concept, config) -> list[Handle]:
    """Feature handles (top by input contrast and by output effect), CAA handles at several sites and
    the concept tokens' logit direction at a late site.

    `config` is a `steer.find.FindConfig` (n_features, feature_grid, vector_grid, caa_sites, logit_sites).
    """
    handles: list[Handle] = []
    toks = concept_token_ids(lm.tokenizer, concept.keywords)  # what the output-side rankings aim at
    if sae is not None and config.n_features:
        ref = feature_max(sae)
        site = str(Site.parse(sae.cfg.site))
        try:
            by_input = contrast_features(lm, sae, site, concept.prompts, concept.controls, top=config.n_features)
        except FeatureError as e:
            raise SteerError(str(e)) from None
        by_output = output_features(lm, sae, toks, top=config.n_features) if toks else []
        local = None
        found: dict[int, dict] = {}
        for rank, s in enumerate(by_input):
            found.setdefault(s.feature, {})["input_contrast"] = {"rank": rank + 1, "z": round(s.score, 4)}
        for rank, s in enumerate(by_output):
            found.setdefault(s.feature, {})["output_effect"] = {"rank": rank + 1, "z": round(s.score, 4)}
        for f, why in found.items():
            if ref is not None:
                m, src = float(ref.values[f]), ref.source
            else:  # no stored reference: measure on the concept's texts and say so
                if local is None:
                    local = feature_max_acts(lm, sae, site, concept.prompts + concept.controls)
                m, src = float(local[f]), "these concept and control texts only (no stored max)"
            if not m > 0:
                m, src = 1.0, "never fired on the reference texts; strength in raw activation units"
            handles.append(
                Handle(
                    "feature",
                    f"feature:{f}",
                    site,
                    list(config.feature_grid),
                    feature=f,
                    max_act=m,
                    max_source=src,
                    found_by=why,
                )
            )
    for site in config.caa_sites if config.caa_sites is not None else caa_sites(lm, sae):
        s = lm.check_site(site)
        mp, _ = _token_mean(lm, s, concept.prompts)
        mc, typical = _token_mean(lm, s, concept.controls)
        v = mp - mc
        if float(v.norm()) == 0:
            continue
        why = {"caa": {"norm_of_difference": round(float(v.norm()), 4)}}
        handles.append(
            Handle(
                "caa",
                f"caa:{s}",
                str(s),
                list(config.vector_grid),
                direction=v / v.norm(),
                typical_norm=typical,
                found_by=why,
            )
        )
    sites = config.logit_sites if config.logit_sites is not None else logit_sites(lm)
    for site in sites if toks else ():
        s = lm.check_site(site)
        _, typical = _token_mean(lm, s, concept.controls)
        why = {"logit": {"tokens": [lm.tokenizer.decode([t]) for t in toks]}}
        handles.append(
            Handle(
                "logit",
                f"logit:{s}",
                str(s),
                list(config.vector_grid),
                direction=logit_direction(lm, toks),
                typical_norm=typical,
                found_by=why,
            )
        )
    return handles


# ----------------------------------------------------------------------------- search
