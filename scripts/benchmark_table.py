"""The README's benchmark table, generated from the JSON of ``benchmarks/run_all.py`` (never copied by hand).

    python scripts/benchmark_table.py bench.json                  # print the markdown table
    python scripts/benchmark_table.py bench.json --readme README.md   # replace the table between the markers
    python scripts/benchmark_table.py full.json quick.json --readme README.md   # rows of several runs, in order

Rows from a ``--quick`` run say so. Benchmarks without a row recipe here get a generic row of their ``*ratio*``
figures, so a new benchmark shows up without editing this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

START, END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"


def _f(x, fmt: str = ".3g", none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def _contender(c: dict) -> str:
    t = c["test"]
    return (
        f"lr {c['lr']:.2g}: FVU {t['fvu']:.3f}, L0 {t['l0']:.1f}, {t['dead_frac']:.0%} dead, "
        f"{c['tokens_per_s']:,.0f} tok/s"
    )


def sae_rows(fig: dict, quick: bool) -> list[list[str]]:
    rows = []
    data, sz = fig["data"], fig["sizes"]
    work = (
        f"{data['kept_rows']:,} resid.15 rows kept of {data['store_tokens']:,} (position 0 and norm > 10x median "
        f"dropped); {sz['n_features']:,} latents, batch {sz['batch_size']:,} x {sz['steps']} steps "
        f"({fig['epochs']:.2f} epochs); lr = each tool's default x the grid {{lr_grid}}, chosen on validation; "
        f"FVU on {data['test_rows']:,} test rows"
    )
    tag = " --quick" if quick else ""
    if "topk" in fig:
        r = fig["topk"]
        c = r["contenders"]
        peers = "; ".join(
            f"{n} {c[n]['settings'].get('version', '')} ({_contender(c[n])})" for n in c if n != "thoughtscope"
        )
        eq = r["vs"].get("saelens", {})
        wall = eq.get("fvu_at_equal_wallclock", {})
        ratio = (
            f"**{_f(r.get('speed_ratio_vs_saelens'), '.2f')}x speed**, FVU ratio "
            f"**{_f(r.get('fvu_ratio_vs_saelens'), '.2f')}** at equal tokens, time to SAELens' FVU "
            f"**{_f(r.get('time_to_peer_fvu_ratio'), '.2f')}** (target <= 0.33); by SAELens' run time FVU "
            f"{_f(wall.get('thoughtscope'), '.3f')} vs {_f(wall.get('saelens'), '.3f')}"
            + (
                " (thoughtscope's longer run had already ended)"
                if wall.get("thoughtscope_run_ended_sooner", True) and r.get("time_to_quality_run") is not None
                else ""
            )
        )
        if "speed_ratio_vs_sparsify" in r:
            ratio += (
                f"; vs sparsify {_f(r['speed_ratio_vs_sparsify'], '.2f')}x speed, FVU ratio "
                f"{_f(r['fvu_ratio_vs_sparsify'], '.2f')}, time to its FVU "
                f"{_f(r.get('time_to_sparsify_fvu_ratio'), '.2f')}"
            )
        ratio += (
            f"; {r['ceiling_fraction']:.2f} of the matmul ceiling ({r['achieved_gflops']:.1f} of "
            f"{r['matmul_gflops']:.1f} GFLOP/s, {r['flop_per_token']['total'] / 1e6:.1f} MFLOP/token)"
        )
        rows.append(
            [
                f"`sae_train.py{tag}` topk k = {c['thoughtscope']['settings'].get('k', 32)}",
                work.replace("{lr_grid}", str(r.get("lr_multipliers"))),
                _contender(c["thoughtscope"]),
                peers,
                ratio,
            ]
        )
    if "relu_l1" in fig:
        r = fig["relu_l1"]
        c = r["contenders"]
        m = r.get("matched_l0", {})
        ratio = (
            f"**{_f(r.get('speed_ratio_vs_saelens'), '.2f')}x speed**; FVU ratio "
            f"**{_f(r.get('fvu_ratio_vs_saelens'), '.2f')}** at SAELens' L0 {_f(m.get('target_l0'), '.1f')} "
            f"({'interpolated' if m.get('bracketed') else 'nearest point, not bracketed'}); "
            f"{r['ceiling_fraction']:.2f} of the matmul ceiling"
        )
        rows.append(
            [
                f"`sae_train.py{tag}` relu-l1 (lambda {c['thoughtscope']['settings'].get('l1_coeff', 5):g})",
                work.replace("{lr_grid}", str(r.get("lr_multipliers"))),
                _contender(c["thoughtscope"]),
                "; ".join(f"{n} ({_contender(c[n])})" for n in c if n != "thoughtscope"),
                ratio,
            ]
        )
    return rows


def settings_notes(fig: dict, quick: bool) -> list[str]:
    """Each SAE contender's settings, as the benchmark recorded them."""
    out = []
    for arch in ("topk", "relu_l1"):
        for name, c in fig.get(arch, {}).get("contenders", {}).items():
            st = {k: v for k, v in c["settings"].items() if k not in ("tool",)}
            out.append(
                f"`sae_train.py{' --quick' if quick else ''}` {arch} **{name}**: "
                + "; ".join(f"{k} {v}" for k, v in st.items())
                + f"; lr chosen {c['lr']:.3g}"
            )
        skipped = fig.get(arch, {}).get("skipped") or {}
        out += [f"`sae_train.py` {arch}: {n} not run: {why}" for n, why in skipped.items()]
    return out


