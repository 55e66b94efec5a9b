"""Table 4's ensemble row at the paper's size, one member per process.

``paper/table4_sign_clusters.py --methods ens`` fits ``EnsembleAttributor(HydraAttributor, K)``
inside :class:`~hydrattr.detection.SignClusterDetector` in one process: at 50,000 rows and
50 epochs that is about 45 minutes per member on one core, run one after the other, with
every member's store held at once (6.2 GB each in float16). This script computes the same
row in pieces, so members can run side by side on separate cores and a stopped run keeps
the members it finished:

``--member k``
    fits member ``k`` exactly as the ensemble would (the ``k``-th seed drawn by
    ``EnsembleAttributor(random_state=seed)``; the draw does not depend on the number of
    members), inside a detector with the same seed (same references), and saves its
    contributions to the references, ``C_k`` of shape (n_train, n_reference), to the work
    dir. It also reports that member alone as a ``hydra_fast`` row (seed-to-seed spread).
``--combine``
    averages ``C_0 .. C_{K-1}`` for every K it finds and splits it with the same
    detector, through an attributor that returns the averaged matrix, both ways: k-means
    on signs, and ``_mean`` rows with ``clustering="mean"``. That is what
    ``EnsembleAttributor.attribute`` returns (the mean of its members' matrices), so the
    rows equal ``--methods ens --n-estimators K`` up to float summation order. Give it the
    members' ``--threads``: torch's thread count also sets k-means' OpenMP threads, which
    can move a row or two (at 50,000 rows: 25,361 flagged instead of 25,360 with 2 threads).

Usage::

    python benchmarks/paper/table4_ensemble_parts.py --dataset mnist --member 0 --memmap --threads 1
    python benchmarks/paper/table4_ensemble_parts.py --dataset mnist --member 1 --memmap --threads 1
    python benchmarks/paper/table4_ensemble_parts.py --dataset mnist --combine --threads 1 --tag n50000_e50_ens_mnist
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (TABLE4_PAPER, add_run_args, add_setting_args,  # noqa: E402
                     ensemble_part_path, evaluate, evaluate_splits, member_seed, noisy_setting,
                     publish, run_record, start_run, table4_markdown)

from hydrattr import HydraAttributor  # noqa: E402
from hydrattr.detection import SignClusterDetector  # noqa: E402


class _Averaged(BaseEstimator):
    """Attributor stand-in whose ``attribute`` returns a fixed (n_train, n_reference) matrix."""

    def __init__(self, contributions=None):
        self.contributions = contributions

    def fit(self, X, y):
        if len(X) != self.contributions.shape[0]:
            raise ValueError(f"contributions has {self.contributions.shape[0]} rows, "
                             f"X has {len(X)}")
        self.n_train_ = len(X)
        return self

    def attribute(self, X_test, y_test, objective="per_sample"):
        if len(X_test) != self.contributions.shape[1]:
            raise ValueError("call with all references at once (reference_batch_size=None)")
        return self.contributions


def setup(args):
    d, y, flipped, net = noisy_setting(args, args.dataset, args.rate)
    common = dict(n_reference=args.n_reference, validation_data=(d.X_valid, d.y_valid),
                  clustering="signs", random_state=args.seed, sign_storage="packed")
    return d, y, flipped, net, common


def run_member(args):
    d, y, flipped, net, common = setup(args)
    k, seed_k = args.member, member_seed(args.seed, args.member)
    t0 = time.perf_counter()
    det = SignClusterDetector(
        HydraAttributor(net, mode="fast", storage=args.storage,
                        trajectory="memmap" if args.memmap else "memory",
                        store_dir=args.work_dir, random_state=seed_k, verbose=0),
        **common).fit(d.X_train, y)
    fit_s = time.perf_counter() - t0
    ref = det.reference_indices_
    C = np.asarray(det.attributor_.attribute(d.X_valid[ref], d.y_valid[ref]), dtype=np.float32)
    acc = float((det.attributor_.net_.predict(d.X_test) == d.y_test).mean())
    row = evaluate(f"hydra_fast_m{k}", det, flipped, y, {"m": fit_s}, "m")
    row.update(member=k, member_seed=seed_k, test_accuracy_noisy_model=acc)
    path = ensemble_part_path(args, k)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, C=C, reference_indices=ref, row=json.dumps(row))
    os.replace(tmp, path)  # a stopped run leaves no half-written part
    print(f"saved {path} ({time.perf_counter() - t0:.0f} s)", flush=True)


def run_combine(args):
    d, y, flipped, net, common = setup(args)
    parts, k = [], 0
    while ensemble_part_path(args, k).exists():
        parts.append(np.load(ensemble_part_path(args, k)))
        k += 1
    if not parts:
        raise SystemExit(f"no member files {ensemble_part_path(args, 0)} in --work-dir {args.work_dir}")
    rows, total, seconds = [], None, 0.0
    for k, p in enumerate(parts):
        rows.append(json.loads(str(p["row"])))
        seconds += rows[-1]["seconds"]
        alone = SignClusterDetector(_Averaged(p["C"]),
                                    **{**common, "clustering": "mean"}).fit(d.X_train, y)
        rows.append(evaluate(f"hydra_fast_m{k}_mean", alone, flipped, y,
                             {"m": rows[-1]["seconds"]}, "m"))
        total = p["C"].astype(np.float64) if total is None else total + p["C"]
        det = SignClusterDetector(_Averaged(total / (k + 1)), **common).fit(d.X_train, y)
        if not np.array_equal(det.reference_indices_, p["reference_indices"]):
            raise RuntimeError("member references differ from the detector's")
        rows.extend(evaluate_splits(f"hydra_fast_ens{k + 1}", det, flipped, y,
                                    {"e": seconds}, "e"))
    res = {"dataset": args.dataset, "rate": args.rate, "rows": rows,
           "paper": TABLE4_PAPER.get(args.dataset)}
    payload = run_record("table4_ensemble_parts", args, results=[res])
    tag = args.tag or f"n{args.n_train}_e{args.epochs}_ens_{args.dataset}"
    md = table4_markdown([res], args) + (
        "\n`hydra_fast_m<k>`: member k alone (fitted in its own process); "
        "`hydra_fast_ens<K>`: the mean of members 0..K-1 (seconds: sum of their fits).\n")
    publish(f"table4_{tag}", payload, md)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--member", type=int, help="fit this member and save its contributions")
    g.add_argument("--combine", action="store_true", help="cluster the averaged members")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--storage", default="half", choices=["dense", "half", "memmap", "replay"])
    p.add_argument("--rate", type=float, default=0.5)
    add_setting_args(p, "table4_paper")
    add_run_args(p)
    args = p.parse_args(argv)
    if args.member is not None and args.member < 0:
        p.error(f"--member must be >= 0, got {args.member}")
    start_run(args)
    run_member(args) if args.member is not None else run_combine(args)


if __name__ == "__main__":
    main()
