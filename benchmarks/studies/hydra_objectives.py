"""Which fast-HYDRA objective ranks wrong labels best? (reduced Table 3 settings)

Frozen study: its finding is recorded in the docs; rerun it only to check that.

Finding: of the readouts of one fast-HYDRA run, only truncating the hypergradient to the
    final learning-rate phase gains clearly (MNIST 80%: 0.944 against 0.929 per class),
    which made last_epochs="final_lr" the default attributor of
    LabelNoiseCleaner(score_by="contribution"); truncating exact mode does not rescue it at
    50% noise.
Recorded in: docs/results/cleaning.rst, "Which readout of one run ranks wrong labels
    best" and "Exact mode as a cleaner"; docs/cleaning.rst, "What to score: the final
    learning-rate phase".
Results (benchmarks/results/): hydra_objectives_quick.{json,md},
    hydra_objectives_exact_quick.{json,md}

``LabelNoiseCleaner`` scores each training row by its fast-HYDRA contribution to the
*mean* validation loss of the *trained* network. This benchmark asks whether another
objective built from the same trajectory separates wrong labels better, measured by the
precision of the removed set at the noise rate r (the quantity Table 3's precision
target is about; no retraining). Variants, all from one fast-HYDRA fit per seed:

* ``mean``: the cleaner's score (the mean column of ``C``).
* aggregations of the per-validation-point columns ``C[:, j]``:
  ``class_balanced`` (mean of the ten class means), ``equal_weight`` (each column scaled
  to unit norm first, so validation points with large gradients do not dominate),
  ``sign_vote`` (share of validation points helped minus hurt), ``median``,
  ``same_class`` (only validation points of the row's given label) and
  ``other_classes`` (only the others).
* checkpoint objectives: the validation loss after epoch ``k`` instead of after training,
  ``epoch1`` and ``all_epochs`` (the sum over every epoch's checkpoint, the area under
  the validation curve). They come from one reverse fast sweep whose objective rows are
  injected at the epoch boundaries; its last row must equal ``mean`` (checked).
* truncated hypergradients (the sample weights act only late in training, the same
  final objective): ``last_<k>_epochs`` from the same sweep's split of ``mean`` by the
  epoch of each step, and ``final_lr``, the epochs since the learning rate last changed,
  computed by the package (``HydraAttributor(last_epochs="final_lr")``) and checked
  against the sweep's split.
* with ``--exact``: ``exact``, ``exact_final_lr`` and ``exact_last_<k>_epochs``, the
  exact hypergradient (``mode="exact"``, Hessian kept) of the same recorded run, whole
  and truncated like the fast readouts.
* ``cleanlab``: confident learning on 5-fold out-of-fold probabilities of the same
  network (Table 3's peer), for reference.

Each variant removes the r% lowest scores overall and per given class, and the precision
against the flipped mask is reported as mean and standard deviation over ``--seeds``
(each seed draws its own data split, noise and training order).

Usage::

    python benchmarks/studies/hydra_objectives.py --quick
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
from _common import (add_run_args, add_setting_args, apply_preset, cleanlab_select,  # noqa: E402
                     markdown_head, noisy_setting, oof_probs, parse_settings, precision_recall,
                     publish, run_record)

from hydrattr import HydraAttributor  # noqa: E402
from hydrattr._core.functional import per_sample_grads  # noqa: E402
from hydrattr._core.sweep import exact_adjoint  # noqa: E402
from hydrattr._skorch import module_mode  # noqa: E402
from hydrattr.cleaning import remove_lowest  # noqa: E402


def mean_loss_grad(loss_fn, theta, X, y, batch_size=500):
    """Gradient of the mean loss over ``(X, y)`` at flat parameters ``theta``."""
    g = torch.zeros_like(theta)
    for s in range(0, len(X), batch_size):
        x, t = torch.as_tensor(X[s:s + batch_size]), torch.as_tensor(y[s:s + batch_size])
        g += per_sample_grads(loss_fn, theta, x, t, independent=True).sum(0)
    return g / len(X)


def checkpoint_contributions(attr, X, y, checkpoints):
    """Fast-mode contributions to the mean loss on ``(X, y)`` at each checkpoint.

    ``checkpoints`` are step counts (the parameters after that many steps); the last
    must be the end of training. One reverse sweep with the Hessian dropped (the fast
    mode's adjoint: ``exact_adjoint(hessian=False)``, its adjoints carried in float64 as
    the fast mode's coefficients are) carries one objective row per
    checkpoint, each added as the sweep passes its checkpoint (the sweep's ``on_step``
    hook). Returns ``C`` of shape ``(n_train, len(checkpoints))`` and ``B`` of the same
    shape: the final objective's contributions split by the interval between checkpoints
    whose steps carried them (the same hook sorts each step's terms; ``B.sum(1) ==
    C[:, -1]``; with epoch checkpoints, ``B[:, -k:].sum(1)`` is
    ``HydraAttributor(last_epochs=k)``'s score).
    """
    traj = attr.trajectory_
    loss_fn, data_fn = attr._loss_fn(), attr._data_fn()
    n_steps, m = len(traj), len(checkpoints)
    if checkpoints[-1] != n_steps:
        raise ValueError(f"the last checkpoint must be the end of training ({n_steps} "
                         f"steps), got {checkpoints[-1]}")
    theta_T = traj.theta_final

    def rows(k, c):  # the objective at theta_c in row k, the other rows zero
        G = torch.zeros(m, theta_T.numel(), dtype=theta_T.dtype)
        G[k] = mean_loss_grad(loss_fn, theta_T if c == n_steps else traj.theta(c), X, y)
        return G

    with module_mode(attr.net_.module_, training=False):
        inject = {c: rows(k, c) for k, c in enumerate(checkpoints[:-1])}
        G_T = rows(m - 1, n_steps)
    col = np.searchsorted(np.asarray(checkpoints), np.arange(n_steps), side="right")
    D_split = torch.zeros(len(attr.rows_), m, int(col.max()) + 1, dtype=torch.float64)

    def on_step(t, theta_bar, slots, terms):
        D_split[torch.as_tensor(slots), :, col[t]] += terms
        if t in inject:  # theta_bar is the adjoint of theta(t): the checkpoint's loss
            return theta_bar + inject[t].to(theta_bar.device, theta_bar.dtype)
        return None

    with module_mode(attr.net_.module_, training=True):
        D = exact_adjoint(traj, loss_fn, data_fn, G_T, attr._rows_map, len(attr.rows_),
                          hessian=False, on_step=on_step,
                          adjoint_dtype=torch.float64).numpy()
    C = np.full((traj.n_rows, m), np.nan)
    B = np.full((traj.n_rows, m), np.nan)
    C[attr.rows_], B[attr.rows_] = -D, -D_split[:, -1, :].numpy()
    return C, B


def variants(C, yv, y, C_ckpt, B, windows, s_final_lr):
    """Every score variant of one fit, as ``{name: (n_train,) scores}``; ``C`` is one
    column per validation point, or only the mean column (no aggregations then)."""
    K = 10
    out = {"mean": C.mean(1)}
    if C.shape[1] > 1:
        M = np.stack([C[:, yv == k].mean(1) for k in range(K)], 1)
        same = M[np.arange(len(y)), y]
        out.update({
            "class_balanced": M.mean(1),
            "equal_weight": (C / np.linalg.norm(C, axis=0, keepdims=True)).mean(1),
            "sign_vote": np.sign(C).mean(1),
            "median": np.median(C, 1),
            "same_class": same,
            "other_classes": (M.sum(1) - same) / (K - 1),
        })
    return {
        **out,
        "epoch1": C_ckpt[:, 0],
        "all_epochs": C_ckpt.sum(1),
        **{f"last_{k}_epochs": B[:, -k:].sum(1) for k in windows if k < B.shape[1]},
        "final_lr": s_final_lr,
    }


def check_gap(a, b, k=10):
    """``(k-th largest, largest)`` row gap ``|a - b|`` relative to ``max |b|``.

    The sweep and the replays are the same sums evaluated differently in float32, and a
    float32 evaluation can put a pre-activation within rounding of zero on the other side
    of a ReLU. At 50,000 rows (MNIST, 50% noise) one row's term at one step came out 1.4%
    apart that way (the batched forward-mode dot against the per-sample gradient; float64
    agrees with the latter), 1.3e-4 of the largest score, while every other row agreed to
    2e-5. The k-th largest gap ignores up to k - 1 such rows; a lost step (64 rows) or a
    window off by an epoch (every row, by 10% or more at 50,000 rows) still fails it.
    """
    g = np.sort(np.abs(a - b))[::-1] / np.abs(b).max()
    return float(g[min(k, len(g)) - 1]), float(g[0])


def run_seed(args, dataset, rate, seed):
    args.seed = seed
    d, y, flipped, net = noisy_setting(args, dataset, rate)
    Xv, yv = d.X_valid, d.y_valid.astype(np.int64)
    attr = HydraAttributor(net, mode="fast", storage="replay", random_state=seed, verbose=0)
    attr.fit(d.X_train, y)
    C = attr.attribute(Xv, yv, objective="mean" if args.no_columns else "per_sample")
    per_epoch = len(attr.trajectory_) // args.epochs
    checkpoints = [per_epoch * (e + 1) for e in range(args.epochs)]
    if checkpoints[-1] != len(attr.trajectory_):
        raise RuntimeError("steps per epoch differ between epochs; use train_split=None "
                           "and full epochs")
    C_ckpt, B = checkpoint_contributions(attr, Xv, yv, checkpoints)
    # the package's truncated hypergradient (a replay of the window only) against the
    # sweep's per-epoch split of the same fast scores
    s_final_lr = attr.set_params(last_epochs="final_lr").attribute(
        Xv, yv, objective="mean")[:, 0]
    k_final = int(np.searchsorted(checkpoints, attr.window_start_, side="right"))
    attr.set_params(last_epochs=None)
    gaps = [check_gap(C_ckpt[:, -1], C.mean(1)),
            check_gap(B[:, k_final:].sum(1), s_final_lr)]
    err, err_max = max(g[0] for g in gaps), max(g[1] for g in gaps)
    if err > 1e-4:
        raise RuntimeError(f"checkpoint sweep differs from the fast scores (10th largest "
                           f"row gap {err:.2e} of the largest score)")
    scores = variants(C, yv, y, C_ckpt, B, args.windows, s_final_lr)
    if args.exact:  # the exact hypergradient of the same run, whole and truncated
        for name, k in [("exact", None), ("exact_final_lr", "final_lr"),
                        *[(f"exact_last_{w}_epochs", w) for w in args.windows
                          if w < args.epochs]]:
            attr.set_params(mode="exact", last_epochs=k)
            scores[name] = attr.attribute(Xv, yv, objective="mean")[:, 0]
        attr.set_params(mode="fast", last_epochs=None)
    out = {}
    for name, s in scores.items():
        out[name] = (precision_recall(remove_lowest(s, rate), flipped)[0],
                     precision_recall(remove_lowest(s, rate, y), flipped)[0])
    if not args.no_cleanlab:
        removed = cleanlab_select(y, oof_probs(net, d.X_train, y, seed), rate)[0]
        p = precision_recall(removed, flipped)[0]
        out["cleanlab"] = (p, p)
    return out, (err, err_max), len(checkpoints) - k_final


def _mean_sd(values):
    """``mean ± sd`` (sample sd; 0 for one seed) to four decimals."""
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4f} ± {sd:.4f}"


def markdown(results, args):
    lines = markdown_head(
        "Which fast-HYDRA objective ranks wrong labels best?",
        f"n_train={args.n_train}, n_valid={args.n_valid} (clean, the scoring set), "
        f"epochs={args.epochs}, lr={args.lr}, seeds={args.seeds} (each: its own split, "
        "noise and training order). Precision of the removed set (the r% lowest "
        "scores, overall and per given class) against the flipped rows, mean ± sd "
        "over seeds; no retraining. `mean` is `LabelNoiseCleaner`'s score.")
    for res in results:
        lines += [f"## {res['dataset']}, r = {res['rate']:.0%}", "",
                  "| score | precision overall | precision per class |", "|---|---|---|"]
        for name, v in res["precision"].items():
            lines.append(f"| {name} | " + " | ".join(_mean_sd(p) for p in np.array(v).T) + " |")
        lines += ["", f"`final_lr` (`HydraAttributor(last_epochs=\"final_lr\")`) covered the "
                      f"last {res['final_lr_epochs']} epochs (per seed). Gap between the "
                      f"checkpoint sweep and the fast scores (its last row against `mean`, "
                      f"its per-epoch split of the final phase against `final_lr`), relative "
                      f"to the largest score: 10th largest row "
                      f"{max(res['check_rel_err']):.1e}, largest "
                      f"{max(res['check_max_rel_err']):.1e}.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="4,000/1,000 rows, 12 epochs, lr 0.05 (Table 3's --quick)")
    p.add_argument("--settings", nargs="+", default=["mnist:0.8", "fashion-mnist:0.5"],
                   metavar="DATASET:RATE")
    p.add_argument("--seeds", type=int, default=3)
    add_setting_args(p, "table3_quick", skip=("n_test",))
    p.add_argument("--no-cleanlab", action="store_true")
    p.add_argument("--no-columns", action="store_true",
                   help="score the mean validation loss only (no per-validation-point "
                        "columns, so none of their aggregations): for the paper's size, "
                        "where 10,000 columns would cost a replay each block")
    p.add_argument("--windows", nargs="+", type=int, default=[1, 2, 4, 8],
                   help="last_<k>_epochs variants: the fast scores of the last k epochs' "
                        "steps only (HydraAttributor(last_epochs=k))")
    p.add_argument("--exact", action="store_true",
                   help="also the exact hypergradient (mode='exact') of the same run: "
                        "whole, final_lr and last_<k>_epochs")
    add_run_args(p, work=False)
    args = p.parse_args(argv)
    settings = parse_settings(p, args.settings)
    if args.quick:
        apply_preset(args, "table3_quick")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0, base_seed, results = time.perf_counter(), args.seed, []
    for dataset, rate in settings:
        res = {"dataset": dataset, "rate": rate, "precision": {}, "check_rel_err": [],
               "check_max_rel_err": [], "final_lr_epochs": []}
        for j in range(args.seeds):
            out, (err, err_max), k = run_seed(args, dataset, rate, base_seed + j)
            res["check_rel_err"].append(err)
            res["check_max_rel_err"].append(err_max)
            res["final_lr_epochs"].append(k)
            for name, v in out.items():
                res["precision"].setdefault(name, []).append(v)
            print(f"{dataset} r={rate} seed {base_seed + j}: " +
                  ", ".join(f"{k} {v[1]:.4f}" for k, v in out.items()), flush=True)
        results.append(res)
    args.seed = base_seed
    payload = run_record("hydra_objectives", args, t0, results=results)
    md = markdown(results, args)
    tag = args.tag or ("quick" if args.quick else f"n{args.n_train}_e{args.epochs}")
    publish(f"hydra_objectives_{tag}", payload, md)


if __name__ == "__main__":
    main()
