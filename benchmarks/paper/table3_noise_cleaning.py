"""Table 3 (and supplement Table 4) of Chen et al. (AAAI 2021): cleaning label noise.

For each dataset (MNIST, Fashion-MNIST) and noise rate r (80%, 50% uniformly wrong
labels): train LeNet-5 with the paper's schedule on the noisy training set, score every
training sample by its contribution to the mean loss of the clean validation set,
remove the r% least useful samples, retrain from scratch on the rest and report the
test accuracy. Rows, all in one run with the same network, seed and data:

* ``no_filtering``: the network trained on all noisy rows (the attributor's own net:
  HYDRA trains a clone exactly as ``net.fit`` would);
* ``if``: :class:`~hydrattr.influence.InfluenceFunctionAttributor` (LiSSA) scores;
* ``hydra_fast``: :class:`~hydrattr.cleaning.LabelNoiseCleaner` with
  ``HydraAttributor(mode="fast")`` and ``score_by="contribution"`` (the paper's score;
  every cleaner here pins it, the default being training dynamics);
* ``hydra_fast_final_lr`` (method ``final_lr``): the same fast scores truncated to the
  final learning-rate phase (``HydraAttributor(last_epochs="final_lr")``: sample weights
  act only in the epochs since the rate last changed), from the same recorded run;
  ``hydra_fast_ens<K>_final_lr`` (method ``ens_final_lr``): K such runs averaged;
* ``hydra_exact``: the exact hypergradient of the *same* recorded run (the fast
  attributor keeps its trajectory with ``storage="replay"``; switching ``mode`` to
  "exact" runs the adjoint sweep over it, identical to a fresh exact fit);
* ``cleanlab``: confident learning (``cleanlab.filter.find_label_issues``,
  ``filter_by="prune_by_class"`` with ``num_to_remove_per_class = r * class count``) on
  5-fold out-of-fold probabilities of the same network, removing the same r%;
* ``hydra_fast_pc_r2``: ``LabelNoiseCleaner(stratify=True, n_rounds=2)``: half the
  rows removed, a fresh HYDRA fit on the rest, the other half removed;
* ``hydra_fast_ens<K>`` (method ``ens``): HYDRA fast averaged over K seeded training runs
  (:class:`~hydrattr.EnsembleAttributor`, ``--n-estimators``); K runs against the 5
  trainings cleanlab's 5 folds cost. Method ``ens_rounds`` instead runs it through
  ``LabelNoiseCleaner(stratify=True, n_rounds=--n-rounds)`` (row ``..._pc_r2``);
* ``oracle``: retrain on exactly the unflipped rows (the ceiling).

Score-based rows (HYDRA fast/exact, IF) come in two removal rules: the r% lowest scores
overall (the paper's rule; row ``hydra_fast``) and the r% lowest within each class of the
given labels (``LabelNoiseCleaner(stratify=True)``, the same per-class quota cleanlab's
``prune_by_class`` gets; row ``hydra_fast_pc``).

Each row reports the precision and recall of its removed set against the flipped mask
and the retrained test accuracy. The paper's figures are printed alongside, but the
comparison that matters is within the run.

Usage::

    python benchmarks/paper/table3_noise_cleaning.py --quick
    python benchmarks/paper/table3_noise_cleaning.py --n-train 50000 --n-valid 10000 \
        --n-test 10000 --epochs 20          # the paper's size (hours on a GPU-less box)
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (accuracy, add_run_args, add_setting_args, apply_preset,  # noqa: E402
                     cleanlab_removed, default_tag, fit_net, load_result, markdown_head,
                     noisy_setting, precision_recall, publish, retrain_seeds, run_settings,
                     start_run)

from hydrattr import EnsembleAttributor, HydraAttributor  # noqa: E402
from hydrattr.cleaning import LabelNoiseCleaner, remove_lowest  # noqa: E402

PAPER = {  # test accuracy (%), Table 3 (r=0.8) and supplement Table 4 (r=0.5)
    ("mnist", 0.8): {"no_filtering": 72.93, "if": 90.07, "hydra": 98.31},
    ("fashion-mnist", 0.8): {"no_filtering": 78.52, "if": 63.20, "hydra": 86.72},
    ("mnist", 0.5): {"no_filtering": 94.65, "if": 93.83, "hydra": 98.31},
    ("fashion-mnist", 0.5): {"no_filtering": 87.44, "if": 76.70, "hydra": 87.28},
}


# ---------------------------------------------------------------------------- runner

def run_one(args, dataset, rate):
    seed = args.seed
    d, y, flipped, net = noisy_setting(args, dataset, rate)
    X, Xv, yv = d.X_train, d.X_valid, d.y_valid
    Xt, yt = d.X_test[:args.n_test], d.y_test[:args.n_test]
    traj_kind = "memmap" if args.memmap else "memory"
    rows, timings = [], {}

    def retrain_rules(name, scores, extra=None):
        """One row per removal rule: global (the paper's) and/or per class."""
        if "global" in args.rules:
            retrain(name, remove_lowest(scores, rate), extra)
        if "per_class" in args.rules:
            retrain(f"{name}_pc", remove_lowest(scores, rate, y), extra)

    def retrain(name, removed, extra=None, first=None):
        """Retrain on the kept rows with every retraining seed; ``first`` is the
        accuracy of an already trained model for the first seed (no filtering)."""
        t0 = time.perf_counter()
        keep = ~removed
        seeds = retrain_seeds(args)
        if args.seeds_for is not None and name not in args.seeds_for:
            seeds = seeds[:1]
        accs = [first if (j == 0 and first is not None) else
                accuracy(fit_net(net, X[keep], y[keep], s), Xt, yt)
                for j, s in enumerate(seeds)]
        timings[f"retrain_{name}"] = time.perf_counter() - t0
        p, r = precision_recall(removed, flipped) if removed.any() else (float("nan"), 0.0)
        row = {"method": name, "n_removed": int(removed.sum()), "precision": p, "recall": r,
               "test_accuracy": accs[0]}
        if len(accs) > 1:
            row.update(test_accuracies=accs, test_accuracy_mean=float(np.mean(accs)),
                       test_accuracy_std=float(np.std(accs, ddof=1)))
        row.update(extra or {})
        rows.append(row)
        print(f"  {dataset} r={rate:.0%} {name:14s} removed={row['n_removed']:6d} "
              f"P={p:.3f} R={r:.3f} acc={' '.join(f'{a:.4f}' for a in accs)}", flush=True)

    # HYDRA fast through the public cleaner (its net_ is the no-filtering model)
    t0 = time.perf_counter()
    attr = HydraAttributor(net, mode="fast", storage="replay", trajectory=traj_kind,
                           store_dir=args.work_dir, random_state=seed, verbose=0)
    cleaner = LabelNoiseCleaner(attr, score_by="contribution", validation_data=(Xv, yv),
                                fraction=rate, random_state=seed)
    cleaner.fit_resample(X, y)
    timings["hydra_fast_fit_and_score"] = time.perf_counter() - t0
    fitted = cleaner.attributor_
    # the first seed's no-filtering model is the one the cleaner attributed
    retrain("no_filtering", np.zeros(len(y), dtype=bool), first=accuracy(fitted.net_, Xt, yt))
    assert np.array_equal(cleaner.removed_mask_, remove_lowest(cleaner.scores_, rate))
    retrain_rules("hydra_fast", cleaner.scores_)

    def rescore(name, **params):
        """Rows ``name`` from the cleaner's fitted attributor with other parameters: the
        same recorded trajectory, replayed (``mode``, ``last_epochs``), no second
        training."""
        try:
            t0 = time.perf_counter()
            fitted.set_params(**params)
            s = fitted.attribute(Xv, yv, objective="mean")[:, 0]
            timings[f"{name}_score"] = time.perf_counter() - t0
            extra = {"pearson_vs_fast": float(np.corrcoef(cleaner.scores_, s)[0, 1])}
            if fitted.last_epochs is not None:
                extra.update(window_start_step=int(fitted.window_start_),
                             n_steps=len(fitted.trajectory_))
            retrain_rules(name, s, extra)
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            traceback.print_exc()
            rows.append({"method": name, "error": repr(exc)[:300]})
        finally:
            fitted.set_params(mode="fast", last_epochs=None)

    if "final_lr" in args.methods:
        # the hypergradient truncated to the final learning-rate phase
        # (HydraAttributor(last_epochs="final_lr")): sample weights act only in the
        # epochs since the rate last changed
        rescore("hydra_fast_final_lr", last_epochs="final_lr")

    if "rounds" in args.methods:  # LabelNoiseCleaner(stratify=True, n_rounds=2)
        try:
            t0 = time.perf_counter()
            attr2 = HydraAttributor(net, mode="fast", storage=args.ens_storage,
                                    trajectory=traj_kind, store_dir=args.work_dir,
                                    random_state=seed, verbose=0)
            cl2 = LabelNoiseCleaner(attr2, score_by="contribution", validation_data=(Xv, yv),
                                    fraction=rate, stratify=True, n_rounds=args.n_rounds,
                                    random_state=seed)
            cl2.fit_resample(X, y)
            timings[f"hydra_fast_pc_r{args.n_rounds}_fit_and_score"] = \
                time.perf_counter() - t0
            retrain(f"hydra_fast_pc_r{args.n_rounds}", cl2.removed_mask_)
            del cl2, attr2
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"method": f"hydra_fast_pc_r{args.n_rounds}", "error": repr(exc)[:300]})

    for ens_method in [m for m in ("ens", "ens_rounds", "ens_final_lr") if m in args.methods]:
        # EnsembleAttributor: HYDRA fast averaged over seeds ("ens_rounds": with
        # LabelNoiseCleaner(stratify=True, n_rounds=--n-rounds); "ens_final_lr": members
        # truncated to the final learning-rate phase)
        window = "final_lr" if ens_method == "ens_final_lr" else None
        name = f"hydra_fast_ens{args.n_estimators}" + ("_final_lr" if window else "")
        try:
            t0 = time.perf_counter()
            # store_dir=None: a memmap store lives in a temporary directory that is
            # removed with its member
            member = HydraAttributor(net, mode="fast", storage=args.ens_storage,
                                     trajectory=traj_kind, last_epochs=window, verbose=0)
            ens = EnsembleAttributor(member, n_estimators=args.n_estimators,
                                     random_state=seed)
            rounds = args.n_rounds if ens_method == "ens_rounds" else 1
            ecl = LabelNoiseCleaner(ens, score_by="contribution", validation_data=(Xv, yv),
                                    fraction=rate, stratify=rounds > 1, n_rounds=rounds,
                                    random_state=seed)
            ecl.fit_resample(X, y)
            timings[f"{name}_fit_and_score"] = time.perf_counter() - t0
            if rounds > 1:  # the cleaner's own (per-class, iterative) removal
                retrain(f"{name}_pc_r{rounds}", ecl.removed_mask_)
            else:
                s_ens = ecl.scores_
                retrain_rules(name, s_ens, {"pearson_vs_single": float(
                    np.corrcoef(cleaner.scores_, s_ens)[0, 1])})
            del ecl, ens
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"method": name, "error": repr(exc)[:300]})

    if "dynamics" in args.methods:
        # LabelNoiseCleaner's default: training dynamics, no validation set; its own
        # estimated count, and the paper's r% rule on the same scores
        try:
            t0 = time.perf_counter()
            dcl = LabelNoiseCleaner(net, random_state=seed).fit(X, y)
            timings["dynamics_fit_and_score"] = time.perf_counter() - t0
            retrain("dynamics_default", dcl.removed_mask_,
                    {"estimated_count": int(dcl.estimated_counts_.sum())})
            retrain_rules("dynamics", dcl.scores_)
            del dcl
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"method": "dynamics", "error": repr(exc)[:300]})

    if "exact" in args.methods:  # the exact hypergradient of the same run
        rescore("hydra_exact", mode="exact")
    fitted = cleaner = attr = None  # free the trajectory (rescore is done with them)

    if "if" in args.methods:
        try:
            from hydrattr.influence import InfluenceFunctionAttributor

            t0 = time.perf_counter()
            inf = InfluenceFunctionAttributor(
                net, solver="lissa", damping=args.if_damping, lissa_scale=args.if_scale,
                lissa_depth=args.if_depth, lissa_batch_size=64, random_state=seed,
                verbose=0)
            icl = LabelNoiseCleaner(inf, score_by="contribution", validation_data=(Xv, yv),
                                    fraction=rate, random_state=seed)
            icl.fit_resample(X, y)
            timings["if_fit_and_score"] = time.perf_counter() - t0
            retrain_rules("if", icl.scores_, {"if_solver": "lissa",
                                              "if_damping": args.if_damping,
                                              "if_scale": args.if_scale,
                                              "if_depth": args.if_depth})
            del icl, inf
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"method": "if", "error": repr(exc)[:300]})

    if "cleanlab" in args.methods:
        try:
            import cleanlab

            t0 = time.perf_counter()
            removed, info = cleanlab_removed(net, X, y, rate, seed)
            timings["cleanlab_cv"] = time.perf_counter() - t0
            info["cleanlab_version"] = cleanlab.__version__
            retrain("cleanlab", removed, info)
        except ImportError as exc:
            rows.append({"method": "cleanlab", "error": f"cleanlab not installed: {exc}"})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"method": "cleanlab", "error": repr(exc)[:300]})

    retrain("oracle", flipped.copy())
    return {"dataset": dataset, "rate": rate, "n_flipped": int(flipped.sum()),
            "rows": rows, "timings_s": timings, "paper": PAPER.get((dataset, rate))}


