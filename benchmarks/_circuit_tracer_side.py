"""circuit-tracer's side of benchmarks/graph.py, run in circuit-tracer's own environment (a separate venv), never
imported by the main one: load the model from a local Hugging Face folder with circuit-tracer's nnsight backend,
build its per-layer transcoders from the files graph.py exported, compute the attribution graph of one prompt
towards the given target tokens, and write the graph and its time.

    <venv>/bin/python benchmarks/_circuit_tracer_side.py --model-dir DIR --transcoders DIR --prompt-ids 1,2,3
        --targets 5,6 --max-feature-nodes 256 --batch-size 128 --out result.safetensors

The exported folder holds ``export.json`` (activation "topk" with k, or "jumprelu"; the number of layers) and
``layer_<i>.safetensors`` in circuit-tracer's orientation: W_enc [m, d], b_enc [m] (our input centring folded in),
W_dec [m, d], b_dec [d], optional W_skip [d_out, d_in], and threshold [m] for JumpReLU. The output file holds the
adjacency and the node lists; its metadata holds the seconds (model load, attribution) and the versions used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


class TopKReLU(nn.Module):
    """The k largest pre-activations with ReLU after, as thoughtscope's TopK transcoder (circuit-tracer's TopK keeps
    negative values among the k)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = x.topk(self.k, dim=-1)
        return torch.zeros_like(x).scatter(-1, idx, vals.relu())


def load_set(folder: Path, device: str):
    from circuit_tracer.transcoder import TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder
    from safetensors.torch import load_file

    meta = json.loads((folder / "export.json").read_text())
    layers = {}
    for i in range(int(meta["n_layers"])):
        t = load_file(str(folder / f"layer_{i}.safetensors"))
        m, d = t["W_enc"].shape
        act = TopKReLU(int(meta["k"])) if meta["activation"] == "topk" else JumpReLU(t["threshold"], 0.1)
        tc = SingleLayerTranscoder(
            d, m, act, i, skip_connection="W_skip" in t, device=torch.device(device), dtype=torch.float32
        )
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
                if name in t:
                    getattr(tc, name).copy_(t[name])
        layers[i] = tc
    return TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out", scan="bench")


def _compat() -> None:
    """circuit-tracer 0.5.0 imports HF_HUB_ENABLE_HF_TRANSFER from huggingface_hub.constants, which huggingface_hub
    1.x no longer defines (it only chooses a download method; nothing is downloaded here): give it the old default."""
    import huggingface_hub.constants as c

    if not hasattr(c, "HF_HUB_ENABLE_HF_TRANSFER"):
        c.HF_HUB_ENABLE_HF_TRANSFER = False


def model_view(folder: Path, into: Path) -> Path:
    """The model folder as the transformers 4.x that circuit-tracer 0.5.0 pins reads it: every file linked, except
    tokenizer_config.json naming PreTrainedTokenizerFast where transformers 5 wrote its TokenizersBackend (the same
    tokenizer.json either way), and config.json with transformers 5's rope_parameters also spelled as 4.x's
    rope_theta / rope_scaling (else 4.x silently uses its default base and every activation differs)."""
    into.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name == "tokenizer_config.json":
            conf = json.loads(f.read_text())
            if conf.get("tokenizer_class") == "TokenizersBackend":
                conf["tokenizer_class"] = "PreTrainedTokenizerFast"
            (into / f.name).write_text(json.dumps(conf))
        elif f.name == "config.json":
            conf = json.loads(f.read_text())
            rope = conf.get("rope_parameters")
            if isinstance(rope, dict) and "rope_theta" not in conf:
                conf["rope_theta"] = rope.get("rope_theta")
                if rope.get("rope_type", "default") != "default":
                    conf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            (into / f.name).write_text(json.dumps(conf))
        else:
            (into / f.name).symlink_to(f.resolve())
    return into


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="the model as a local Hugging Face folder")
    p.add_argument("--transcoders", required=True, type=Path, help="the folder graph.py exported")
    p.add_argument("--prompt-ids", required=True, help="the prompt's token ids, comma-separated (BOS included)")
    p.add_argument("--targets", required=True, help="target token ids, comma-separated")
    p.add_argument("--max-feature-nodes", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _compat()
    import circuit_tracer
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model import ReplacementModel
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    ts = load_set(args.transcoders, args.device)
    with tempfile.TemporaryDirectory(prefix="ct-model-") as tmp:
        view = model_view(Path(args.model_dir), Path(tmp) / "model")
        model = ReplacementModel.from_pretrained_and_transcoders(
            str(view), ts, backend="nnsight", device=torch.device(args.device), dtype=torch.float32
        )
    load_s = time.perf_counter() - t0
    ids = torch.tensor([int(s) for s in args.prompt_ids.split(",")])
    targets = torch.tensor([int(s) for s in args.targets.split(",")])
    t1 = time.perf_counter()
    graph = attribute(
        ids, model, attribution_targets=targets, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes
    )
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t1
    tensors = {  # on the CPU for the file
        "adjacency": graph.adjacency_matrix.float().contiguous().cpu(),
        "active_features": graph.active_features.long().contiguous().cpu(),
        "selected_features": graph.selected_features.long().contiguous().cpu(),
        "activation_values": graph.activation_values.float().contiguous().cpu(),
        "input_tokens": graph.input_tokens.long().contiguous().cpu(),
        "logit_tokens": graph.logit_token_ids.long().contiguous().cpu(),
        "logit_probabilities": graph.logit_probabilities.float().contiguous().cpu(),
    }
    meta = {
        "seconds": str(seconds),
        "load_seconds": str(load_s),
        "circuit_tracer": getattr(circuit_tracer, "__version__", "unknown"),
        "backend": "nnsight",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(json.dumps({"seconds": seconds, "load_seconds": load_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
