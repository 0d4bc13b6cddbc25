"""Time `moescope stats` + `moescope report` on a synthetic profile of a large model.

Default: 60 layers x 512 experts, top-10, 150 prompts, 8 domains (the issue's target: under 2 s).
The profile is made of skewed random routing (Dirichlet expert popularity, a per-domain tilt, a few
dead experts) that satisfies every counter invariant, per-prompt selection counts included (so the
bootstrap intervals of entropy ratio, Gini and top-n share are timed too). Building it is not timed; analysis, the stats
tables and the HTML report are.

    .venv/bin/python benchmarks/stats_speed.py [--layers 60 --experts 512 --top-k 10 --prompts 150]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moescope.profiling.store import FIXED_SCALE, HIST_BINS, HIST_EDGES, Profile

TARGET_S = 2.0


def synthetic_profile(layers: int = 60, experts: int = 512, top_k: int = 10, prompts: int = 150, domains: int = 8,
                      langs: int = 3, coactivation: bool = False, seed: int = 0) -> Profile:
    """A consistent profile of random skewed routing (prefill only)."""
    rng = np.random.default_rng(seed)
    layer_list = [{"layer": i, "num_experts": experts, "top_k": top_k, "router_family": "softmax_topk"}
                  for i in range(layers)]
    profile = Profile.empty({"model_type": "synthetic", "config_hash": "0" * 16}, layer_list, {},
                            [f"domain{d}" for d in range(domains)], [f"l{g}" for g in range(langs)],
                            coactivation=coactivation, prompt_counts=True)
    popularity = rng.dirichlet(np.full(experts, 0.5), size=layers)
    popularity[rng.random((layers, experts)) < 0.01] = 0  # a few dead experts
    tilt = rng.lognormal(0, 0.7, size=(domains, layers, experts))
    c = profile.counters
    c["prompt_tokens"] = np.zeros((prompts, 2), np.int64)
    presence = np.zeros((prompts, 2, layers, experts), bool)
    c["prompt_counts"] = np.zeros((prompts, layers, experts), np.uint32)
    for i in range(prompts):
        d, g, tokens = i % domains, i % langs, int(rng.integers(50, 400))
        p = popularity * tilt[d]
        p /= p.sum(1, keepdims=True)
        counts = np.stack([rng.multinomial(tokens * top_k, row) for row in p])
        c["selections"][0, d] += counts
        c["lang_selections"][0, g] += counts
        c["tokens"][0, d] += tokens
        c["lang_tokens"][0, g] += tokens
        c["prompt_tokens"][i, 0] = tokens
        presence[i, 0] = counts > 0
        c["prompt_counts"][i] = counts
        profile.prompts.append({"id": f"p{i}", "domain": profile.domains[d], "lang": profile.langs[g],
                                "hash": f"{i:016x}", "truncated": False})
    c["presence"] = np.packbits(presence, axis=-1, bitorder="little")
    chosen = c["selections"][0].sum(0)  # [L, E]
    centre = np.searchsorted(HIST_EDGES, 1 / top_k)
    bins = np.clip(centre + rng.normal(0, 3, size=(layers, experts, 64)).round().astype(int), 0, HIST_BINS - 1)
    hist = c["weight_hist"][0].reshape(-1, HIST_BINS)  # a view
    for b in range(64):  # spread each expert's selections over 64 bins drawn around 1/k
        share = chosen.ravel() // 64 + (b < chosen.ravel() % 64)
        np.add.at(hist, (np.arange(layers * experts), bins[..., b].ravel()), share)
    mids = np.concatenate([[HIST_EDGES[0] / 2], np.sqrt(HIST_EDGES[:-1] * HIST_EDGES[1:]), [HIST_EDGES[-1]]])
    c["weight_sum"][0] = np.round((c["weight_hist"][0] * mids).sum(-1) * FIXED_SCALE).astype(np.int64)
    c["weight_sq"][0] = np.round((c["weight_hist"][0] * mids**2).sum(-1) * FIXED_SCALE).astype(np.int64)
    c["entropy_sum"][0] = round(c["tokens"].sum() * 0.8 * np.log(top_k) * FIXED_SCALE)
    if coactivation:  # independent pairs: diagonal = selections
        share = chosen / chosen.sum(1, keepdims=True)
        pairs = c["tokens"].sum() * top_k * (top_k - 1) * share[:, :, None] * share[:, None, :]
        c["coactivation"][0] = np.round(pairs).astype(np.int64)
        c["coactivation"][0][:, np.arange(experts), np.arange(experts)] = chosen
    profile.check()
    return profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--experts", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--coactivation", action="store_true", help="also record (and time) co-activation")
    args = parser.parse_args()

    from rich.console import Console

    from moescope.analysis.analyse import analyse
    from moescope.report.page import write_report
    from moescope.report.text import print_tables

    profile = synthetic_profile(args.layers, args.experts, args.top_k, args.prompts, args.domains,
                                coactivation=args.coactivation)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        analysis = analyse(profile)
        analysed = time.perf_counter()
        print_tables(analysis, Console(file=io.StringIO(), width=200))
        printed = time.perf_counter()
        out = Path(tmp) / "report.html"
        write_report(profile, analysis, out)
        done = time.perf_counter()
        size = out.stat().st_size
    total = done - start
    print(f"{args.layers} layers x {args.experts} experts, top-{args.top_k}, {args.prompts} prompts, "
          f"{args.domains} domains{', co-activation' if args.coactivation else ''}")
    print(f"analyse {analysed - start:.2f} s, stats tables {printed - analysed:.2f} s, "
          f"report {done - printed:.2f} s ({size / 1e6:.1f} MB)")
    print(f"total {total:.2f} s = {total / TARGET_S:.2f} x the {TARGET_S:.0f} s target")
    return 0 if total < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