def markdown(results, args):
    settings = (f"n_train={args.n_train}, n_valid={args.n_valid} (clean, the scoring set), "
                f"n_test={args.n_test}, epochs={args.epochs}, lr={args.lr}, MNIST lr drop at "
                f"epoch {args.milestone}, seed={args.seed}. Paper: 50000/10000/10000, 20 "
                f"epochs, lr 0.01, drop at epoch 5.")
    lines = markdown_head("Table 3: cleaning label noise (LeNet-5)", settings)
    n_seeds = max((len(r.get("test_accuracies", [0])) for res in results for r in res["rows"]),
                  default=1)
    seeds_col = n_seeds > 1
    if seeds_col:
        lines += [f"Test accuracy: the first retraining (seed {args.seed}, as in single-seed "
                  f"runs) and the mean ± standard deviation over {n_seeds} retrainings of the "
                  f"same kept rows (seeds {args.seed} + 1000 j); the checks below use the "
                  f"means where both rows have them.", ""]
    lines += ["| dataset | r | method | removed | precision | recall | test acc (%) | "
              + ("mean ± sd (%) | " if seeds_col else "") + "paper (%) |",
              "|---|---|---|---|---|---|---|---|" + ("---|" if seeds_col else "")]
    paper_key = {"no_filtering": "no_filtering", "if": "if", "hydra_fast": "hydra",
                 "hydra_fast_pc": "hydra"}
    for res in results:
        paper = res.get("paper") or {}
        for row in res["rows"]:
            m = row["method"]
            if "error" in row:
                lines.append(f"| {res['dataset']} | {res['rate']:.0%} | {m} | - | - | - | "
                             f"error: {row['error'][:80]} | " + ("| " if seeds_col else "")
                             + "|")
                continue
            pp = paper.get(paper_key.get(m, ""), "")
            ms = ""
            if seeds_col:
                ms = (f"{100 * row['test_accuracy_mean']:.2f} ± "
                      f"{100 * row['test_accuracy_std']:.2f} | "
                      if "test_accuracy_mean" in row else "- | ")
            lines.append(
                f"| {res['dataset']} | {res['rate']:.0%} | {m} | {row['n_removed']} | "
                f"{row['precision']:.3f} | {row['recall']:.3f} | "
                f"{100 * row['test_accuracy']:.2f} | {ms}{pp} |")
    lines += ["", "Checks within each run (issue 8 targets):", ""]
    for res in results:
        by = {r["method"]: r for r in res["rows"] if "error" not in r}
        o = by.get("oracle")
        for hname in [m for m in by if m.startswith("hydra_")]:
            note = _checks(by, hname, o)
            if note:
                lines.append(f"- {res['dataset']} r={res['rate']:.0%}: " + note)
    return "\n".join(lines) + "\n"


