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
  ``HydraAttributor(mode="fast")``;
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

    python benchmarks/table3_noise_cleaning.py --quick
    python benchmarks/table3_noise_cleaning.py --n-train 50000 --n-valid 10000 \
        --n-test 10000 --epochs 20          # the paper's size (hours on a GPU-less box)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from skorch.callbacks import Callback, LRScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, add_run_args, paper_lenet, run_record, save_results  # noqa: E402

from hydrattr import EnsembleAttributor, HydraAttributor  # noqa: E402
from hydrattr.cleaning import LabelNoiseCleaner, remove_lowest  # noqa: E402
from hydrattr.datasets import load_mnist_split, make_label_noise  # noqa: E402

PAPER = {  # test accuracy (%), Table 3 (r=0.8) and supplement Table 4 (r=0.5)
    ("mnist", 0.8): {"no_filtering": 72.93, "if": 90.07, "hydra": 98.31},
    ("fashion-mnist", 0.8): {"no_filtering": 78.52, "if": 63.20, "hydra": 86.72},
    ("mnist", 0.5): {"no_filtering": 94.65, "if": 93.83, "hydra": 98.31},
    ("fashion-mnist", 0.5): {"no_filtering": 87.44, "if": 76.70, "hydra": 87.28},
}


# ---------------------------------------------------------------------------- network

class ExternalValidLoss(Callback):
    """Mean loss on a fixed (clean) validation set, written to history as ``ext_valid_loss``.

    The paper's Fashion-MNIST schedule halves the lr when ``train loss + validation
    loss`` plateaus; with ``train_split=None`` (every row trained, so every row
    attributed) skorch has no validation loss of its own.
    """

    def __init__(self, X, y, batch_size=1000):
        self.X = X
        self.y = y
        self.batch_size = batch_size

    def on_epoch_end(self, net, **kwargs):
        module = net.module_
        was = module.training
        module.eval()
        total = 0.0
        with torch.no_grad():
            for s in range(0, len(self.X), self.batch_size):
                x = torch.as_tensor(self.X[s:s + self.batch_size])
                y = torch.as_tensor(self.y[s:s + self.batch_size])
                out = module(x)
                total += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
        module.train(was)
        net.history.record("ext_valid_loss", total / len(self.X))


def _plateau_monitor(net):
    return net.history[-1, "train_loss"] + net.history[-1, "ext_valid_loss"]


def make_net(dataset, epochs, X_valid, y_valid, seed, lr=0.01, milestone=5):
    """LeNet-5 with the paper's hyperparameters (supplement, Table 3).

    SGD, momentum 0.9, batch 64, lr 0.01, weight decay 2e-5; MNIST: lr x0.1 at epoch
    5; Fashion-MNIST: lr x0.5 when train + validation loss has not improved by 0.01%
    for 2 epochs. ``lr`` and ``milestone`` (the MNIST drop epoch) can be changed for
    reduced runs, whose few steps per epoch leave LeNet-5 stuck at chance with the
    paper's values.
    """
    callbacks = [("ext_valid", ExternalValidLoss(X_valid, y_valid))]
    if dataset == "mnist":
        callbacks.append(("lr", LRScheduler(torch.optim.lr_scheduler.MultiStepLR,
                                            milestones=[milestone], gamma=0.1)))
    else:
        callbacks.append(("lr", LRScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau,
                                            monitor=_plateau_monitor, mode="min", factor=0.5,
                                            patience=2, threshold=1e-4,
                                            threshold_mode="rel")))
    return paper_lenet(epochs, lr=lr, callbacks=callbacks, module__n_classes=10)


def noisy_setting(args, dataset, rate):
    """The data, noise and net every cleaning/detection benchmark starts from.

    Loads ``args.n_train``/``args.n_valid`` rows of ``dataset`` (seeded by ``args.seed``),
    flips ``rate`` of the training labels to a uniformly drawn wrong class, and builds the
    paper's LeNet-5 (:func:`make_net`, clean validation loss logged). Returns ``(d, y,
    flipped, net)``: the split, the noisy labels and the mask of flipped rows.
    """
    d = load_mnist_split(dataset, data_dir=args.data_dir, random_state=args.seed,
                         n_train=args.n_train, n_valid=args.n_valid)
    y, flipped = make_label_noise(d.y_train, rate, n_classes=10, random_state=args.seed)
    net = make_net(dataset, args.epochs, d.X_valid, d.y_valid, args.seed, lr=args.lr,
                   milestone=args.milestone)
    return d, y, flipped, net


def fit_net(net, X, y, seed):
    from sklearn.base import clone

    torch.manual_seed(seed)
    return clone(net).fit(X, y)


def retrain_seeds(args):
    """Seeds of the retrainings behind each row's test accuracy: ``--seed`` first (the
    single retraining of earlier runs), then ``--seed + 1000 j``."""
    return [args.seed + 1000 * j for j in range(args.retrain_seeds)]


def accuracy(net, X, y):
    return float((net.predict(X) == y).mean())


# ------------------------------------------------------------------------- methods