def generic_rows(name: str, fig: dict, quick: bool) -> list[list[str]]:
    tag = " --quick" if quick else ""
    known = {
        "harvest": ("ratio_vs_bare_forward", "harvest tok/s over a bare forward through the site (>= 0.9)"),
        "atlas": ("cost_ratio_vs_harvest", "atlas streaming cost over harvest (<= 1.3)"),
        "steer": ("overhead_ratio", "steered over plain generation tok/s (>= 0.95)"),
        "nla": ("rl_step_speedup", "x cheaper RL step, cached over plain path (>= 3)"),
    }
    ratios = {k: v for k, v in fig.items() if "ratio" in k and isinstance(v, (int, float))}
    if name in known and known[name][0] in fig:
        key, what = known[name]
        head = f"**{fig[key]:.3g}** {what}"
        rest = ", ".join(f"{k} {v:.3g}" for k, v in ratios.items() if k != key)
        if name == "nla" and "explain_seconds" in fig:
            rest += f"; nla explain {fig['explain_seconds']:.2f} s for one token (model loaded)"
        if name == "steer" and "vector_fit_speedup" in fig:
            rest += (
                f"; vector fit {fig['vector_fit_speedup']:.2f}x faster than {fig.get('vector_reference', 'ref')}"
                f" (cosine {fig.get('vector_cosine', float('nan')):.4f})"
            )
        return [[f"`{name}.py{tag}`", "see the script's docstring", "", "", head + (f"; {rest}" if rest else "")]]
    return [
        [
            f"`{name}.py{tag}`",
            "see the script's docstring",
            "",
            "",
            ", ".join(f"{k} {v:.3g}" for k, v in ratios.items()) or "figures in the JSON",
        ]
    ]


def generate_rows(fig: dict, quick: bool) -> list[list[str]]:
    """benchmarks/generate.py: batch-1 decode against llama.cpp, steering, batch 24, int8, the workbench."""
    g = lambda k, fmt=".3g": _f(fig.get(k), fmt)  # noqa: E731
    work = (
        f"default model, greedy, {fig.get('tokens')} new tokens, {fig.get('threads')} thread per side, "
        f"median of {fig.get('rounds')} alternating rounds; decode tok/s from the first token to the last"
    )
    same = "the same tokens as `generate`" if fig.get("exact_same_tokens") else "NOT the same tokens as `generate`"
    ours = f"{g('ours_tok_s', '.1f')} tok/s exact ({same}); int8 {g('ours_int8_tok_s', '.1f')} tok/s"
    peer = (
        f"llama.cpp F32 {g('llamacpp_f32_tok_s', '.1f')}, Q4_1 {g('llamacpp_q4_tok_s', '.1f')} tok/s; "
        f"transformers `generate` {g('hf_generate_tok_s', '.1f')} tok/s"
    )
    ratio = (
        f"**{g('batch1_vs_llamacpp_f32')}** of llama.cpp F32 (>= 0.8), {g('batch1_vs_llamacpp_q4')} of Q4_1; int8 "
        f"{g('batch1_int8_vs_llamacpp_f32')}x llama.cpp F32 at {g('int8_perplexity_ratio', '.4f')}x perplexity; "
        f"steered / plain **{g('steered_vs_plain')}** (>= 0.95); batch 24 / `generate` **{g('batch24_vs_generate')}** "
        f"(>= 1.5)"
        + (
            f", with bf16 weights {g('batch24_bf16_vs_generate')} ({g('batch24_bf16_vs_generate_bf16')} of `generate` "
            f"on bf16 weights) at {g('bf16_perplexity_ratio', '.4f')}x perplexity"
            if "batch24_bf16_vs_generate" in fig
            else ""
        )
        + f"; equalizer lanes {g('equalizer_speedup')}x, steer find {g('find_speedup')}x faster than before"
    )
    return [[f"`generate.py{' --quick' if quick else ''}`", work, ours, peer, ratio]]


