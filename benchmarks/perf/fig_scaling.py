"""The paper's scaling figure (Figure 1 analogue) from the committed bench_scaling runs.

Reads every ``benchmarks/results/bench_scaling_*.json`` and draws, per model and
run, (left) the fast-mode ``fit`` time against the number of tracked
samples and (right) the overhead per tracked sample per parameter against the number of
parameters. Constant overhead per sample per parameter means cost linear in both. Saves
``benchmarks/results/fig_scaling.png``; the device of each run is in the legend.

Usage::

    python benchmarks/perf/fig_scaling.py
"""
from __future__ import annotations

import glob
import json
import os
import sys

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import RESULTS  # noqa: E402


def load(results_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "bench_scaling_*.json"))):
        with open(path) as f:
            d = json.load(f)
        meta = d["meta"]
        for r in d["results"]:
            if "skipped" in r:
                continue
            run = os.path.basename(path)[len("bench_scaling_"):-len(".json")]
            runs.append({**r, "device": meta["device"], "per_sample": meta["per_sample"],
                         "run": run})
    return runs


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = str(RESULTS)
    runs = load(results)
    if not runs:
        raise SystemExit(f"no bench_scaling_*.json results under {results}: run "
                         f"benchmarks/perf/bench_scaling.py first")
    # one series per (model, run): runs differ in code version, per-sample path and load
    series = {}
    for r in runs:
        key = (r["model"], r["run"], r["device"])
        pts = series.setdefault(key, {})
        n = r["n_tracked"]
        if n not in pts or r["hydra_fit_s"] < pts[n]["hydra_fit_s"]:
            pts[n] = r
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (model, run, device), pts in sorted(series.items()):
        ns = sorted(pts)
        label = f"{model} ({pts[ns[0]]['n_params']:,} params; run {run}; {device})"
        a1.plot(ns, [pts[n]["hydra_fit_s"] for n in ns], "o-", label=label)
        a2.plot([pts[n]["n_params"] for n in ns],
                [pts[n]["hydra_ns_per_sample_param"] for n in ns], "o", label=label)
    a1.set(xscale="log", yscale="log", xlabel="tracked samples (1 epoch)",
           ylabel="HYDRA fast fit (s)", title="cost vs tracked samples")
    a2.set(xscale="log", yscale="log", xlabel="parameters",
           ylabel="ns per tracked sample per parameter",
           title="cost per sample per parameter")
    a1.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(results, "fig_scaling.png")
    fig.savefig(out + ".tmp.png", dpi=110)
    os.replace(out + ".tmp.png", out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
