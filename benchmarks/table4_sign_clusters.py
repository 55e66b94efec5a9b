"""Table 4 of Chen et al. (AAAI 2021): unsupervised detection of wrong labels by sign clusters.

50% of the training labels are replaced by a uniformly drawn wrong class; LeNet-5 is
trained with the paper's schedule (50 epochs); every training sample's contributions to
``n_reference`` (1,000) randomly drawn validation points are reduced to signs and, per
class, k-means splits the sign vectors in two (:class:`~hydrattr.detection.SignClusterDetector`).
Every row has a ``_mean`` twin: the same fitted contributions split with
``clustering="mean"`` (a two-component Gaussian mixture on each class's mean contribution).
Reported: the Jaccard index between the detected groups and the true partition
(correct labels / random labels), averaged over the 10 classes, for HYDRA (fast) and
influence functions (LiSSA, the paper's; optionally the low-rank Arnoldi solver, row
``if_arnoldi``), plus the detector's precision and recall on flipped rows. Row
``hydra_fast_ens<K>`` (method ``ens``) clusters the signs of HYDRA fast contributions
averaged over K seeded training runs (:class:`~hydrattr.EnsembleAttributor`).

Usage::

    python benchmarks/table4_sign_clusters.py --quick
    python benchmarks/table4_sign_clusters.py --n-train 50000 --n-valid 10000 --epochs 50
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_args, run_record, save_results  # noqa: E402
from table3_noise_cleaning import noisy_setting  # noqa: E402

from hydrattr import EnsembleAttributor, HydraAttributor  # noqa: E402
from hydrattr.detection import SignClusterDetector  # noqa: E402
from hydrattr.metrics import jaccard_index  # noqa: E402


PAPER = {  # Jaccard (%) correct labels / random labels
    "mnist": {"hydra": (97.13, 97.16), "if": (71.89, 67.19)},
    "fashion-mnist": {"hydra": (78.06, 77.73), "if": (41.26, 33.22)},
}


def class_jaccard(flagged, flipped, y):
    """Per-class Jaccard of (not flagged vs correct) and (flagged vs flipped)."""
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


def run_one(args, dataset):
    seed = args.seed
    d, y, flipped, net = noisy_setting(args, dataset, args.rate)
    X, Xv, yv = d.X_train, d.X_valid, d.y_valid
    traj_kind = "memmap" if args.memmap else "memory"
    rows, timings = [], {}
    common = dict(n_reference=args.n_reference, validation_data=(Xv, yv),
                  reference_batch_size=args.reference_batch_size, random_state=seed)

    if not args.no_hydra:
        t0 = time.perf_counter()
        det = SignClusterDetector(
            HydraAttributor(net, mode="fast", storage=args.storage, trajectory=traj_kind,
                            store_dir=args.work_dir, random_state=seed, verbose=0),
            sign_storage="packed", **common).fit(X, y)
        timings["hydra"] = time.perf_counter() - t0
        acc = float((det.attributor_.net_.predict(d.X_test) == d.y_test).mean())
        for row in evaluate_splits("hydra_fast", det, flipped, y, timings, "hydra"):
            row["test_accuracy_noisy_model"] = acc
            rows.append(row)
        del det

    if "ens" in args.methods:  # sign vectors of HYDRA fast averaged over seeded runs
        name = f"hydra_fast_ens{args.n_estimators}"
        try:
            t0 = time.perf_counter()
            member = HydraAttributor(net, mode="fast", storage=args.ens_storage,
                                     trajectory=traj_kind, verbose=0)
            det = SignClusterDetector(
                EnsembleAttributor(member, n_estimators=args.n_estimators, random_state=seed),
                sign_storage="packed", **common).fit(X, y)
            timings[name] = time.perf_counter() - t0
            rows.extend(evaluate_splits(name, det, flipped, y, timings, name))
            del det
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            traceback.print_exc()
            rows.append({"method": name, "error": repr(exc)[:300]})

    for name in [m for m in ("if", "if_arnoldi") if m in args.methods]:
        try:
            from hydrattr.influence import InfluenceFunctionAttributor

            if name == "if":
                kw = dict(solver="lissa", damping=args.if_damping, lissa_scale=args.if_scale,
                          lissa_depth=args.if_depth, lissa_batch_size=64)
            else:  # one Lanczos decomposition serves all references
                kw = dict(solver="arnoldi", damping=args.if_damping, arnoldi_rank=args.if_rank,
                          arnoldi_iter=args.if_arnoldi_iter)
            t0 = time.perf_counter()
            det = SignClusterDetector(
                InfluenceFunctionAttributor(net, block_size=args.if_block, random_state=seed,
                                            verbose=0, **kw),
                sign_storage="packed", **common).fit(X, y)
            timings[name] = time.perf_counter() - t0
            for row in evaluate_splits(name, det, flipped, y, timings, name):
                row.update({f"if_{k}": v for k, v in kw.items()})
                rows.append(row)
            del det
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            traceback.print_exc()
            rows.append({"method": name, "error": repr(exc)[:300]})
    return {"dataset": dataset, "rate": args.rate, "rows": rows, "timings_s": timings,
            "paper": PAPER.get(dataset)}


def markdown(results, args):
    lines = ["# Table 4: sign-cluster detection of wrong labels (LeNet-5)", "",
             f"Command: `{' '.join(sys.argv)}`", "",
             f"n_train={args.n_train}, n_valid={args.n_valid} (clean; references drawn from "
             f"it), n_reference={args.n_reference}, epochs={args.epochs}, "
             f"lr={args.lr}, MNIST lr drop at epoch {args.milestone}, "
             f"rate={args.rate:.0%}, seed={args.seed}. Paper: 50000/10000, 1000 references, "
             f"50 epochs, lr 0.01.", "",
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced run: 4000/1000 rows, 15 epochs, lr 0.05, MNIST drop at epoch "
                        "10, 200 references, IF depth 200")
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--methods", nargs="*", default=["if"], choices=["if", "if_arnoldi", "ens"],
                   help="optional rows besides hydra_fast: IF with LiSSA (the paper's), "
                        "IF with the low-rank Arnoldi solver, and/or HYDRA fast averaged "
                        "over --n-estimators seeded runs (EnsembleAttributor); "
                        "'--methods' alone: the hydra_fast row only")
    p.add_argument("--no-hydra", action="store_true",
                   help="skip the hydra_fast row (to run the --methods rows in a separate "
                        "process, e.g. beside a finished hydra_fast run)")
    p.add_argument("--storage", default="replay",
                   choices=["replay", "dense", "half", "memmap"],
                   help="fast-mode store of the hydra_fast row: 'replay' keeps RAM at "
                        "O(n_params) but replays the trajectory against every reference "
                        "(hours at the paper's size); 'half' holds n_train x n_params "
                        "float16 (6.2 GB at 50,000 rows) and costs one matrix product")
    p.add_argument("--n-estimators", type=int, default=5,
                   help="members of the EnsembleAttributor row (method 'ens')")
    p.add_argument("--ens-storage", default="half", choices=["dense", "half", "memmap"],
                   help="fast-mode store of each ensemble member")
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-valid", type=int, default=10000)
    p.add_argument("--n-reference", type=int, default=1000)
    p.add_argument("--reference-batch-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.01, help="initial lr (paper: 0.01)")
    p.add_argument("--milestone", type=int, default=5,
                   help="MNIST: epoch at which the lr is multiplied by 0.1 (paper: 5)")
    p.add_argument("--if-damping", type=float, default=0.01)
    p.add_argument("--if-scale", type=float, default=25.0)
    p.add_argument("--if-depth", type=int, default=1000)
    p.add_argument("--if-block", type=int, default=100)
    p.add_argument("--if-rank", type=int, default=100, help="if_arnoldi: eigenpairs kept")
    p.add_argument("--if-arnoldi-iter", type=int, default=300,
                   help="if_arnoldi: Krylov dimension (full-data HVPs)")
    add_run_args(p)
    args = p.parse_args(argv)
    if args.no_hydra and not args.methods:
        p.error("--no-hydra needs at least one --methods row")
    if args.quick:
        args.n_train, args.n_valid, args.epochs, args.n_reference = 4000, 1000, 15, 200
        args.lr, args.milestone, args.if_depth = 0.05, 10, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    results, t0 = [], time.perf_counter()
    tag = args.tag or ("quick" if args.quick else f"n{args.n_train}_e{args.epochs}")
    for dataset in args.datasets:
        print(f"== {dataset} r={args.rate}", flush=True)
        results.append(run_one(args, dataset))
        # saved after every dataset, so a long run that is stopped keeps its rows
        payload = run_record("table4_sign_clusters", args, t0, results=results)
        md = markdown(results, args)
        save_results(f"table4_{tag}", payload, md)
    print(md)

if __name__ == "__main__":
    main()
