"""Table 4 of Chen et al. (AAAI 2021): unsupervised detection of wrong labels by sign clusters.

50% of the training labels are replaced by a uniformly drawn wrong class; LeNet-5 is
trained with the paper's schedule (50 epochs); every training sample's contributions to
``n_reference`` (1,000) randomly drawn validation points are reduced to signs and, per
class, k-means splits the sign vectors in two (:class:`~hydrattr.detection.SignClusterDetector`
with ``clustering="signs"``, pinned here: the detector's default is training dynamics).
Every row has a ``_mean`` twin: the same fitted contributions split with
``clustering="mean"`` (a two-component Gaussian mixture on each class's mean contribution).
Reported: the Jaccard index between the detected groups and the true partition
(correct labels / random labels), averaged over the 10 classes, for HYDRA (fast) and
influence functions (LiSSA, the paper's; optionally the low-rank Arnoldi solver, row
``if_arnoldi``), plus the detector's precision and recall on flipped rows. Row
``hydra_fast_ens<K>`` (method ``ens``) clusters the signs of HYDRA fast contributions
averaged over K seeded training runs (:class:`~hydrattr.EnsembleAttributor`).

Usage::

    python benchmarks/paper/table4_sign_clusters.py --quick
    python benchmarks/paper/table4_sign_clusters.py --n-train 50000 --n-valid 10000 --epochs 50
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (TABLE4_PAPER, add_run_args, add_setting_args, apply_preset,  # noqa: E402
                     default_tag, evaluate_splits, noisy_setting, run_settings, start_run,
                     table4_markdown)

from hydrattr import EnsembleAttributor, HydraAttributor  # noqa: E402
from hydrattr.detection import SignClusterDetector  # noqa: E402


def run_one(args, dataset):
    seed = args.seed
    d, y, flipped, net = noisy_setting(args, dataset, args.rate)
    X, Xv, yv = d.X_train, d.X_valid, d.y_valid
    traj_kind = "memmap" if args.memmap else "memory"
    rows, timings = [], {}
    # the paper's split: k-means on the signs of the contributions (the detector's default
    # is now the training-dynamics split)
    common = dict(n_reference=args.n_reference, validation_data=(Xv, yv), clustering="signs",
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
            "paper": TABLE4_PAPER.get(dataset)}


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
    add_setting_args(p, "table4_paper")
    p.add_argument("--reference-batch-size", type=int, default=None)
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
        apply_preset(args, "table4_quick", if_depth=200)
    start_run(args)
    run_settings("table4_sign_clusters", f"table4_{default_tag(args)}", args,
                 [(ds,) for ds in args.datasets], run_one, table4_markdown)

if __name__ == "__main__":
    main()
