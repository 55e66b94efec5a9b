"""Table 4 (sign clusters): the paper's figures, one result row per fitted detector, the
markdown table, and the per-member files of the ensemble row computed in pieces."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .results import markdown_head

TABLE4_PAPER = {  # Jaccard (%) correct labels / random labels
    "mnist": {"hydra": (97.13, 97.16), "if": (71.89, 67.19)},
    "fashion-mnist": {"hydra": (78.06, 77.73), "if": (41.26, 33.22)},
}


def class_jaccard(flagged, flipped, y):
    """Per-class Jaccard of (not flagged vs correct) and (flagged vs flipped)."""
    from hydrattr.metrics import jaccard_index

    out = []
    for c in np.unique(y):
        m = y == c
        out.append((jaccard_index(~flagged[m], ~flipped[m]), jaccard_index(flagged[m], flipped[m])))
    return np.asarray(out)


def evaluate(name, det, flipped, y, timings, key, clustering=None):
    """One result row for the fitted detector ``det``; ``clustering`` re-splits its
    contributions another way (``det.label_issues(clustering)``, no new attribution)."""
    flagged = det.label_issues(clustering)
    J = class_jaccard(flagged, flipped, y)
    tp = int((flagged & flipped).sum())
    row = {"method": name, "jaccard_correct": float(J[:, 0].mean()),
           "jaccard_random": float(J[:, 1].mean()),
           "jaccard_per_class": J.tolist(), "n_flagged": int(flagged.sum()),
           "precision": tp / max(int(flagged.sum()), 1),
           "recall": tp / max(int(flipped.sum()), 1), "seconds": timings[key]}
    print(f"  {name:10s} Jaccard correct={row['jaccard_correct']:.4f} "
          f"random={row['jaccard_random']:.4f} flagged={row['n_flagged']} "
          f"P={row['precision']:.3f} R={row['recall']:.3f} ({row['seconds']:.0f} s)",
          flush=True)
    return row


def evaluate_splits(name, det, flipped, y, timings, key):
    """Rows ``name`` (the paper's k-means on signs) and ``name + "_mean"`` (the
    two-component mixture on the mean contribution) from one fitted detector."""
    return [evaluate(name, det, flipped, y, timings, key),
            evaluate(name + "_mean", det, flipped, y, timings, key, clustering="mean")]


def table4_markdown(results, args):
    """The Table 4 markdown of ``results`` (one entry per dataset, rows from
    :func:`evaluate`), headed by the run's settings."""
    settings = (f"n_train={args.n_train}, n_valid={args.n_valid} (clean; references drawn from "
                f"it), n_reference={args.n_reference}, epochs={args.epochs}, "
                f"lr={args.lr}, MNIST lr drop at epoch {args.milestone}, "
                f"rate={args.rate:.0%}, seed={args.seed}. Paper: 50000/10000, 1000 references, "
                f"50 epochs, lr 0.01.")
    lines = markdown_head("Table 4: sign-cluster detection of wrong labels (LeNet-5)", settings) + [
        "| dataset | method | Jaccard correct (%) | Jaccard random (%) | paper (%) | "
        "flagged | precision | recall | seconds |",
        "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for row in res["rows"]:
            m = row["method"]
            if "error" in row:
                lines.append(f"| {res['dataset']} | {m} | error: {row['error'][:80]} | | | | | | |")
                continue
            pp = (res.get("paper") or {}).get("hydra" if m.startswith("hydra") else
                                              "if" if m.startswith("if") else m)
            pp = f"{pp[0]} / {pp[1]}" if pp else ""
            lines.append(f"| {res['dataset']} | {m} | {100 * row['jaccard_correct']:.2f} | "
                         f"{100 * row['jaccard_random']:.2f} | {pp} | {row['n_flagged']} | "
                         f"{row['precision']:.3f} | {row['recall']:.3f} | "
                         f"{row['seconds']:.0f} |")
    lines += ["", "Rows ending in `_mean` split the same contributions with "
              "`clustering=\"mean\"` (a two-component Gaussian mixture on each class's mean "
              "contribution) instead of the paper's k-means on signs; no new attribution."]
    return "\n".join(lines) + "\n"


def member_seed(seed, k):
    """Seed of member ``k`` of ``EnsembleAttributor(random_state=seed)``."""
    from sklearn.utils import check_random_state

    return int(check_random_state(seed).randint(np.iinfo(np.int32).max, size=k + 1)[k])


def ensemble_part_path(args, k):
    """Where ``paper/table4_ensemble_parts.py --member k`` saves member ``k``'s
    contributions (read by its ``--combine`` and by ``studies/cleaning_from_parts.py``)."""
    return Path(args.work_dir) / (f"table4_ens_{args.dataset}_n{args.n_train}_e{args.epochs}"
                                  f"_s{args.seed}_m{k}.npz")
