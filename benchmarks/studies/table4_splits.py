"""Which per-class split should :class:`~hydrattr.detection.SignClusterDetector` use?

Frozen study: its finding is recorded in the docs; rerun it only to check that.

Finding: the mean split (clustering="mean") is far better than k-means on signs at 10%
    wrong labels and ties or loses at 50% on 4,000 rows, so the paper's "signs" stays the
    contribution split's default; truncating the hypergradient to the end of training
    (last_epochs) lowers the Jaccard index on every seed, so SignClusterDetector's
    contribution attributor keeps the whole run.
Recorded in: docs/results/cleaning.rst, "Sign clusters: truncating hurts";
    docs/results/paper.rst, "Table 4" ("Splitting by the mean contribution");
    docs/cleaning.rst, "Finding the mislabeled cluster of each class".
Results (benchmarks/results/): table4_splits_quick.{json,md},
    table4_splits_windows_{mnist,fashion-mnist}.{json,md}

The paper splits each class by k-means on the sign vectors (``clustering="signs"``);
``clustering="mean"`` fits a two-component Gaussian mixture to each class's mean
contribution instead. Both split the *same* fitted contributions
(``det.label_issues(clustering)``), so every fit gives one paired comparison. This
script repeats Table 4's setting at a reduced size (``--quick`` of
``table4_sign_clusters.py``: 4,000 rows, 15 epochs, 200 references, HYDRA fast) over
several seeds (data split, noise, training run, references) and noise rates, and
reports the Jaccard index (correct / random labels, averaged over classes) of both
splits: mean and standard deviation over seeds, and in how many seeds ``mean`` wins.

``--windows`` repeats each fit with the hypergradient truncated to the end of training
(``HydraAttributor(last_epochs=...)``: ``final_lr`` or a number of epochs; ``all`` is
the whole run, the paper's). Each window is a separate fit of the same seeded run
(identical training), so the windows are paired too.

Usage::

    python benchmarks/studies/table4_splits.py --seeds 0 1 2 3 4 --rates 0.1 0.3 0.5
    python benchmarks/studies/table4_splits.py --rates 0.5 --windows all final_lr 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (add_run_args, add_setting_args, evaluate_splits,  # noqa: E402
                     markdown_head, noisy_setting, run_record, save_results, start_run)

from hydrattr import HydraAttributor  # noqa: E402
from hydrattr.detection import SignClusterDetector  # noqa: E402

SPLITS = ("signs", "mean")


def last_epochs(window):
    """``--windows`` value to ``HydraAttributor(last_epochs=...)``."""
    if window == "all":
        return None
    return window if window == "final_lr" else int(window)


def run(args, dataset, rate, seed, window="all"):
    a = argparse.Namespace(**{**vars(args), "seed": seed})
    d, y, flipped, net = noisy_setting(a, dataset, rate)
    t0 = time.perf_counter()
    det = SignClusterDetector(
        HydraAttributor(net, mode="fast", storage="dense", last_epochs=last_epochs(window),
                        random_state=seed, verbose=0),
        n_reference=args.n_reference, validation_data=(d.X_valid, d.y_valid),
        clustering="signs", random_state=seed).fit(d.X_train, y)
    rows = evaluate_splits("hydra_fast", det, flipped, y, {"t": time.perf_counter() - t0}, "t")
    return {"dataset": dataset, "rate": rate, "seed": seed, "window": window,
            "window_start_step": int(det.attributor_.window_start_),
            **{s: {k: r[k] for k in ("jaccard_correct", "jaccard_random", "n_flagged",
                                     "precision", "recall")} for s, r in zip(SPLITS, rows)}}


def summarize(runs):
    table = []
    order = list(dict.fromkeys(r["window"] for r in runs))
    keys = {(r["dataset"], r["rate"], r["window"]) for r in runs}
    for key in sorted(keys, key=lambda k: (k[0], k[1], order.index(k[2]))):
        rs = [r for r in runs if (r["dataset"], r["rate"], r["window"]) == key]
        row = {"dataset": key[0], "rate": key[1], "window": key[2], "n_seeds": len(rs)}
        for s in SPLITS:
            for j in ("jaccard_correct", "jaccard_random"):
                v = 100 * np.array([r[s][j] for r in rs])
                row[f"{s}_{j}"] = (float(v.mean()), float(v.std()))
        row["mean_wins"] = int(sum(r["mean"]["jaccard_random"] > r["signs"]["jaccard_random"]
                                   for r in rs))
        table.append(row)
    return table


def markdown(table, args):
    lines = markdown_head(
        "Table 4 at reduced size: k-means on signs vs mixture on the mean",
        f"n_train={args.n_train}, n_valid={args.n_valid}, n_reference={args.n_reference}, "
        f"epochs={args.epochs}, lr={args.lr}, MNIST lr drop at epoch {args.milestone}; "
        "HYDRA fast; Jaccard (%) correct / random labels, mean ± std over seeds; "
        "'mean wins': seeds where the mean split's random-label Jaccard is higher; "
        "window: the epochs whose sample weights count (`all`: the whole run, the "
        "paper's; otherwise `HydraAttributor(last_epochs=window)`).") + [
        "| dataset | r | window | seeds | signs (paper) | mean | mean wins |",
        "|---|---|---|---|---|---|---|"]
    for r in table:
        cell = {s: f"{r[f'{s}_jaccard_correct'][0]:.2f} ± {r[f'{s}_jaccard_correct'][1]:.2f} / "
                   f"{r[f'{s}_jaccard_random'][0]:.2f} ± {r[f'{s}_jaccard_random'][1]:.2f}"
                for s in SPLITS}
        lines.append(f"| {r['dataset']} | {r['rate']:.0%} | {r['window']} | "
                     f"{r['n_seeds']} | {cell['signs']} | "
                     f"{cell['mean']} | {r['mean_wins']}/{r['n_seeds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.3, 0.5])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    add_setting_args(p, "table4_quick")
    p.add_argument("--windows", nargs="+", default=["all"], metavar="WINDOW",
                   help="'all' (the whole run), 'final_lr' or a number of last epochs: "
                        "HydraAttributor(last_epochs=...) of each fit")
    add_run_args(p, work=False)
    args = p.parse_args(argv)
    for w in args.windows:
        if not (w in ("all", "final_lr") or (w.isdigit() and int(w) >= 1)):
            p.error(f"--windows: expected 'all', 'final_lr' or a positive int, got {w!r}")
    start_run(args)
    runs, t0 = [], time.perf_counter()
    tag = args.tag or "quick"
    for dataset in args.datasets:
        for rate in args.rates:
            for seed in args.seeds:
                for window in args.windows:
                    runs.append(run(args, dataset, rate, seed, window))
                    r = runs[-1]
                    print(f"{dataset} r={rate} seed={seed} window={window}: signs "
                          f"{100 * r['signs']['jaccard_random']:.2f} mean "
                          f"{100 * r['mean']['jaccard_random']:.2f}", flush=True)
            table = summarize(runs)  # saved as it goes: a stopped run keeps its rows
            payload = run_record("table4_splits", args, t0, runs=runs, summary=table)
            save_results(f"table4_splits_{tag}", payload, markdown(table, args))
    print(markdown(summarize(runs), args))


if __name__ == "__main__":
    main()
