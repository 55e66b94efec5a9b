"""Accuracy against time of every method in the bench_peers runs (the frontier figure).

Reads benchmarks/results/bench_peers_{lr,mlp,mlp_tanh,mlp_hard}.json: linear datamodeling score
(LDS) against wall time from raw data to C, one panel per network; the grey steps are
the frontier (the best LDS reached within a time budget), the dotted lines the
published reference points of the dattri benchmark.
"""
import json
from pathlib import Path

import matplotlib.pyplot as plt

RESULTS = Path.cwd().resolve().parents[1] / "benchmarks" / "results"  # cwd: docs/pyplots
PANELS = [("lr", "logistic regression (7,850 params)"), ("mlp", "ReLU MLP (50,890 params)"),
          ("mlp_tanh", "tanh MLP (50,890 params)"),
          ("mlp_hard", "ReLU MLP, constant lr 0.05 (101,770 params)")]
STYLE = {"hydrattr": ("k", "o"), "Captum": ("tab:orange", "s"), "pyDVL": ("tab:green", "D"),
         "dattri": ("tab:purple", "^")}

fig, grid = plt.subplots(2, 2, figsize=(10, 8.6), sharey=True)
axes = grid.ravel()
for ax, (model, title) in zip(axes, PANELS):
    path = RESULTS / f"bench_peers_{model}.json"
    if not path.exists():
        ax.set_title(f"{title}\n(no committed run)")
        continue
    run = json.loads(path.read_text())
    rows = [r for r in run["models"][model]["rows"]
            if r.get("status") == "ok" and r.get("lds") is not None]
    for r in rows:
        lib = r["library"].split()[0]
        color, marker = STYLE.get(lib, ("tab:gray", "x"))
        ax.scatter(r["time_s"], r["lds"], c=color, marker=marker, s=40, zorder=3,
                   label=lib)
        ax.annotate(r["method"], (r["time_s"], r["lds"]), fontsize=7,
                    xytext=(4, 3) if lib == "hydrattr" else (4, -10),
                    textcoords="offset points")
    best, xs, ys = -1.0, [], []
    for r in sorted(rows, key=lambda r: r["time_s"]):
        if r["lds"] > best:
            best = r["lds"]
            xs.append(r["time_s"])
            ys.append(best)
    if xs:
        ax.step(xs + [xs[-1] * 3], ys + [ys[-1]], where="post", color="0.6", lw=1,
                zorder=1)
    key = f"{model}/lds"  # published points exist for the lr and the ReLU MLP task only
    for name, value in run.get("reference", {}).get(key, {}).items():
        ax.axhline(value, color="0.5", ls=":", lw=1)
        ax.text(0.01, value, f"published {name}", fontsize=7, ha="left", va="bottom",
                color="0.35", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("time from raw data to C (s, shared 2-core CPU)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
for ax in grid[:, 0]:
    ax.set_ylabel("linear datamodeling score (LDS)")
handles = {h.get_label(): h for ax in axes for h in ax.collections}
fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
           fontsize=10, title="library")
fig.tight_layout(rect=(0, 0.07, 1, 1))
