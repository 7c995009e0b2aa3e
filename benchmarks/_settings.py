"""Training settings named on a benchmark's command line (``NAME=VALUE``): which config holds NAME, and VALUE typed
as that field's default, so a race can train ours with one setting changed and say so in its figures."""

from __future__ import annotations

import dataclasses

from thoughtscope.sae import SAEConfig, TrainConfig

#: fields that define the run rather than a choice in it (the benchmark sets them)
FIXED = ("d_model", "n_features", "arch", "seed", "batch_size", "steps", "n_tokens", "device", "lr", "progress")


def where(name: str) -> str:
    """ "sae" or "train": the config that holds this training choice, or SystemExit naming what is wrong."""
    fields = {f.name: "sae" for f in dataclasses.fields(SAEConfig)}
    fields.update({f.name: "train" for f in dataclasses.fields(TrainConfig)})
    if name not in fields or name in FIXED:
        raise SystemExit(f"{name!r} is not a training choice of SAEConfig or TrainConfig")
    return fields[name]


def typed(name: str, values: list[str]) -> list:
    """Values as the field's default's type (bool, int, float); a name, or an int where the default is None."""
    cls = SAEConfig if where(name) == "sae" else TrainConfig
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, (bool, int, float)):
        kind = type(default)
        try:
            return [v.lower() in ("1", "true", "yes") if kind is bool else kind(v) for v in values]
        except ValueError:
            raise SystemExit(f"{name} takes {kind.__name__} values, not {', '.join(values)}") from None
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def parse(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (name, typed value)."""
    name, sep, value = text.partition("=")
    if not sep or not value.strip():
        raise SystemExit(f"{text!r}: expected NAME=VALUE, e.g. b_dec_init=zero")
    return name.strip(), typed(name.strip(), [value.strip()])[0]


def split(settings: dict) -> tuple[dict, dict]:
    """{name: value} -> (SAEConfig fields, TrainConfig fields)."""
    on = {"sae": {}, "train": {}}
    for name, value in settings.items():
        on[where(name)][name] = value
    return on["sae"], on["train"]