def _checks(by, hname, o):
    """One line of the issue's targets for row ``hname``: vs oracle, no filtering, cleanlab."""
    if o is None:
        return None
    h = by[hname]

    def diff(other):
        """Accuracy difference in points: of the means when both rows have them."""
        key = "test_accuracy_mean" if "test_accuracy_mean" in h and \
            "test_accuracy_mean" in other else "test_accuracy"
        return f"{100 * (h[key] - other[key]):+.2f} pts" + (" (means)" if key != \
                                                             "test_accuracy" else "")

    notes = [f"{hname} acc - oracle = {diff(o)}"]
    if "no_filtering" in by:
        notes.append(f"vs no filtering {diff(by['no_filtering'])}")
    if "cleanlab" in by:
        c = by["cleanlab"]
        notes.append(f"vs cleanlab {diff(c)}, "
                     f"precision {h['precision']:.4f} vs {c['precision']:.4f}")
    return "; ".join(notes)


SETTING_KEYS = ("n_train", "n_valid", "n_test", "epochs", "lr", "milestone", "seed")


def merge_results(tags):
    """Join the rows of several runs of the same settings into one results list.

    Every (dataset, rate) keeps each method once. A method present in more than one run
    (no_filtering, hydra_fast_pc and oracle are in every run) must agree to the last bit
    in its removed count, precision and test accuracy, which checks that the runs share
    data, noise, seed, code path and CPU kernel level (results record
    ``cpu_capability``); otherwise the merge is refused. The test accuracy
    compared is the first retraining's; of two agreeing rows, the one retrained with more
    seeds (``--retrain-seeds``) is kept.
    """
    # raw runs that only feed a merged table live in results/parts/
    parts = [load_result(f"table3_{t}") for t in tags]
    ref = {k: parts[0]["args"][k] for k in SETTING_KEYS}
    for t, part in zip(tags[1:], parts[1:]):
        diff = [k for k in SETTING_KEYS if part["args"][k] != ref[k]]
        if diff:
            raise SystemExit(f"--merge: {t} differs from {tags[0]} in {diff}")
    part_caps = {t: part.get("cpu_capability", "unrecorded") for t, part in zip(tags, parts)}
    merged = {}
    for t, part in zip(tags, parts):
        for res in part["results"]:
            key = (res["dataset"], res["rate"])
            into = merged.setdefault(key, {**res, "rows": [], "timings_s": {}, "from": {}})
            into["timings_s"].update(res.get("timings_s", {}))
            for row in res["rows"]:
                old = next((r for r in into["rows"] if r["method"] == row["method"]), None)
                if old is None:
                    into["rows"].append(row)
                    into["from"][row["method"]] = t
                    continue
                same = all(old.get(k) == row.get(k) or (k == "precision" and
                           np.isnan(old.get(k, 0.0)) and np.isnan(row.get(k, 0.0)))
                           for k in ("n_removed", "precision", "test_accuracy"))
                if not same:
                    caps = {part_caps[into["from"][row["method"]]], part_caps[t]}
                    hint = (f" (run on different CPU kernel levels, {' and '.join(sorted(caps))}"
                            ": their floats differ in the last bits, which training amplifies)"
                            if len(caps) > 1 and "unrecorded" not in caps else "")
                    raise SystemExit(f"--merge: {row['method']} at {key} differs between "
                                     f"{into['from'][row['method']]} and {t}{hint}")
                if len(row.get("test_accuracies", ())) > len(old.get("test_accuracies", ())):
                    # same first retraining, more seeds: keep the row with more of them
                    into["rows"][into["rows"].index(old)] = row
                    into["from"][row["method"]] = t
    results = []
    for key in sorted(merged, key=lambda k: (k[0] != "mnist", -k[1])):
        res = merged[key]
        res["rows"].sort(key=lambda r: (r["method"] != "no_filtering",
                                        r["method"] == "oracle"))
        results.append(res)
    return results, argparse.Namespace(**parts[0]["args"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced run: 4000/1000/2000 rows, 12 epochs, lr 0.05, MNIST drop "
                        "at epoch 8, IF depth 200")
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--rates", nargs="+", type=float, default=[0.8, 0.5])
    p.add_argument("--n-rounds", type=int, default=2,
                   help="rounds of the iterative HYDRA row (method 'rounds')")
    p.add_argument("--methods", nargs="+",
                   default=["final_lr", "ens", "ens_final_lr", "rounds", "exact", "if",
                            "cleanlab"],
                   help="optional rows besides no_filtering, hydra_fast and oracle "
                        "(final_lr, ens_final_lr: HydraAttributor(last_epochs='final_lr'); "
                        "dynamics: LabelNoiseCleaner's default, training dynamics)")
    p.add_argument("--n-estimators", type=int, default=3,
                   help="members of the EnsembleAttributor row (method 'ens')")
    p.add_argument("--ens-storage", default="half",
                   choices=["dense", "half", "memmap", "replay"],
                   help="fast-mode store of each ensemble member and of the rounds "
                        "row's attributor (a float32 'dense' store of 50,000 LeNet-5 rows "
                        "takes 12 GB)")
    p.add_argument("--retrain-seeds", type=int, default=1,
                   help="retrain every row's kept set with this many seeds and report the "
                        "mean and standard deviation of the test accuracy beside the first "
                        "seed's (which is the single retraining of a default run)")
    p.add_argument("--seeds-for", nargs="+", default=None, metavar="ROW",
                   help="give the --retrain-seeds seeds only to these rows (the others "
                        "are retrained once); default: every row")
    add_setting_args(p, "table3_paper")
    p.add_argument("--rules", nargs="+", default=["global", "per_class"],
                   choices=["global", "per_class"],
                   help="removal rules for the score-based methods: the r%% lowest overall "
                        "(the paper's; row name) and/or within each class (LabelNoiseCleaner"
                        "(stratify=True), as cleanlab's prune_by_class; row name + _pc)")
    p.add_argument("--if-damping", type=float, default=0.01)
    p.add_argument("--if-scale", type=float, default=25.0)
    p.add_argument("--if-depth", type=int, default=1000)
    add_run_args(p)
    p.add_argument("--merge", default=None, metavar="TAG[,TAG...]",
                   help="join the saved runs table3_<TAG>.json of the same settings into "
                        "table3_<--tag>.{json,md} (shared rows must agree exactly); runs "
                        "nothing")
    args = p.parse_args(argv)
    if args.merge:
        tags = args.merge.split(",")
        results, run_args = merge_results(tags)
        tag = args.tag or "merged"
        payload = {"benchmark": "table3_noise_cleaning", "argv": sys.argv, "merged": tags,
                   "args": vars(run_args), "results": results}
        md = markdown(results, run_args).replace(
            "\n\n", f"\n\nMerged from the runs {', '.join(tags)} (same data, noise, seed "
                    f"and settings; rows present in several runs agree exactly).\n\n", 1)
        publish(f"table3_{tag}", payload, md)
        return
    if args.quick:
        apply_preset(args, "table3_quick", if_depth=200)
    start_run(args)
    run_settings("table3_noise_cleaning", f"table3_{default_tag(args)}", args,
                 [(ds, rate) for ds in args.datasets for rate in args.rates], run_one, markdown)


if __name__ == "__main__":
    main()
