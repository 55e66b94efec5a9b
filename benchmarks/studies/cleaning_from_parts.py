"""Table 4's saved HYDRA runs used as Table 3's cleaner: how far do more runs go?

Frozen study: its finding is recorded in the docs; rerun it only to check that.

Finding: averaging up to five 50-epoch HYDRA runs lifts the cleaner's precision only to
    0.985 (cleanlab 0.989 on the same wrong labels): averaging removes the errors the
    runs do not share, not the systematic plausible ones.
Recorded in: docs/results/cleaning.rst, "More runs and more epochs do not reach
    cleanlab's precision"; docs/cleaning.rst, "Averaging over training runs".
Results (benchmarks/results/): cleaning_from_parts_n50000_e50_{mnist,fashion-
    mnist}.{json,md} (reads the member files of paper/table4_ensemble_parts.py)

``table4_ensemble_parts.py --member k`` saves each member's contributions to the 1,000
references, ``C_k`` (n_train, n_reference), to the work dir. Their row means are the
score :class:`~hydrattr.cleaning.LabelNoiseCleaner` ranks by (the mean contribution to
the clean validation points; the cleaner averages all of them, these files 1,000). This
script removes the ``rate`` lowest of those scores, overall (the paper's rule) and within
each given class (``stratify=True``), for every member alone and for the mean of
members 0..K-1, and reports the precision of the removed set against the flipped mask.
No network is trained: it reads the member files only (seconds).

It also says *which* wrong labels the cleaner keeps:

* how many of each member's kept wrong labels the other members keep too (errors shared
  by every member are what averaging cannot remove);
* how concentrated the ensemble's kept wrong labels are in (true, given) class pairs: the
  share of the 10 most frequent pairs, against the share the same pairs have among all
  flipped rows (about 10/90 under uniform noise).

When ``results/table3_<--table3-tag>.json`` holds the same data, noise and seed (same
``n_train``, ``n_valid``, ``seed``; the noise is drawn by the same function), its
``cleanlab`` and ``hydra_fast`` precision at the same rate are printed beside: the same
wrong labels, scored by confident learning on 5-fold out-of-fold probabilities and by one
20-epoch HYDRA run over all 10,000 validation points.

Usage::

    python benchmarks/studies/cleaning_from_parts.py --dataset mnist --tag n50000_e50_mnist
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (RESULTS, add_run_args, add_setting_args, ensemble_part_path,  # noqa: E402
                     load_split, markdown_head, publish, run_record)

from hydrattr.cleaning import remove_lowest  # noqa: E402
from hydrattr.datasets import make_label_noise  # noqa: E402


def member_scores(args):
    """Row means of the saved member matrices, in member order (stops at the first gap)."""
    scores = []
    while ensemble_part_path(args, len(scores)).exists():
        with np.load(ensemble_part_path(args, len(scores))) as p:
            scores.append(p["C"].astype(np.float64).mean(1))
    if not scores:
        raise SystemExit(f"no member file {ensemble_part_path(args, 0).name} in --work-dir "
                         f"{args.work_dir}; run table4_ensemble_parts.py --member 0 first")
    return scores


def precision(removed, flipped):
    return float(flipped[removed].mean())


def analyse(scores, y, y_true, flipped, rate):
    rows, removed = [], [remove_lowest(s, rate) for s in scores]
    for k, s in enumerate(scores):
        rows.append({"method": f"hydra_fast_m{k}",
                     "precision_global": precision(removed[k], flipped),
                     "precision_per_class": precision(remove_lowest(s, rate, y), flipped)})
        if k == 0:
            continue  # the mean of one member is that member
        e = np.mean(scores[:k + 1], 0)
        rows.append({"method": f"hydra_fast_ens{k + 1}",
                     "precision_global": precision(remove_lowest(e, rate), flipped),
                     "precision_per_class": precision(remove_lowest(e, rate, y), flipped)})
    kept_wrong = flipped & ~np.array(removed)
    ens_kept = flipped & ~remove_lowest(np.mean(scores, 0), rate)
    pairs = collections.Counter(zip(y_true[ens_kept].tolist(), y[ens_kept].tolist()))
    every = collections.Counter(zip(y_true[flipped].tolist(), y[flipped].tolist()))
    top = pairs.most_common(10)
    errors = {
        "kept_wrong_per_member": kept_wrong.sum(1).tolist(),
        "kept_wrong_by_every_member": int(kept_wrong.all(0).sum()),
        "kept_wrong_by_any_member": int(kept_wrong.any(0).sum()),
        "kept_wrong_by_ensemble": int(ens_kept.sum()),
        "top10_pairs": [[int(a), int(b), int(c)] for (a, b), c in top],
        "top10_share_of_kept_wrong": sum(c for _, c in top) / max(int(ens_kept.sum()), 1),
        "top10_share_of_all_flipped": sum(every[p] for p, _ in top) / int(flipped.sum()),
    }
    return rows, errors


def table3_peers(args):
    """cleanlab / hydra_fast precision of a Table 3 run on the same data and noise."""
    f = RESULTS / f"table3_{args.table3_tag}.json"
    if not f.exists():
        return None
    run = json.loads(f.read_text())
    same = all(run["args"][k] == getattr(args, k) for k in ("n_train", "n_valid", "seed"))
    res = next((r for r in run["results"] if r["dataset"] == args.dataset
                and abs(r["rate"] - args.rate) < 1e-9), None)
    if not same or res is None:
        return None
    by = {r["method"]: r for r in res["rows"] if "error" not in r}
    return {"tag": args.table3_tag, "epochs": run["args"]["epochs"],
            **{m: by[m]["precision"] for m in ("cleanlab", "hydra_fast", "hydra_fast_pc")
               if m in by}}


def markdown(rows, errors, peers, args):
    settings = (f"n_train={args.n_train}, n_valid={args.n_valid}, epochs={args.epochs}, "
                f"seed={args.seed}, {args.rate:.0%} wrong labels; score = mean contribution to "
                "the members' 1,000 references; the rate's lowest scores removed.")
    lines = markdown_head(f"Cleaning precision from the Table 4 member runs ({args.dataset})",
                          settings) + [
        "| method | precision (overall) | precision (per class) |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['precision_global']:.4f} | "
              f"{r['precision_per_class']:.4f} |" for r in rows]
    if peers:
        lines += ["", f"Same data and noise in `table3_{peers['tag']}` ({peers['epochs']} "
                  "epochs, all validation points): " + ", ".join(
                      f"{m} {p:.4f}" for m, p in peers.items() if m not in ("tag", "epochs"))
                  + "."]
    e = errors
    lines += ["", "Wrong labels kept (overall rule):", "",
              f"- per member: {e['kept_wrong_per_member']}; kept by every member: "
              f"{e['kept_wrong_by_every_member']}; by at least one: "
              f"{e['kept_wrong_by_any_member']}; by the mean of all members: "
              f"{e['kept_wrong_by_ensemble']}",
              f"- the 10 most frequent (true, given) pairs hold "
              f"{e['top10_share_of_kept_wrong']:.0%} of the ensemble's kept wrong labels and "
              f"{e['top10_share_of_all_flipped']:.0%} of all flipped rows: "
              + ", ".join(f"{a}->{b} ({c})" for a, b, c in e["top10_pairs"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--rate", type=float, default=0.5)
    add_setting_args(p, "table4_paper", skip=("n_reference", "lr", "milestone"))
    p.add_argument("--table3-tag", default="n50000_e20",
                   help="Table 3 results on the same data whose peers are printed beside")
    add_run_args(p)
    args = p.parse_args(argv)
    if not 0 < args.rate < 1:
        p.error(f"--rate must be in (0, 1), got {args.rate}")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    scores = member_scores(args)
    d = load_split(args.dataset, args.data_dir, args.seed, n_train=args.n_train,
                   n_valid=args.n_valid)
    if len(scores[0]) != len(d.y_train):
        raise SystemExit(f"member files have {len(scores[0])} rows, --n-train {args.n_train}")
    y, flipped = make_label_noise(d.y_train, args.rate, n_classes=10, random_state=args.seed)
    rows, errors = analyse(scores, y, d.y_train, flipped, args.rate)
    peers = table3_peers(args)
    tag = args.tag or f"n{args.n_train}_e{args.epochs}_{args.dataset}"
    payload = run_record("cleaning_from_parts", args, rows=rows, errors=errors,
                         table3_peers=peers)
    md = markdown(rows, errors, peers, args)
    publish(f"cleaning_from_parts_{tag}", payload, md)


if __name__ == "__main__":
    main()