# -- ground-truth quality (benchmarks/sae_quality.py) ---------------------------------------------------------------

QSTART, QEND = "<!-- quality-table:start -->", "<!-- quality-table:end -->"
QUALITY_GENERATORS = (
    ("synthetic", "thoughtscope's generator"),
    ("synthetic_saelens_gen", "SAELens' SyntheticModel"),
)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def quality_rows(fig: dict, quick: bool) -> list[list[str]]:
    """sae_quality's row in the benchmark table: the two acceptance figures and the best contender of each side."""
    tag = " --quick" if quick else ""
    sz = fig.get("sizes", {})
    l0 = fig.get("headline_l0", 25)
    best_o, best_s = fig.get("f1_ours_best") or {}, fig.get("f1_saelens_best") or {}
    work = (
        f"{sz.get('n_true', '?'):,} true features in {sz.get('d_model', '?')} dims (true L0 "
        f"{_f(fig.get('data', {}).get('synthetic', {}).get('true_l0'), '.1f')}), {sz.get('n_latents', '?'):,} latents, "
        f"batch {sz.get('batch_size', '?'):,} x {sz.get('steps', '?')} steps; lr from the grid "
        f"{{{sz.get('grid', '')}}} x each tool's default on validation F1; test figures at L0 {l0:g}"
    )
    return [
        [
            f"`sae_quality.py{tag}`",
            work,
            f"best F1 {_f(best_o.get('f1'), '.3f')} ({best_o.get('contender')})",
            f"SAELens best F1 {_f(best_s.get('f1'), '.3f')} ({best_s.get('contender')})",
            f"F1 ratio **{_f(fig.get('f1_ours_best_vs_saelens_best'), '.3f')}** (target >= 1"
            + (
                f"; {_f(fig['f1_ours_best_vs_saelens_best_seed_mean'], '.3f')} on the mean of the seeds run"
                if fig.get("f1_ours_best_vs_saelens_best_seed_mean") is not None
                else ""
            )
            + "; by architecture "
            + ", ".join(f"{a} {_f(v, '.2f')}" for a, v in (fig.get("f1_ratio_by_arch") or {}).items())
            + f"); Matryoshka minus BatchTopK F1 **{_f(fig.get('matryoshka_minus_batchtopk_f1'), '+.3f')}** "
            "(target > 0)",
        ]
    ]


