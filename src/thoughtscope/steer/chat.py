"""`thoughtscope chat`: a terminal chat whose sliders can be changed between turns.

Commands: /set <feature> <strength> (clamp a feature of the session's SAE; "off" removes it; a strength ending
in "x", e.g. 8x, means × the feature's max stored with the SAE, the reference the library, the CLI and the web
use; an SAE that stores none falls back to the max a loaded preset or `max_acts` gives),
/preset <name-or-path>, /off (all sliders off), /show, /clear (forget the conversation), /quit.
Input and output are callables so the loop can be driven by tests or a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..features import feature_max
from ..models import LoadedModel
from .generate import GenerationConfig, generate
from .interventions import FeatureEdit, SteerError
from .presets import Preset

HELP = (
    "commands: /set <feature> <strength|Nx|off>, /preset <name-or-path>, /off, /show, /clear, /quit; "
    "anything else is a message"
)


@dataclass
class ChatSession:
    lm: LoadedModel
    sae: object | None = None
    site: str | None = None
    preset: Preset | None = None
    config: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=96))
    sliders: dict[int, float] = field(default_factory=dict)
    max_acts: dict[int, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def interventions(self) -> list:
        ivs = self.preset.build(self.lm, sae_cache=self._cache) if self.preset else []
        for f, v in self.sliders.items():
            ivs.append(FeatureEdit(self.sae, f, "clamp", v, site=self.site, label=f"/set {f}"))
        return ivs

    def max_of(self, feature: int) -> float:
        """The "× max" reference of a feature: the max stored with the SAE; else what a preset or `max_acts` says."""
        ref = feature_max(self.sae)
        if ref is not None:
            return float(ref.values[feature])
        if feature in self.max_acts:
            return self.max_acts[feature]
        raise SteerError(
            f"max activation of feature {feature} unknown: the SAE stores no maxima (run 'thoughtscope features "
            f"stats' on it) and no loaded preset gives one; give a raw strength"
        )

    def show(self) -> str:
        lines = []
        if self.preset:
            lines.append(f"preset {self.preset.name!r}:")
            for it in self.preset.items:
                what = f"feature {it.feature}" if it.type == "feature" else "vector"
                lines.append(f"  {it.label or what}: {it.op} {it.strength:g} ({it.unit}) at {it.site}, {it.positions}")
        for f, v in self.sliders.items():
            lines.append(f"  feature {f}: clamp {v:g} at {self.site}")
        return "\n".join(lines) if lines else "no steering (all sliders off)"

    def command(self, line: str) -> str | None:
        """Run one slash command; returns the text to show, or None for /quit."""
        parts = line.strip().split()
        cmd, args = parts[0].lower(), parts[1:]
        if cmd in ("/quit", "/exit"):
            return None
        if cmd == "/off":
            self.sliders.clear()
            self.preset = None
            return "steering off"
        if cmd == "/show":
            return self.show()
        if cmd == "/clear":
            self.history.clear()
            return "conversation cleared"
        if cmd == "/preset":
            if len(args) != 1:
                raise SteerError("usage: /preset <name-or-path>")
            p = Preset.load(args[0])
            p.build(self.lm, sae_cache=self._cache)  # check it fully now, not at the next message
            self.preset = p
            for it in p.items:
                if it.type == "feature" and it.max_act:
                    self.max_acts[it.feature] = it.max_act
            return f"preset {p.name!r} loaded ({len(p.items)} interventions)"
        if cmd == "/set":
            if len(args) != 2:
                raise SteerError(
                    "usage: /set <feature> <strength>   (strength: a number, Nx for N × max activation, or off)"
                )
            if self.sae is None:
                raise SteerError("no SAE in this session: start chat with an SAE (or use /preset)")
            try:
                feat = int(args[0])
            except ValueError:
                raise SteerError(f"feature must be an integer index, got {args[0]!r}") from None
            if args[1].lower() == "off":
                self.sliders.pop(feat, None)
                return f"feature {feat} off"
            raw = args[1].lower()
            try:
                val = float(raw[:-1] if raw.endswith("x") else raw)
            except ValueError:
                raise SteerError(f"strength must be a number, Nx or off, got {args[1]!r}") from None
            FeatureEdit(self.sae, feat, "clamp", val, site=self.site)  # validates index and strength
            if raw.endswith("x"):
                val *= self.max_of(feat)
            self.sliders[feat] = val
            return f"feature {feat} clamped to {val:g}"
        raise SteerError(f"unknown command {cmd!r}; {HELP}")

    def reply(self, message: str, stream_fn: Callable[[str], None] | None = None) -> str:
        self.history.append({"role": "user", "content": message})
        cb = (lambda ev: stream_fn(ev.text)) if stream_fn else None
        try:
            g = generate(self.lm, [list(self.history)], self.interventions(), self.config, on_token=cb)[0]
        except Exception:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": g.text})
        return g.text


def chat_loop(
    lm: LoadedModel,
    *,
    sae=None,
    site: str | None = None,
    preset: Preset | str | None = None,
    config: GenerationConfig | None = None,
    input_fn: Callable[[str], str] = input,
    output_fn: Callable[[str], None] = print,
    stream_fn: Callable[[str], None] | None = None,
    max_acts: dict[int, float] | None = None,
) -> ChatSession:
    """Run the chat until /quit or end of input; returns the session (history, sliders) for inspection."""
    if sae is not None and site is None:
        site = getattr(sae.cfg, "site", "") or None
        if site is None:
            raise SteerError("the SAE's config names no site: pass site=")
    s = ChatSession(lm, sae, site, config=config or GenerationConfig(max_new_tokens=96), max_acts=dict(max_acts or {}))
    if preset is not None:
        output_fn(s.command(f"/preset {preset}") if isinstance(preset, str) else "")
        if not isinstance(preset, str):
            s.preset = preset
    output_fn(HELP)
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/"):
                msg = s.command(line)
                if msg is None:
                    break
                output_fn(msg)
            else:
                text = s.reply(line, stream_fn)
                output_fn("" if stream_fn else text)
        except SteerError as e:
            output_fn(f"error: {e}")
    return s