def oof_probs(net, X, y, seed, n_folds=5):
    """Out-of-fold class probabilities of ``net`` (stratified ``n_folds``-fold, seeded):
    what cleanlab's confident learning scores the rows with."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(y), 10))
    for k, (tr, te) in enumerate(StratifiedKFold(n_folds, shuffle=True,
                                                 random_state=seed).split(X, y)):
        probs[te] = fit_net(net, X[tr], y[tr], seed + 1 + k).predict_proba(X[te])
    return probs


def cleanlab_removed(net, X, y, fraction, seed, n_folds=5):
    return cleanlab_select(y, oof_probs(net, X, y, seed, n_folds), fraction)


def cleanlab_select(y, probs, fraction):
    """Confident learning's removed set from out-of-fold ``probs``: ``prune_by_class``
    with each given class's share of ``fraction``, filled up to ``fraction`` of all rows
    by the lowest self-confidence (cleanlab leaves out rows its model predicts as given)."""
    from cleanlab.filter import find_label_issues

    counts = np.bincount(y, minlength=10)
    per_class = [int(np.floor(fraction * c + 0.5)) for c in counts]
    ranked = find_label_issues(y, probs, filter_by="prune_by_class",
                               num_to_remove_per_class=per_class,
                               return_indices_ranked_by="self_confidence")
    k = int(np.floor(fraction * len(y) + 0.5))
    default_found = int(find_label_issues(y, probs).sum())  # CL's own estimate
    chosen = list(ranked[:k])
    if len(chosen) < k:  # fill up with the lowest self-confidence among the rest
        selfconf = probs[np.arange(len(y)), y]
        taken = set(chosen)
        rest = [i for i in np.argsort(selfconf, kind="stable") if i not in taken]
        chosen += rest[:k - len(chosen)]
    removed = np.zeros(len(y), dtype=bool)
    removed[np.asarray(chosen, dtype=np.int64)] = True
    return removed, {"cleanlab_found_prune_by_class": int(len(ranked)),
                     "cleanlab_found_default": default_found}


def hybrid_scores(scores, probs, y):
    """The hybrid ranking of ``oof_cleaning`` and ``table3_tuned``: the rank of each row's
    contribution ``scores`` plus the rank of its out-of-fold probability of the given
    label ``y`` (0-based ranks, ties by position); the lowest are removed."""
    def rank(v):
        return np.argsort(np.argsort(v, kind="stable"), kind="stable")

    return rank(scores) + rank(probs[np.arange(len(y)), y])


def pr(removed, flipped):
    tp = int((removed & flipped).sum())
    return (tp / max(int(removed.sum()), 1), tp / max(int(flipped.sum()), 1))


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
        p, r = pr(removed, flipped) if removed.any() else (float("nan"), 0.0)
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
    cleaner = LabelNoiseCleaner(attr, validation_data=(Xv, yv), fraction=rate,
                                random_state=seed)
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
            cl2 = LabelNoiseCleaner(attr2, validation_data=(Xv, yv), fraction=rate,
                                    stratify=True, n_rounds=args.n_rounds, random_state=seed)
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
            ecl = LabelNoiseCleaner(ens, validation_data=(Xv, yv), fraction=rate,
                                    stratify=rounds > 1, n_rounds=rounds, random_state=seed)
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
            icl = LabelNoiseCleaner(inf, validation_data=(Xv, yv), fraction=rate,
                                    random_state=seed)
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
    lines = ["# Table 3: cleaning label noise (LeNet-5)", "",
             f"Command: `{' '.join(sys.argv)}`", "",
             f"n_train={args.n_train}, n_valid={args.n_valid} (clean, the scoring set), "
             f"n_test={args.n_test}, epochs={args.epochs}, lr={args.lr}, MNIST lr drop at "
             f"epoch {args.milestone}, seed={args.seed}. Paper: 50000/10000/10000, 20 "
             f"epochs, lr 0.01, drop at epoch 5.", "",
             ]
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
    parts = []
    for t in tags:
        f = RESULTS / f"table3_{t}.json"
        if not f.exists():  # raw runs that only feed a merged table live in parts/
            f = RESULTS / "parts" / f"table3_{t}.json"
        if not f.exists():
            raise SystemExit(f"--merge: no results file table3_{t}.json in {RESULTS} "
                             f"or {RESULTS / 'parts'}")
        parts.append(json.loads(f.read_text()))
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
                        "(final_lr, ens_final_lr: HydraAttributor(last_epochs='final_lr'))")
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
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-valid", type=int, default=10000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.01, help="initial lr (paper: 0.01)")
    p.add_argument("--milestone", type=int, default=5,
                   help="MNIST: epoch at which the lr is multiplied by 0.1 (paper: 5)")
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
        save_results(f"table3_{tag}", payload, md)
        print(md)
        return
    if args.quick:
        args.n_train, args.n_valid, args.n_test, args.epochs = 4000, 1000, 2000, 12
        args.lr, args.milestone, args.if_depth = 0.05, 8, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    results = []
    t0 = time.perf_counter()
    tag = args.tag or ("quick" if args.quick else f"n{args.n_train}_e{args.epochs}")
    for dataset in args.datasets:
        for rate in args.rates:
            print(f"== {dataset} r={rate}", flush=True)
            results.append(run_one(args, dataset, rate))
            # saved after every setting, so a long run that is stopped keeps its rows
            payload = run_record("table3_noise_cleaning", args, t0, results=results)
            md = markdown(results, args)
            save_results(f"table3_{tag}", payload, md)
    print(md)


if __name__ == "__main__":
    main()