def quality_table(fig: dict, quick: bool = False) -> str:
    """The ground-truth table: every contender of sae_quality.py's JSON at the headline L0, one row each."""
    l0 = fig.get("headline_l0", 25)
    lines = [
        "| data | contender | F1 | MCC | uniqueness | absorption | EV | L0 | dead | lr | front (L0: F1) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, said in QUALITY_GENERATORS:
        for name, r in (fig.get(key) or {}).items():
            front = ", ".join(
                f"{p['test']['l0']:.0f}: {p['test']['f1']:.3f}" for p in r.get("points", []) if "test" in p
            )
            l0_cell = f"{_f(r.get('l0'), '.1f')}" + ("" if r.get("bracketed") else " (nearest)")
            f1_cell = _f(r.get("f1"), ".3f")
            if r.get("f1_by_seed"):
                f1_cell += (
                    f" (mean of {len(r['f1_by_seed'])} seeds {_f(r.get('f1_seed_mean'), '.3f')} "
                    f"± {_f(r.get('f1_seed_sd'), '.3f')})"
                )
            lines.append(
                f"| {said} | {name} | {f1_cell} | {_f(r.get('mcc'), '.3f')} | "
                f"{_f(r.get('uniqueness'), '.3f')} | {_f(r.get('absorption'), '.3f')} | "
                f"{_f(r.get('explained_variance'), '.3f')} | {l0_cell} | {_pct(r.get('dead'))} | "
                f"{_f(r.get('lr'), '.2g')} | {front} |"
            )
    sz = fig.get("sizes", {})
    notes = [
        f"`sae_quality.py{' --quick' if quick else ''}`: figures on the test sample at L0 {l0:g}, interpolated "
        "linearly in log L0 between the two points of each contender's front that bracket it ((nearest): the "
        f"closest point); {sz.get('n_latents', '?')} latents on {sz.get('n_true', '?')} true features; F1 ratio "
        f"ours / SAELens {_f(fig.get('f1_ours_best_vs_saelens_best'), '.3f')}"
        + (
            f" (on the seed means {_f(fig['f1_ours_best_vs_saelens_best_seed_mean'], '.3f')})"
            if fig.get("f1_ours_best_vs_saelens_best_seed_mean") is not None
            else ""
        )
        + f", Matryoshka minus BatchTopK F1 {_f(fig.get('matryoshka_minus_batchtopk_f1'), '+.3f')}."
    ]
    gen = fig.get("data", {}).get("synthetic_saelens_gen")
    if gen:
        notes.append(
            f"SAELens' SyntheticModel (SynthSAEBench-16k's settings at {sz.get('n_true', '?')} features): true L0 "
            f"{_f(gen.get('true_l0'), '.1f')}, compared at L0 {_f(gen.get('headline_l0'), '.1f')} (the true L0 of its "
            f"{sz.get('n_latents', '?')} most frequent features, as SynthSAEBench compares at 25 for 4,096 latents)."
        )
    notes += [f"not run: {n}: {why}" for n, why in (fig.get("skipped") or {}).items()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def real_quality_table(real: dict) -> str:
    """The real-model quality of each SAE of sae_quality.py's ``real`` figures, one row each."""
    lines = [
        "| SAE | sparse probing AUROC: SAE (k = 1 / 2 / 5 / 20) | residual top-k / whole residual | absorption "
        "(centred) | detection AUROC (shuffled) | spliced loss (clean; recovered vs zero / mean ablation) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in real.items():
        by_k = " / ".join(_f(v, ".3f") for v in (r.get("sparse_probing_auc_by_k") or {}).values())
        resid = " / ".join(
            _f(r.get(k), ".3f") for k in ("sparse_probing_auc_residual", "sparse_probing_auc_residual_full")
        )
        lines.append(
            f"| {name} | {_f(r.get('sparse_probing_auc'), '.3f')} ({by_k}) | {resid}"
            f" | {_f(r.get('absorption'), '.3f')} ({_f(r.get('absorption_centered'), '.3f')}) | "
            f"{_f(r.get('detection_auroc'), '.3f')} ({_f(r.get('detection_auroc_shuffled'), '.3f')}) | "
            f"{_f(r.get('spliced_loss'), '.3f')} ({_f(r.get('loss_clean'), '.3f')}; "
            f"{_pct(r.get('loss_recovered'))} / {_pct(r.get('loss_recovered_vs_mean'))}) |"
        )
    return "\n".join(lines) + "\n"


def quality_text(results: list[dict]) -> str:
    """The ground-truth tables of every run holding sae_quality.py figures, in order ("" when none does)."""
    parts = []
    for result in results:
        res = result.get("benchmarks", {}).get("sae_quality") or {}
        if res.get("status") == "ok" and res.get("figures"):
            fig = res["figures"]
            real = f"\n{real_quality_table(fig['real'])}" if fig.get("real") else ""
            parts.append(quality_table(fig, bool(res.get("quick"))) + real)
    return "\n".join(parts)


def _replace_between(doc: str, start: str, end: str, text: str) -> str:
    before, rest = doc.split(start, 1)
    return before + start + "\n" + text + end + rest.split(end, 1)[1]


def table(results: list[dict]) -> str:
    lines = [
        "| benchmark | work | thoughtscope | peer / baseline | ratio (target) |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = []
    for result in results:
        for name, res in result["benchmarks"].items():
            if res.get("status") == "absent":
                continue
            if res.get("status") != "ok" or not res.get("figures"):
                lines.append(f"| `{name}.py` | | | | **{res.get('status')}** (exit {res.get('returncode')}) |")
                continue
            fig, quick = res["figures"], bool(res.get("quick"))
            if name == "sae_train":
                rows = sae_rows(fig, quick)
            elif name == "sae_quality":
                rows = quality_rows(fig, quick)
            elif name == "generate" and "ours_tok_s" in fig:
                rows = generate_rows(fig, quick)
            else:
                rows = generic_rows(name, fig, quick)
            if name == "sae_train":
                notes += settings_notes(fig, quick)
            lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        m = result.get("machine", {})
        if "started_at" not in result:
            notes.append(f"`{', '.join(result['benchmarks'])}`: {result.get('commit')}.")
            continue
        notes.append(
            f"`{', '.join(result['benchmarks'])}`: measured by `benchmarks/run_all.py` at commit "
            f"{str(result.get('commit'))[:10]} on {m.get('cpus')} CPU cores (torch {m.get('torch')}), load "
            f"average at start {', '.join(f'{x:.1f}' for x in (m.get('load_average_at_start') or []))}, "
            f"started {result.get('started_at')}."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _as_run(obj: dict, path: Path) -> dict:
    """A run_all JSON as is; a bare ``sae_train.py --json`` output wrapped as a one-benchmark run."""
    if "benchmarks" in obj:
        return obj
    if "sizes" in obj and "data" in obj:
        return {
            "benchmarks": {"sae_train": {"status": "ok", "quick": obj.get("quick"), "figures": obj}},
            "commit": f"(standalone sae_train.py run, {path.name})",
            "machine": {"cpus": obj.get("machine", {}).get("cpus")},
        }
    raise SystemExit(f"{path}: neither a benchmarks/run_all.py JSON nor a sae_train.py JSON")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "json",
        nargs="+",
        help="output(s) of benchmarks/run_all.py, or NAME=PATH for one benchmark's own --json output; "
        "rows in this order",
    )
    p.add_argument("--readme", type=Path, help=f"replace the text between {START} and {END} in this file")
    p.add_argument(
        "--quality-only",
        action="store_true",
        help=f"with --readme: replace only the ground-truth tables (between {QSTART} and {QEND})",
    )
    args = p.parse_args(argv)
    runs = []
    for spec in args.json:
        name, sep, path = spec.partition("=")
        if sep and not Path(spec).is_file():  # NAME=PATH: one benchmark's own --json output
            fig = json.loads(Path(path).read_text())
            runs.append(
                {
                    "benchmarks": {name: {"status": "ok", "quick": fig.get("quick"), "figures": fig}},
                    "commit": f"(standalone {name}.py --json run, {Path(path).name})",
                }
            )
        else:
            runs.append(_as_run(json.loads(Path(spec).read_text()), Path(spec)))
    text = table(runs)
    quality = quality_text(runs)
    if not args.readme:
        print(text + (f"\n{quality}" if quality else ""))
        return 0
    doc = args.readme.read_text()
    if args.quality_only:
        if not quality or QSTART not in doc or QEND not in doc:
            print(f"{args.readme}: no {QSTART} ... {QEND} markers, or no sae_quality figures given", file=sys.stderr)
            return 2
        return _write(args.readme, _replace_between(doc, QSTART, QEND, quality))
    if START not in doc or END not in doc:
        print(f"{args.readme} has no {START} ... {END} markers", file=sys.stderr)
        return 2
    doc = _replace_between(doc, START, END, text)
    if quality and QSTART in doc and QEND in doc:  # the ground-truth table, where the README has its markers
        doc = _replace_between(doc, QSTART, QEND, quality)
    return _write(args.readme, doc)


def _write(path: Path, doc: str) -> int:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(doc)
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
