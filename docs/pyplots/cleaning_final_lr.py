"""Retrained accuracy of each cleaner's kept rows at the paper's size (Table 3 setup).

Reads the committed benchmarks/results/table3_n50000_e20_final_lr_*.json runs: for each
setting, the test accuracy (mean and sd over three retraining seeds) after removing r%
of the rows, with the precision of the removed set written above each method.
"""
import json
from pathlib import Path

import matplotlib.pyplot as plt

RESULTS = Path.cwd().resolve().parents[1] / "benchmarks" / "results"  # cwd: docs/pyplots
RUNS = [("MNIST, 80% noise", "table3_n50000_e20_final_lr_mnist_r80"),
        ("Fashion-MNIST, 80% noise", "table3_n50000_e20_final_lr_ens5_fashion-mnist_r80"),
        ("MNIST, 50% noise", "table3_n50000_e20_final_lr_ens5_mnist_r50"),
        ("Fashion-MNIST, 50% noise", "table3_n50000_e20_final_lr_ens5_fashion-mnist_r50")]
NAMES = {"no_filtering": "no filtering", "hydra_fast_final_lr_pc": "HYDRA, 1 run",
         "cleanlab": "cleanlab", "oracle": "oracle"}

fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
axes = axes.ravel()
for ax, (title, stem) in zip(axes, RUNS):
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        ax.set_title(f"{title}\n(no committed run)", fontsize=9)
        continue
    rows = json.loads(path.read_text())["results"][0]["rows"]
    shown = []
    for r in rows:
        name = NAMES.get(r["method"])
        if name is None and r["method"].startswith("hydra_fast_ens"):
            name = "HYDRA, " + r["method"].split("_")[2][3:] + "-run ens."
        if name is None or "test_accuracy_mean" not in r:
            continue
        shown.append((name, r))
    for k, (name, r) in enumerate(shown):
        mean, sd = 100 * r["test_accuracy_mean"], 100 * r["test_accuracy_std"]
        color = "k" if name.startswith("HYDRA") else "0.55"
        ax.errorbar(k, mean, yerr=sd, fmt="o", color=color, capsize=3)
        if r["precision"] == r["precision"] and r["n_removed"]:  # not NaN, not zero
            ax.annotate(f"{r['precision']:.3f}", (k, mean + sd), fontsize=7, ha="center",
                        xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(shown)), [n for n, _ in shown], rotation=35, ha="right",
                  fontsize=8)
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
for ax in axes[::2]:
    ax.set_ylabel("retrained test accuracy (%)\nmean ± sd over 3 seeds")
fig.suptitle("Numbers above the points: precision of the removed set", fontsize=9,
             y=0.99)
fig.tight_layout()
