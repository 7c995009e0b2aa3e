"""Released-checkpoint interop: a tiny AV/AR pair laid out like the public NLA release (nla_meta.yaml sidecars)."""

from __future__ import annotations

import pytest
import torch
import yaml

from thoughtscope.models import tiny_model
from thoughtscope.nla import NLAError, load_nla, read_sidecar
from thoughtscope.nla.verbalizer import pick_marker

LAYER = 1
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """AV = a full tiny model folder; AR = the same model cut to LAYER+1 blocks + value_head.safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("release")
    lm = tiny_model("llama", d_model=32, n_layers=3, seed=1)
    lm.tokenizer.chat_template = CHAT
    marker, marker_id = pick_marker(lm.tokenizer)
    av_dir, ar_dir = root / "nla-tiny-L1-av", root / "nla-tiny-L1-ar"
    lm.model.save_pretrained(av_dir)
    lm.tokenizer.save_pretrained(av_dir)
    template = "Describe <concept>{injection_char}</concept> briefly."
    content = template.format(injection_char=marker)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    p = ids.index(marker_id)
    tokens = {
        "injection_char": marker,
        "injection_token_id": marker_id,
        "injection_left_neighbor_id": ids[p - 1],
        "injection_right_neighbor_id": ids[p + 1],
    }
    (av_dir / "nla_meta.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "nla_model",
                "role": "av",
                "d_model": 32,
                "extraction_layer_index": LAYER,
                "tokens": tokens,
                "extraction": {"injection_scale": 7.0, "mse_scale": "sqrt_d_model"},
                "prompt_templates": {"av": template},
            },
            allow_unicode=True,
        )
    )
    ar = tiny_model("llama", d_model=32, n_layers=3, seed=1)
    ar.model.config.num_hidden_layers = LAYER + 1
    ar.model.model.layers = ar.model.model.layers[: LAYER + 1]
    ar.model.save_pretrained(ar_dir)
    lm.tokenizer.save_pretrained(ar_dir)
    save_file({"weight": torch.eye(32)}, str(ar_dir / "value_head.safetensors"))
    (ar_dir / "nla_meta.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "nla_model",
                "role": "ar",
                "d_model": 32,
                "extraction_layer_index": LAYER,
                "tokens": tokens,
                "extraction": {"injection_scale": None, "mse_scale": 5.65},
                "prompt_templates": {"ar": "Summary of <text>{explanation}</text> <summary>"},
            }
        )
    )
    return lm, av_dir, ar_dir


def test_read_sidecar(released):
    _, av_dir, ar_dir = released
    av = read_sidecar(av_dir)
    assert av["layer"] == LAYER and av["injection_scale"] == 7.0 and "{injection_char}" in av["av_template"]
    assert read_sidecar(ar_dir)["ar_template"].endswith("<summary>")


def test_released_pair_explains_and_reconstructs(released):
    lm, av_dir, ar_dir = released
    nla = load_nla(f"{av_dir},{ar_dir}", lm=lm)
    assert nla.cfg.site == f"resid.{LAYER}" and nla.cfg.injection_scale == 7.0
    assert nla.cfg.ar_prefix == "Summary of <text>" and nla.cfg.ar_suffix == "</text> <summary>"
    vec, _, _ = nla.activations("hello there world", [-1])
    text = nla.explain(vec)
    assert isinstance(text[0], str)
    # the AR is the target cut after block LAYER with an identity head: it returns the target's own activation
    ids, att = nla.ar.encode(["abc"])
    with torch.no_grad():
        want = lm.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[LAYER + 1][0, -1]
    torch.testing.assert_close(nla.reconstruct(["abc"])[0], want)
    # the AR beside the AV is found without naming it
    assert load_nla(av_dir, lm=lm).ar is not None


def test_released_metadata_mismatch_is_an_error(released, tmp_path):
    lm, av_dir, ar_dir = released
    other = tiny_model("llama", d_model=48, n_layers=3)
    with pytest.raises(NLAError, match="d_model"):
        load_nla(f"{av_dir},{ar_dir}", lm=other)
    shallow = tiny_model("llama", d_model=32, n_layers=1)
    with pytest.raises(NLAError, match="beyond"):
        load_nla(f"{av_dir},{ar_dir}", lm=shallow)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "nla_meta.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "nla_model",
                "role": "av",
                "d_model": 32,
                "extraction_layer_index": 1,
                "tokens": {},
                "prompt_templates": {"av": "x"},
            }
        )
    )
    with pytest.raises(NLAError, match="injection_char"):
        read_sidecar(bad)
