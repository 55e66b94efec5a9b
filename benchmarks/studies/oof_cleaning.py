"""Does scoring each row with runs that never trained on it close HYDRA's gap to cleanlab?

Frozen study: its finding is recorded in the docs; rerun it only to check that.

Finding: scoring each row out of fold makes HYDRA less precise, not more (MNIST 80%:
    0.894 against 0.936 in-sample); with identical models, confident learning's edge
    comes from scoring by probability, not from never having trained on the row.
Recorded in: docs/results/cleaning.rst, "Scoring each row out of fold does not help
    HYDRA"; docs/cleaning.rst, "How well it works".
Results (benchmarks/results/): oof_cleaning_n4000_e12.{json,md}

Confident learning (cleanlab) scores every training row with a model from a fold that
left the row out; fast HYDRA scores it along a run that trained on it, where a plausible
wrong label has been fitted. This benchmark gives HYDRA the same out-of-fold view
without leaving its definition:

* the rows are split into ``--folds`` stratified folds; run ``k`` trains on every row
  but gives the rows of fold ``k`` loss weight ``OUT`` (2**-64: below float32's
  resolution against the other rows' terms, so the run is the one without them) while
  they keep their batch slots; that is the contract's ``eps_i = -1/N`` ("drop i, keep
  the batch order"). The training loss and the per-row losses hydrattr replays carry the
  same weights (hydrattr refuses a run whose update is not the gradient of the loss it
  replays), so a fold row's per-sample gradient is exactly ``OUT`` times its own (a
  power of two scales exactly) and its contribution is divided by ``OUT``. The
  recurrence is unchanged: its source term ``(N/B) g_{t,i}`` is the derivative of the
  weight ``(w_i + N eps_i)/B`` whatever ``w_i`` is. So each fold-``k`` row's fast-HYDRA
  contribution in run ``k`` is the derivative at the *without-i* end of the removal,
  where the usual score is the derivative at the *with-i* end. The script first checks
  that giving fold 0 other labels changes no trained weight (the rows are really out);
* rows ``hydra_oof`` (that derivative), ``hydra_in_sample`` (the mean of the other
  ``K - 1`` runs, which trained on the row), ``hydra_both_ends`` (their sum: the
  trapezoid rule over the removal, a better first-order estimate of the leave-one-out
  change than either end) and ``hydra_one_run`` (the usual single run on all rows);
* ``cleanlab`` (``prune_by_class`` on the *same* K runs' out-of-fold probabilities,
  filled up to r% as in ``table3_noise_cleaning.py``) and ``self_confidence`` (the
  out-of-fold probability of the given label), so the models are identical and only the
  score differs;
* ``hybrid_ranks``: the rank of ``hydra_in_sample`` plus the rank of
  ``self_confidence``. Not HYDRA alone: it asks whether the two views of the same runs
  (what the row did to the validation loss while trained on, how plausible its label
  is to a run that never saw it) err on different rows.

Every score removes the rate's lowest within each given class (``stratify=True``), and
the table gives the precision of the removed set against the flipped mask. Fast mode
only: exact mode would need the Hessian of the weighted batch loss, which the replay
does not form for zero-weight rows.

Usage::

    python benchmarks/studies/oof_cleaning.py            # 4,000 rows, MNIST 80% and FMNIST 50%
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (add_run_args, add_setting_args, cleanlab_select, hybrid_scores,  # noqa: E402
                     markdown_head, noisy_setting, parse_settings, publish, run_record, start_run)

from hydrattr import HydraAttributor  # noqa: E402
from hydrattr.cleaning import remove_lowest  # noqa: E402
from hydrattr.models import LeNet5  # noqa: E402


OUT = 2.0 ** -64  # the loss weight of the left-out rows (see the module docstring)


class WeightedLeNet5(LeNet5):
    """LeNet-5 that takes (and ignores) the per-row loss weight ``w`` skorch passes on."""

    def forward(self, x, w=None):
        return super().forward(x)


def weighted_net(net):
    """``net`` (a skorch classifier) whose training loss weights each row by ``X["w"]``.

    The training loss is ``mean(w * per-row loss)`` over the batch, and the per-row
    losses (the criterion's ``reduction='none'``, which is how hydrattr's replay asks for
    them) are ``w * per-row loss``: the loss hydrattr replays is the one trained.
    """
    from skorch import NeuralNetClassifier

    class RowWeightedNet(NeuralNetClassifier):
        def get_loss(self, y_pred, y_true, X=None, training=False):
            crit = self.criterion_
            red = crit.reduction
            if not (training and isinstance(X, dict) and red in ("mean", "none")):
                return super().get_loss(y_pred, y_true, X=X, training=training)
            crit.reduction = "none"
            try:
                loss = super().get_loss(y_pred, y_true, X=X, training=training) * X["w"]
            finally:
                crit.reduction = red
            return loss.mean() if red == "mean" else loss

    params = net.get_params(deep=False)
    params.pop("module")
    return RowWeightedNet(WeightedLeNet5, **params)


def run_setting(args, dataset, rate):
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    d, y, flipped, net = noisy_setting(args, dataset, rate)
    n = len(y)
    X = torch.as_tensor(d.X_train)
    Xv = {"x": torch.as_tensor(d.X_valid), "w": torch.ones(len(d.y_valid))}
    t0 = time.perf_counter()
    one = HydraAttributor(net, mode="fast", random_state=args.seed, verbose=0).fit(d.X_train, y)
    s_one = one.attribute(d.X_valid, d.y_valid, objective="mean")[:, 0]
    del one
    folds = [te for _, te in StratifiedKFold(args.folds, shuffle=True,
                                             random_state=args.seed).split(d.X_train, y)]
    wnet = weighted_net(net)
    # the weight OUT really removes the rows: other labels on fold 0 give the same run
    w0 = torch.ones(n)
    w0[folds[0]] = OUT
    y_other = y.copy()
    y_other[folds[0]] = (y_other[folds[0]] + 1) % 10
    trained = []
    for labels in (y, y_other):
        torch.manual_seed(args.seed)
        m = clone(wnet).fit({"x": X, "w": w0}, labels)
        trained.append(torch.cat([q.detach().reshape(-1) for q in m.module_.parameters()]))
    check = float((trained[0] - trained[1]).abs().max())
    if check != 0.0:
        raise SystemExit(f"rows of weight {OUT:g} changed the trained weights (max |diff| "
                         f"{check})")
    S = np.zeros((args.folds, n))
    probs = np.zeros((n, 10))
    for k, te in enumerate(folds):
        w = torch.ones(n)
        w[te] = OUT
        a = HydraAttributor(wnet, mode="fast", random_state=args.seed + 1 + k, verbose=0)
        a.fit({"x": X, "w": w}, y)
        S[k] = a.attribute(Xv, d.y_valid, objective="mean")[:, 0]
        S[k, te] /= OUT  # the fold rows' own gradients carried weight OUT
        probs[te] = a.net_.predict_proba({"x": X[te], "w": w[te]})
        print(f"  {dataset} r={rate:.0%} fold {k}: {time.perf_counter() - t0:.0f} s", flush=True)
    oof, ins = np.zeros(n), np.zeros(n)
    for k, te in enumerate(folds):
        oof[te] = S[k, te]
        ins[te] = np.delete(S[:, te], k, axis=0).mean(0)
    cl, _ = cleanlab_select(y, probs, rate)

    selfconf = probs[np.arange(n), y]

    def prec(s):
        return float(flipped[remove_lowest(s, rate, y)].mean())

    rows = [{"method": "hydra_one_run", "precision": prec(s_one)},
            {"method": "hydra_oof", "precision": prec(oof)},
            {"method": "hydra_in_sample", "precision": prec(ins)},
            {"method": "hydra_both_ends", "precision": prec(oof + ins)},
            {"method": "self_confidence", "precision": prec(selfconf)},
            {"method": "cleanlab", "precision": float(flipped[cl].mean())},
            {"method": "hybrid_ranks", "precision": prec(hybrid_scores(ins, probs, y))}]
    return {"dataset": dataset, "rate": rate, "rows": rows,
            "pearson_oof_in_sample": float(np.corrcoef(oof, ins)[0, 1]),
            "zero_weight_check_max_abs_diff": check,
            "fit_and_score_s": time.perf_counter() - t0}


def markdown(results, args):
    settings = (f"n_train={args.n_train}, n_valid={args.n_valid}, epochs={args.epochs}, "
                f"lr={args.lr}, MNIST lr drop at epoch {args.milestone}, {args.folds} folds, "
                f"seed={args.seed}; precision of the removed set (the rate's lowest scores "
                f"within each given class).")
    lines = markdown_head("Out-of-fold HYDRA against cleanlab on the same runs", settings) + [
        "| dataset | r | " + " | ".join(r["method"] for r in results[0]["rows"]) + " |",
        "|---|---|" + "---|" * len(results[0]["rows"])]
    for res in results:
        lines.append(f"| {res['dataset']} | {res['rate']:.0%} | "
                     + " | ".join(f"{r['precision']:.4f}" for r in res["rows"]) + " |")
    lines += ["", "Pearson correlation of the out-of-fold and in-sample scores: "
              + ", ".join(f"{r['dataset']} {r['rate']:.0%} {r['pearson_oof_in_sample']:.3f}"
                          for r in results) + ". Zero-weight check (other labels on fold "
              "0, largest change of a trained weight): "
              + ", ".join(f"{r['zero_weight_check_max_abs_diff']:g}" for r in results) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["mnist:0.8", "fashion-mnist:0.5"],
                   help="dataset:rate pairs")
    add_setting_args(p, "table3_quick", skip=("n_test",))
    p.add_argument("--folds", type=int, default=5)
    add_run_args(p, work=False)
    args = p.parse_args(argv)
    settings = parse_settings(p, args.settings)
    if args.folds < 2:
        p.error(f"--folds must be at least 2, got {args.folds}")
    start_run(args)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="cleanlab")
    results = [run_setting(args, ds, r) for ds, r in settings]
    tag = args.tag or f"n{args.n_train}_e{args.epochs}"
    payload = run_record("oof_cleaning", args, results=results)
    md = markdown(results, args)
    publish(f"oof_cleaning_{tag}", payload, md)


if __name__ == "__main__":
    main()
