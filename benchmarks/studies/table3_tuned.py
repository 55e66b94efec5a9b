"""Table 3 with the removed fraction tuned on validation accuracy, and a hybrid score.

Frozen study: its finding is recorded in the docs; rerun it only to check that.

Finding: tuning the removed fraction on validation accuracy does not rescue cleaning at
    the paper's size: no ranking (HYDRA per class, cleanlab, the hybrid) reaches no
    filtering at any fraction tried, and the retrained accuracies follow the precision
    at r (cleanlab, hybrid, HYDRA).
Recorded in: docs/results/cleaning.rst, "Tuning how much to remove does not rescue it";
    docs/cleaning.rst, "How well it works".
Results (benchmarks/results/): table3_tuned_n50000_e20.{json,md} (merged from
    parts/table3_tuned_n50000_e20_*), table3_tuned_quick.{json,md}

``table3_noise_cleaning`` removes exactly r% of the rows at r% label noise, as the paper
does, and at the paper's size no cleaner's kept set retrains above training on all rows
(``table3_n50000_e20``): the wrong labels a cleaner keeps are the plausible ones, which
cost far more than random ones, and the clean rows it drops are the hardest
(``table3_gap_quick``). A user does not have to remove r%: ``cleaner__fraction`` is a
hyperparameter, tuned as ``GridSearchCV`` would tune it, on held-out accuracy. This
benchmark does that for each ranking, on both sides of r, and reports the test accuracy
of the choice.

Per setting (dataset, noise rate r; the data, noise, LeNet-5 and seed of
``table3_noise_cleaning``, so its rows reproduce):

1. Scores, cached in ``<work-dir>/scores/`` (a rerun only retrains): fast HYDRA's
   contribution of every row to the mean loss of the clean validation set
   (``LabelNoiseCleaner``, as Table 3's ``hydra_fast`` rows) and 5-fold out-of-fold
   probabilities of the same network (cleanlab's input, as Table 3's ``cleanlab`` row).
2. Three rankings, each removing a quota per given class:
   ``hydra_pc`` (lowest HYDRA score, ``LabelNoiseCleaner(stratify=True)``),
   ``cleanlab`` (confident learning, ``prune_by_class``) and ``hybrid_pc`` (lowest rank
   of the HYDRA score plus rank of the out-of-fold probability of the given label: no
   longer HYDRA alone; it needs cleanlab's five extra trainings).
3. For every ranking and every ``g`` of ``--grid``: remove the fraction
   ``f = 1 - g (1 - r)`` (``g`` is the kept share relative to the oracle's ``1 - r``:
   ``g = 1`` removes r%, ``g < 1`` more, ``g > 1`` less) and retrain on the kept
   rows (seed ``--seed``) and measure validation and test accuracy. The *tuned* row of a
   ranking is the fraction with the highest validation accuracy (the clean validation
   set, the scorer's own data; the test set is never looked at), retrained with
   ``--retrain-seeds`` seeds.
4. ``hydra_thr0``: remove every row whose HYDRA contribution is negative (the contract's
   "harmful"), no fraction to choose; retrained with the same seeds.

No filtering and the oracle (retraining on exactly the unflipped rows) are read from
``--reference`` (Table 3's merged run, three retraining seeds), which this run also
checks: the removed sets of ``hydra_pc`` and ``cleanlab`` at fraction r must have the
reference's precision exactly. With ``--reference none`` (and ``--quick``) they are
retrained here.

Usage::

    python benchmarks/studies/table3_tuned.py --quick
    python benchmarks/studies/table3_tuned.py --settings mnist:0.8 --memmap --tag n50000_e20_mnist_r80
    python benchmarks/studies/table3_tuned.py --merge n50000_e20_mnist_r80,... --tag n50000_e20
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (accuracy, add_run_args, add_setting_args, apply_preset,  # noqa: E402
                     cleanlab_select, default_tag, fit_net, hybrid_scores, load_result,
                     markdown_head, noisy_setting, oof_probs, parse_settings, precision_recall,
                     publish, retrain_seeds, run_settings, start_run)

from hydrattr import HydraAttributor  # noqa: E402
from hydrattr.cleaning import LabelNoiseCleaner, remove_lowest  # noqa: E402

RANKINGS = ("hydra_pc", "cleanlab", "hybrid_pc")


def scores(args, d, y, flipped, net, dataset, rate):
    """Fast HYDRA scores and out-of-fold probabilities, from the cache when present."""
    cache = Path(args.work_dir) / "scores" / (
        f"table3_{dataset}_r{round(100 * rate)}_n{args.n_train}_v{args.n_valid}"
        f"_e{args.epochs}_lr{args.lr:g}_m{args.milestone}_s{args.seed}.npz")
    if cache.exists():
        z = np.load(cache)
        if np.array_equal(z["y"], y) and np.array_equal(z["flipped"], flipped):
            print(f"  scores from {cache}", flush=True)
            return z["hydra"], z["probs"], {}
    timings = {}
    t0 = time.perf_counter()
    attr = HydraAttributor(net, mode="fast", storage="replay",
                           trajectory="memmap" if args.memmap else "memory",
                           store_dir=args.work_dir, random_state=args.seed, verbose=0)
    cleaner = LabelNoiseCleaner(attr, score_by="contribution",
                                validation_data=(d.X_valid, d.y_valid), fraction=rate,
                                random_state=args.seed)
    cleaner.fit_resample(d.X_train, y)
    hydra = cleaner.scores_
    del cleaner, attr
    timings["hydra_fast_fit_and_score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = oof_probs(net, d.X_train, y, args.seed)
    timings["oof_probs_cv"] = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, hydra=hydra, probs=probs, y=y, flipped=flipped)
    tmp.replace(cache)
    return hydra, probs, timings


def removed_by(ranking, fraction, hydra, probs, y):
    if ranking == "hydra_pc":
        return remove_lowest(hydra, fraction, y)
    if ranking == "cleanlab":
        return cleanlab_select(y, probs, fraction)[0]
    return remove_lowest(hybrid_scores(hydra, probs, y), fraction, y)


def reference_rows(args, dataset, rate):
    if args.reference == "none":
        return {}
    try:
        run = load_result(f"table3_{args.reference}")
    except SystemExit as exc:
        raise SystemExit(f"--reference: {exc} (use --reference none to retrain no "
                         f"filtering and the oracle in this run)") from None
    for res in run["results"]:
        if res["dataset"] == dataset and res["rate"] == rate:
            return {r["method"]: r for r in res["rows"] if "error" not in r}
    return {}


def run_setting(args, dataset, rate):
    d, y, flipped, net = noisy_setting(args, dataset, rate)
    X, Xv, yv = d.X_train, d.X_valid, d.y_valid
    Xt, yt = d.X_test[:args.n_test], d.y_test[:args.n_test]
    hydra, probs, timings = scores(args, d, y, flipped, net, dataset, rate)
    seeds = retrain_seeds(args)

    def retrain(removed, seed):
        m = fit_net(net, X[~removed], y[~removed], seed)
        return accuracy(m, Xv, yv), accuracy(m, Xt, yt)

    def row(method, removed, fraction, first=None):
        """Precision, recall and accuracies over every seed (``first``: seed 0's pair)."""
        accs = [first if (j == 0 and first is not None) else retrain(removed, s)
                for j, s in enumerate(seeds)]
        p, r = precision_recall(removed, flipped) if removed.any() else (float("nan"), 0.0)
        test = [a[1] for a in accs]
        out = {"method": method, "fraction": fraction, "n_removed": int(removed.sum()),
               "precision": p, "recall": r, "valid_accuracy": accs[0][0],
               "test_accuracy": test[0], "test_accuracies": test,
               "test_accuracy_mean": float(np.mean(test)),
               "test_accuracy_std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0}
        print(f"  {dataset} r={rate:.0%} {method:18s} f={fraction:.4f} P={p:.4f} R={r:.4f} "
              f"val={accs[0][0]:.4f} test={' '.join(f'{t:.4f}' for t in test)}", flush=True)
        return out

    rows, grid_rows, checks = [], [], {}
    ref = reference_rows(args, dataset, rate)
    for ranking in RANKINGS:
        cand = []
        for g in args.grid:
            f = 1.0 - g * (1.0 - rate)
            removed = removed_by(ranking, f, hydra, probs, y)
            va, te = retrain(removed, args.seed)
            p, r = precision_recall(removed, flipped)
            cand.append((f, removed, (va, te)))
            grid_rows.append({"method": ranking, "fraction": f, "precision": p, "recall": r,
                              "valid_accuracy": va, "test_accuracy": te})
            print(f"  {dataset} r={rate:.0%} grid {ranking:10s} f={f:.4f} P={p:.4f} "
                  f"val={va:.4f} test={te:.4f}", flush=True)
            name = {"hydra_pc": "hydra_fast_pc", "cleanlab": "cleanlab"}.get(ranking)
            if g == 1.0 and name in ref:  # same data and code path as Table 3
                checks[ranking] = {"precision": p, "reference": ref[name]["precision"],
                                   "same": p == ref[name]["precision"]}
        best = max(range(len(cand)), key=lambda k: cand[k][2][0])  # first of equal ones
        f, removed, first = cand[best]
        rows.append(row(f"{ranking}_tuned", removed, f, first))
    rows.append(row("hydra_thr0", hydra < 0, float((hydra < 0).mean())))
    for name, removed in (("no_filtering", np.zeros(len(y), dtype=bool)),
                          ("oracle", flipped.copy())):
        if name in ref:
            rows.append({**ref[name], "from_reference": args.reference})
        else:  # no reference run (--reference none, --quick): retrained here
            rows.append(row(name, removed, float(removed.mean())))
    return {"dataset": dataset, "rate": rate, "rows": rows, "grid": grid_rows,
            "reference_checks": checks, "timings_s": timings}


def markdown(results, args):
    settings = (f"n_train={args.n_train}, n_valid={args.n_valid} (clean: the scoring and the "
                f"selection set), n_test={args.n_test}, epochs={args.epochs}, lr={args.lr}, "
                f"seed={args.seed}. Fractions tried: 1 - g (1 - r) for g in "
                f"{args.grid} (g = 1: the paper's r); each ranking's row is "
                f"the fraction with the best validation accuracy after retraining (seed "
                f"{args.seed}), then retrained with seeds {retrain_seeds(args)}. No filtering "
                f"and oracle: " + ("retrained in this run." if args.reference == "none" else
                                   f"from `table3_{args.reference}`."))
    lines = markdown_head("Table 3 with the removed fraction tuned on validation accuracy",
                          settings) + [
        "| dataset | r | method | fraction | precision | recall | valid acc (%) | "
        "test acc, mean ± sd (%) |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            va = f"{100 * r['valid_accuracy']:.2f}" if "valid_accuracy" in r else "-"
            fr = f"{r['fraction']:.3f}" if "fraction" in r else "-"
            acc = (f"{100 * r['test_accuracy_mean']:.2f} ± "
                   f"{100 * r['test_accuracy_std']:.2f}"
                   if len(r.get("test_accuracies", ())) > 1
                   else f"{100 * r['test_accuracy']:.2f} (one seed)")
            lines.append(f"| {res['dataset']} | {res['rate']:.0%} | {r['method']} | {fr} | "
                         f"{r['precision']:.4f} | {r['recall']:.4f} | {va} | {acc} |")
    lines += ["", "Every fraction tried (one retraining, seed "
              f"{args.seed}):", "", "| dataset | r | ranking | fraction | precision | "
              "recall | valid acc (%) | test acc (%) |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for g in res["grid"]:
            lines.append(f"| {res['dataset']} | {res['rate']:.0%} | {g['method']} | "
                         f"{g['fraction']:.3f} | {g['precision']:.4f} | {g['recall']:.4f} | "
                         f"{100 * g['valid_accuracy']:.2f} | {100 * g['test_accuracy']:.2f} |")
    checks = [f"{res['dataset']} {res['rate']:.0%} {k}: {'same' if c['same'] else 'DIFFERENT'}"
              f" ({c['precision']:.4f})" for res in results
              for k, c in res["reference_checks"].items()]
    if checks:
        lines += ["", "Precision at fraction r against the reference run: "
                  + "; ".join(checks) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced run: 4000/1000/2000 rows, 12 epochs, lr 0.05, MNIST drop "
                        "at epoch 8, one retraining seed")
    p.add_argument("--settings", nargs="+", default=["mnist:0.8", "fashion-mnist:0.8",
                                                     "mnist:0.5", "fashion-mnist:0.5"],
                   help="dataset:rate pairs")
    p.add_argument("--grid", nargs="+", type=float, default=[1.5, 1.0, 0.875, 0.75, 0.625],
                   help="kept shares tried, relative to the oracle's 1 - r: the removed "
                        "fraction is 1 - g (1 - r) (g = 1 removes r)")
    p.add_argument("--retrain-seeds", type=int, default=3)
    p.add_argument("--reference", default="n50000_e20",
                   help="table3_<REFERENCE>.json: no filtering, oracle and the precision "
                        "checks ('none': retrain no filtering and the oracle here)")
    add_setting_args(p, "table3_paper")
    add_run_args(p)
    p.add_argument("--merge", default=None, metavar="TAG[,TAG...]",
                   help="concatenate the saved runs parts/table3_tuned_<TAG>.json (same "
                        "settings) into table3_tuned_<--tag>; runs nothing")
    args = p.parse_args(argv)
    if args.merge:
        parts = [load_result(f"table3_tuned_{t}") for t in args.merge.split(",")]
        keys = ("n_train", "n_valid", "n_test", "epochs", "lr", "milestone", "seed", "grid",
                "retrain_seeds", "reference")
        for t, part in zip(args.merge.split(","), parts):
            diff = [k for k in keys if part["args"][k] != parts[0]["args"][k]]
            if diff:
                p.error(f"--merge: {t} differs from the first run in {diff}")
        results = [res for part in parts for res in part["results"]]
        run_args = argparse.Namespace(**parts[0]["args"])
        md = markdown(results, run_args)
        publish(f"table3_tuned_{args.tag or 'merged'}",
                     {"benchmark": "table3_tuned", "argv": sys.argv,
                      "merged": args.merge.split(","), "args": parts[0]["args"],
                      "results": results}, md)
        return
    settings = parse_settings(p, args.settings)
    if args.quick:
        apply_preset(args, "table3_quick", retrain_seeds=1, reference="none")
    start_run(args)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="cleanlab")
    tag = default_tag(args)
    run_settings("table3_tuned", f"table3_tuned_{tag}" if args.quick or not args.tag else
                 f"parts/table3_tuned_{tag}", args, settings, run_setting, markdown)


if __name__ == "__main__":
    main()
