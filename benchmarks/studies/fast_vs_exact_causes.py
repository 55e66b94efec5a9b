"""Why fast and exact HYDRA part in our runs of the paper's Figures 3-5 (issue 31).

Frozen study: its finding is recorded in the docs; rerun it only to check that.

Finding: none of the candidate readings reproduces the paper's 0.986, and no bug was found
    (forward recurrences against the sweeps 1e-6; Algorithm 1 run literally equals fast
    mode to 3e-7: the printed algorithm *is* the Hessian-free recurrence). Fast and exact
    agree (Spearman >= 0.99) only while the integrated curvature of the attributed window,
    sum_t eta_t lambda_max / (1 - p), is about 1 or less: epoch 1 of the paper schedule
    (1.0: 0.995), or lr 0.001 on the loss plateau, where the net learns nothing (0.8:
    0.996). Past it every measure parts (2.3: 0.89; 5.4: 0.35; 170 and more: about 0),
    stable or not: eta lambda_max stays 0.003-0.99, far below the heavy-ball limit 3.8,
    and after the plateau at lr 0.001 (no growth at all) Spearman is 0.09. The exact
    tangent does not blow up (it stays smaller than the fast one); the Hessian term pulls
    back what a sample pushed along curved directions, so exact contributions are 1/18
    to 1/60 of the fast ones. No-momentum and Hessian-outside-momentum recurrences, and a
    Hessian term scaled to 1/64, part from fast mode too (0.18, 0.19, 0.44). At the
    paper's size (50,000 rows, second epoch) Spearman is 0.005 (lr 0.01) and 0.046 (lr
    0.001).
Recorded in: docs/results/paper.rst, "Figures 3-5: fast against exact HYDRA".
Results (benchmarks/results/): fast_vs_exact_causes_quick.{json,md} (``--quick``),
    fast_vs_exact_causes_n50000_e2_window.{json,md} (``--n-train 50000 --epochs 2
    --drop-epoch 1 --window-only --runs paper drop --tag n50000_e2_window``)

The paper (Chen et al., AAAI 2021, Figures 3-5) reports fast HYDRA (Hessian term dropped)
agreeing with the Hessian-aware recurrence at Spearman 0.986 / sign error 0.014 on
Fashion-MNIST LeNet-5; ``accuracy/fig_fast_vs_exact.py --quick`` finds 0.011 against our
exact mode, which equals finite differences of training. This study puts the candidate
explanations side by side on one recorded run, each against the verified exact mode:

1. **Algorithm 1 as printed** (main paper): ``dv <- p dv + lam nabla (+ N/B g_i if the
   batch holds i); nabla <- nabla - eta dv``, run literally in the paper's units
   (``nabla = d theta / d eps``, fixed ``B``): ``alg1`` with ``g_i`` at the step's
   weights, ``alg1_shifted`` with ``g_{t,i}`` read as the gradient at the weights after
   the step, ``alg1_swapped`` with the sample's term in the *other* branch. Each against
   the package's fast mode (divided by ``N``).
2. **No momentum coupling**: the vanilla-GD recurrence (paper eq. 10,
   ``nabla <- nabla - eta (H nabla + lam nabla + g_i)``) on the momentum run, with
   (``nomom_exact``) and without (``nomom_fast``) the Hessian; and ``hess_outside``, the
   momentum recurrence with the Hessian term applied to ``theta`` directly instead of
   through the velocity.
3. **What is compared**: for the forward-tracked rows, the hypergradient vectors
   ``d theta_T / d eps_i`` (relative and absolute l2 error as in Figure 3, sign
   disagreement and Spearman over the 61,706 coordinates, cosine) and the scalar
   contributions (to every test point's loss, pooled over (row, test point) pairs, and
   per row over test points); for every training row, the contribution to the mean test
   loss at every epoch (one exact adjoint sweep with a checkpoint objective per epoch,
   fast mode per checkpoint), as ``fig_fast_vs_exact``.
4. **Stability**: the largest and smallest Hessian eigenvalues (Lanczos with HVPs,
   ``hydrattr._core.solvers.lanczos_eigenpairs``) of the mid-epoch mini-batch loss and
   of a fixed subset's loss, the heavy-ball growth factor per step they imply (largest
   root modulus of ``z^2 - (1 + p - eta (h + lam)) z + p``; above 1 when
   ``eta h > 2 (1 + p)`` or ``h + lam < 0``), against the measured growth of random
   vectors pushed through the exact homogeneous tangent map (largest Lyapunov exponent)
   and of the exact tangents themselves; and the same comparison at a 10x smaller
   learning rate, from the start (``lr0.001``) and after the loss plateau (``drop``:
   lr x0.1 at ``--drop-epoch``; its final phase compared with the same window of the
   ``paper`` run).

Runs (``--runs``): ``paper`` (lr 0.01, x0.5 on 2-epoch plateaus of train + validation
loss: the paper's Fashion-MNIST schedule, every variant above, and the Hessian term
scaled by 1/8 and 1/64), ``lr0.001`` and ``drop`` (fast, exact and the Lyapunov probes
only). "Integrated curvature" is ``sum_t eta_t lambda_max / (1 - p)`` over the attributed
steps, with the subset's ``lambda_max`` measured mid-epoch. ``--window-only`` keeps only
the truncated-window comparison and the mid-window spectrum (runs at the paper's size).

Usage::

    python benchmarks/studies/fast_vs_exact_causes.py --quick
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (add_data_arg, bench_parser, cleaning_net, load_split,  # noqa: E402
                     markdown_head, paper_lenet, publish, run_record, step_schedule, tagged)

PAPER = {"spearman": 0.986, "sign_error": 0.014, "tangent_error_plateau": 0.74}
RUNS = ("paper", "lr0.001", "drop")
HESSIAN_SETS = ("exact", "exact_h8", "exact_h64", "nomom_exact", "hess_outside", "probe",
                "probe_nomom")
HESSIAN_SCALE = {"exact_h8": 1 / 8, "exact_h64": 1 / 64}
# (approximation, reference) pairs compared at every epoch end
PAIRS = (("fast", "exact"), ("alg1", "fast"), ("alg1_shifted", "fast"),
         ("alg1_swapped", "fast"), ("nomom_fast", "nomom_exact"), ("fast", "nomom_exact"),
         ("fast", "hess_outside"), ("nomom_exact", "exact"), ("hess_outside", "exact"),
         ("fast", "exact_h8"), ("fast", "exact_h64"))
BASE_PAIRS = (("fast", "exact"),)


def make_net(run, args, data):
    if run == "drop":
        return paper_lenet(args.epochs, lr=0.01, module__n_classes=10,
                           callbacks=[step_schedule(args.drop_epoch, 0.1)])
    lr = 0.001 if run == "lr0.001" else 0.01
    return cleaning_net("fashion-mnist", args.epochs, data.X_valid, data.y_valid, lr=lr)


def spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a, dtype=np.float64).ravel(),
                           np.asarray(b, dtype=np.float64).ravel())[0])


def scalar_compare(a, b):
    """``a`` (approximation) against ``b`` (reference): Spearman, sign error, rel. l2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return {"spearman": spearman(a, b), "sign_error": float(np.mean(np.sign(a) != np.sign(b))),
            "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))}


def vector_compare(A, B, n_train):
    """Per-row comparison of tangents ``A`` against ``B`` (rows ``(1/N) d theta/d eps``),
    averaged over rows: Figure 3's l2 error in the paper's units (``N *``), relative error,
    sign disagreement and Spearman over coordinates, cosine."""
    A, B = A.double(), B.double()
    diff = (A - B).norm(dim=1)
    nb = B.norm(dim=1).clamp_min(1e-300)
    cos = (A * B).sum(1) / (A.norm(dim=1).clamp_min(1e-300) * nb)
    sgn, top = [], []
    for a, b in zip(A, B):
        nz = (a != 0) & (b != 0)  # exact zeros (parameters a row never reaches) left out
        sgn.append(float((torch.sign(a[nz]) != torch.sign(b[nz])).double().mean()))
        big = b.abs() >= torch.quantile(b.abs().float(), 0.9).double()
        top.append(float((torch.sign(a[big]) != torch.sign(b[big])).double().mean()))
    return {"l2_error_paper_units": float(n_train * diff.mean()),
            "rel_error": float((diff / nb).mean()),
            "coord_sign_error": float(np.mean(sgn)),
            "coord_sign_error_top10": float(np.mean(top)),
            "coord_spearman": float(np.mean([spearman(a.numpy(), b.numpy())
                                             for a, b in zip(A, B)])),
            "cosine": float(cos.mean())}


def test_grads(att, theta, Xt, yt, batch=250):
    """Per-sample test-loss gradients at ``theta`` (eval mode), ``(m, P)`` float32."""
    from hydrattr._core.functional import per_sample_grads
    from hydrattr._skorch import module_mode

    loss_fn = att._loss_fn()
    with module_mode(att.net_.module_, training=False):
        return torch.cat([per_sample_grads(loss_fn, theta, Xt[s:s + batch], yt[s:s + batch])
                          for s in range(0, len(Xt), batch)])


def heavy_ball_rate(h, eta, p, lam):
    """Largest root modulus of the heavy-ball map on curvature ``h`` (per-step growth)."""
    b = 1 + p - eta * (h + lam)
    disc = b * b - 4 * p
    if disc < 0:
        return math.sqrt(p)
    return max(abs((b + math.sqrt(disc)) / 2), abs((b - math.sqrt(disc)) / 2))


def lanczos_extremes(hvp, n_params, n_iter, seed):
    """Smallest and largest Ritz values after ``n_iter`` Lanczos steps."""
    from hydrattr._core.solvers import lanczos_eigenpairs

    g = torch.Generator().manual_seed(seed)
    ev, _ = lanczos_eigenpairs(hvp, n_params, rank=n_iter, n_iter=n_iter, generator=g)
    return float(ev.min()), float(ev.max())


def spectra(att, t, X_sub, y_sub, n_iter):
    """Hessian extremes at step ``t``'s weights: its mini-batch loss and a fixed subset's."""
    from hydrattr._core.functional import batch_products

    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    theta, P = traj.theta(t), traj.spec.n_params
    x, y = data_fn(traj.indices[t])
    w = torch.full((len(x),), traj.weights[t], dtype=theta.dtype)

    def hvp_batch(V):
        return batch_products(loss_fn, theta, x, y, w, V.to(theta.dtype),
                              rng_state=traj.rng_states[t])[1].double()

    def hvp_sub(V):
        out = 0
        for s in range(0, len(X_sub), 128):
            xs, ys = X_sub[s:s + 128], y_sub[s:s + 128]
            ws = torch.full((len(xs),), 1.0 / len(X_sub), dtype=theta.dtype)
            out = out + batch_products(loss_fn, theta, xs, ys, ws, V.to(theta.dtype))[1].double()
        return out

    bmin, bmax = lanczos_extremes(hvp_batch, P, n_iter, seed=t)
    smin, smax = lanczos_extremes(hvp_sub, P, n_iter, seed=t + 1)
    return {"step": t, "batch_min": bmin, "batch_max": bmax, "subset_min": smin,
            "subset_max": smax}


def epoch_scalars(att, ends, G_mean):
    """Contributions of every row to the mean test loss at every epoch end: exact (one
    adjoint sweep, a checkpoint objective per epoch added by ``on_step``) and fast (the
    package's replay of each checkpoint's head). Returns two ``(N, n_epochs)`` arrays."""
    from hydrattr._core.sweep import exact_adjoint, fast_replay
    from hydrattr._skorch import module_mode

    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    N, E = att.n_train_, len(ends)
    rows_map = np.arange(N)
    G0 = torch.zeros(E, traj.spec.n_params, dtype=torch.float64)
    G0[E - 1] = G_mean[E - 1].double()
    inject = {int(ends[k]): k for k in range(E - 1)}

    def hook(t, theta_bar, slots, terms):
        if t in inject:
            tb = theta_bar.clone()
            tb[inject[t]] += G_mean[inject[t]].to(tb.dtype)
            return tb
        return None

    with module_mode(att.net_.module_, training=True):
        ce = -exact_adjoint(traj, loss_fn, data_fn, G0.float(), rows_map, N,
                            adjoint_dtype=torch.float64, on_step=hook).numpy()
        cf = np.stack([-fast_replay(traj.head(int(ends[k])), loss_fn, data_fn,
                                    G_mean[k][None].float(), rows_map, N)[:, 0].numpy()
                       for k in range(E)], axis=1)
    return ce, cf


def window_scalars(att, start, G):
    """Exact and fast contributions to the final mean test loss with the sample weights
    acting from step ``start`` on (``HydraAttributor(last_epochs=...)``)."""
    from hydrattr._core.sweep import exact_adjoint, fast_replay
    from hydrattr._skorch import module_mode

    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    N = att.n_train_
    with module_mode(att.net_.module_, training=True):
        ce = -exact_adjoint(traj, loss_fn, data_fn, G[None].float(), np.arange(N), N,
                            adjoint_dtype=torch.float64, start=start)[:, 0].numpy()
        cf = -fast_replay(traj, loss_fn, data_fn, G[None].float(), np.arange(N), N,
                          start=start)[:, 0].numpy()
    return ce, cf


def forward_study(att, rows, ends, Xt, yt, variants, n_probes, X_sub, y_sub, n_iter,
                  batch_size, progress=True):
    """The forward recurrences of every variant for the tracked ``rows``, the Lyapunov
    probes and the Hessian spectra, evaluated at every epoch end."""
    from hydrattr._core.functional import batch_products, per_sample_grads
    from hydrattr._core.steps import steps_for
    from hydrattr._skorch import module_mode

    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    steps, N, P, T = steps_for(traj), att.n_train_, traj.spec.n_params, len(traj)
    expand = traj.spec.expand
    k = len(rows)
    Xr, yr = data_fn(np.asarray(rows))
    pos = {int(r): j for j, r in enumerate(rows)}
    names = ["exact", "fast", "probe"]
    if variants:
        names += ["exact_h8", "exact_h64", "nomom_exact", "nomom_fast", "hess_outside",
                  "alg1", "alg1_shifted",
                  "alg1_swapped", "probe_nomom"]
    # probes start as the per-sample gradients of random rows at theta_0 (unit norm): in
    # the span the tangents live in, not in the near-null space of a random direction
    pr = np.random.RandomState(3).choice(N, n_probes, replace=False)
    g0 = torch.nn.functional.normalize(per_sample_grads(loss_fn, traj.theta(0),
                                                        *data_fn(pr)), dim=1)
    X = {n: (g0.clone() if n.startswith("probe") else torch.zeros(k, P)) for n in names}
    V = {n: torch.zeros_like(X[n]) for n in names}  # velocity tangents (momentum sets)
    hess = [n for n in HESSIAN_SETS if n in names]
    ends_set = {int(e): i for i, e in enumerate(ends)}
    starts = [0] + [int(e) for e in ends[:-1]]
    mids = {(s + int(e)) // 2: i for i, (s, e) in enumerate(zip(starts, ends))}
    per_epoch, spec_rows, growth = [], [], {n: [] for n in names if n.startswith("probe")}
    norms_prev = {n: X[n].double().norm(dim=1) for n in growth}
    prev_norm = {}
    with module_mode(att.net_.module_, training=True):
        for t in range(T):
            idx = traj.indices[t]
            x, y = data_fn(idx)
            theta = traj.theta(t)
            h = traj.hyper.at(t)
            eta, lam = expand(h["lr"]).float(), expand(h["weight_decay"]).float()
            p, keep = float(h["momentum"][0]), float(h["momentum"][0]) * (not bool(h["first"][0]))
            w = torch.full((len(idx),), traj.weights[t], dtype=theta.dtype)
            if t in mids:
                spec_rows.append(spectra(att, t, X_sub, y_sub, n_iter))
                sr = spec_rows[-1]
                lr_t, wd_t = float(h["lr"][0]), float(h["weight_decay"][0])
                for key in ("batch_min", "batch_max", "subset_min", "subset_max"):
                    sr[f"rate_{key}"] = heavy_ball_rate(sr[key], lr_t, p, wd_t)
                sr["eta_max_subset"] = lr_t * sr["subset_max"]
                sr["eta_max_batch"] = lr_t * sr["batch_max"]
                sr["stability_limit"] = 2 * (1 + p)
                sr["momentum"] = p
                sr["epoch"] = mids[t] + 1
            stack = torch.cat([X[n] for n in hess])
            _, HV, _ = batch_products(loss_fn, theta, x, y, w, stack,
                                      rng_state=traj.rng_states[t])
            hv = dict(zip(hess, torch.split(HV, [len(X[n]) for n in hess])))
            g_rows = per_sample_grads(loss_fn, theta, Xr, yr)  # every tracked row, at theta
            in_b = torch.zeros(k, 1)
            for r in idx:
                if int(r) in pos:
                    in_b[pos[int(r)]] = 1.0
            inj = traj.weights[t] * g_rows * in_b  # (1/N) units: N * w_t * g / N
            # the package's algebra (verified): exact and fast
            X["exact"], V["exact"] = steps.tangent(t, X["exact"], V["exact"],
                                                   hv["exact"] + inj, None)
            X["fast"], V["fast"] = steps.tangent(t, X["fast"], V["fast"], inj, None)
            X["probe"], V["probe"] = steps.tangent(t, X["probe"], V["probe"], hv["probe"],
                                                   None)
            if variants:
                for n, sc in HESSIAN_SCALE.items():  # the Hessian term scaled down
                    X[n], V[n] = steps.tangent(t, X[n], V[n], sc * hv[n] + inj, None)
                # vanilla-GD recurrence (eq. 10) on the momentum run
                X["nomom_exact"] = X["nomom_exact"] - eta * (hv["nomom_exact"] + inj
                                                             + lam * X["nomom_exact"])
                X["nomom_fast"] = X["nomom_fast"] - eta * (inj + lam * X["nomom_fast"])
                X["probe_nomom"] = X["probe_nomom"] - eta * (hv["probe_nomom"]
                                                             + lam * X["probe_nomom"])
                # momentum recurrence, Hessian term on theta instead of through v
                xo, V["hess_outside"] = steps.tangent(t, X["hess_outside"], V["hess_outside"],
                                                      inj, None)
                X["hess_outside"] = xo - eta * hv["hess_outside"]
                # Algorithm 1 as printed, in the paper's units (nabla = d theta / d eps)
                nb = N / batch_size
                g_after = None
                if in_b.any():
                    th1 = traj.theta(t + 1) if t + 1 < T else traj.theta_final
                    g_after = per_sample_grads(loss_fn, th1, Xr, yr)
                for name, g_in in (("alg1", nb * g_rows * in_b),
                                   ("alg1_shifted", nb * g_after * in_b if g_after is not None
                                    else torch.zeros_like(g_rows)),
                                   ("alg1_swapped", nb * g_rows * (1 - in_b))):
                    V[name] = keep * V[name] + lam * X[name] + g_in
                    X[name] = X[name] - eta * V[name]
            if t + 1 in ends_set:
                e = ends_set[t + 1]
                th_end = traj.theta(t + 1) if t + 1 < T else traj.theta_final
                Gt = test_grads(att, th_end, Xt, yt)
                rec = {"epoch": e + 1, "steps": t + 1, "lr": float(h["lr"][0])}
                tang = {n: (X[n] / N if n.startswith("alg1") else X[n])
                        for n in names if not n.startswith("probe")}
                C = {n: -(tang[n] @ Gt.T).double().numpy() for n in tang}
                cmean = {n: c.mean(1) for n, c in C.items()}
                for n in tang:
                    rec[f"norm_{n}_paper_units"] = float(N * tang[n].double().norm(dim=1).mean())
                for a, b in (PAIRS if variants else BASE_PAIRS):
                    key = f"{a}_vs_{b}"
                    rec[key] = vector_compare(tang[a], tang[b], N)
                    rec[key]["pairs"] = scalar_compare(C[a], C[b])
                    rec[key]["per_row_over_test"] = float(np.mean(
                        [spearman(C[a][j], C[b][j]) for j in range(k)]))
                rec["forward_mean_contrib"] = {n: cmean[n].tolist() for n in ("exact", "fast")}
                for key, vec in (("exact", X["exact"]), ("diff", X["exact"] - X["fast"])):
                    nrm = vec.double().norm(dim=1)
                    if e > 0:
                        rec[f"log_growth_per_step_{key}"] = float(
                            torch.log(nrm / prev_norm[key]).mean() / (t + 1 - starts[e]))
                    prev_norm[key] = nrm
                for n in growth:
                    nn_ = X[n].double().norm(dim=1)
                    growth[n].append(float(torch.log(nn_ / norms_prev[n]).mean()))
                    X[n] = X[n] / nn_[:, None].to(X[n].dtype)
                    V[n] = V[n] / nn_[:, None].to(V[n].dtype)
                    norms_prev[n] = torch.ones_like(nn_)
                    rec[f"log_growth_{n}"] = growth[n][-1]
                    rec[f"log_growth_per_step_{n}"] = growth[n][-1] / (t + 1 - starts[e])
                per_epoch.append(rec)
                if progress:
                    fe = rec["fast_vs_exact"]
                    print(f"  epoch {e + 1}: vectors rel err {fe['rel_error']:.3g}, coord sign "
                          f"err {fe['coord_sign_error']:.3f}, pairs Spearman "
                          f"{fe['pairs']['spearman']:.3f}, |exact| "
                          f"{rec['norm_exact_paper_units']:.3g}"
                          f", probe log growth {rec['log_growth_probe']:.2f}", flush=True)
    return per_epoch, spec_rows, X


def test_accuracy(att, Xt, yt):
    module = att.net_.module_
    module.eval()
    with torch.no_grad():
        return float(torch.cat([module(Xt[s:s + 500]).argmax(1) for s in range(0, len(Xt), 500)])
                     .eq(yt).float().mean())


def window_run(att, run, args, Xt, yt, X_sub, y_sub, fit_s):
    """``--window-only``: fast against exact for the final mean test loss with the sample
    weights acting from epoch ``--drop-epoch + 1`` on, and the Hessian's extremes in the
    middle of that window (no per-epoch sweeps, no forward recurrences: for large runs)."""
    traj, hist = att.trajectory_, att.net_.history
    start, T = int(traj.epoch_starts[args.drop_epoch]), len(traj)
    t1 = time.perf_counter()
    G = test_grads(att, traj.theta_final, Xt, yt).double().mean(0)
    we, wf = window_scalars(att, start, G)
    sweeps_s = time.perf_counter() - t1
    window = scalar_compare(wf, we)
    sp = spectra(att, (start + T) // 2, X_sub, y_sub, args.lanczos_iter)
    lr_mid, p = float(traj.hyper.lr[sp["step"], 0]), float(traj.hyper.momentum[sp["step"], 0])
    sp.update({"eta_max_subset": lr_mid * sp["subset_max"],
               "eta_max_batch": lr_mid * sp["batch_max"], "stability_limit": 2 * (1 + p)})
    window.update({"start_step": start, "from_epoch": args.drop_epoch + 1, "steps": T - start,
                   "lr": sorted(set(float(v) for v in traj.hyper.lr[start:, 0].tolist())),
                   "integrated_curvature": float(traj.hyper.lr[start:, 0].sum())
                   * sp["subset_max"] / (1 - p),
                   "mean_abs_exact": float(np.abs(we).mean()),
                   "mean_abs_fast": float(np.abs(wf).mean())})
    print(f"{run} window epochs {args.drop_epoch + 1}-{args.epochs}: {window}; spectra {sp}",
          flush=True)
    return {"run": run, "window_only": True, "n_train": att.n_train_, "steps": T,
            "train_loss": [float(v) for v in hist[:, "train_loss"]],
            "test_accuracy": test_accuracy(att, Xt, yt), "window": window, "spectra": [sp],
            "timings": {"fit_s": fit_s, "sweeps_s": sweeps_s}}


def run_one(run, args, data, Xt_np, yt_np):
    from hydrattr import HydraAttributor

    t0 = time.perf_counter()
    att = HydraAttributor(make_net(run, args, data), mode="exact", random_state=0, verbose=0)
    att.fit(data.X_train, data.y_train)
    fit_s = time.perf_counter() - t0
    traj, N = att.trajectory_, att.n_train_
    hist = att.net_.history
    ends = np.cumsum(list(hist[:, "train_batch_count"]))
    Xt, yt = att._to_tensors(Xt_np, yt_np)
    rs = np.random.RandomState(1)
    rows = np.sort([rs.choice(np.flatnonzero(data.y_train == c)) for c in range(10)]
                   [:args.n_rows] if args.n_rows <= 10 else
                   rs.choice(N, args.n_rows, replace=False))
    sub = np.random.RandomState(2).choice(N, args.hessian_rows, replace=False)
    X_sub, y_sub = att._data_fn()(sub)
    if args.window_only:
        return window_run(att, run, args, Xt, yt, X_sub, y_sub, fit_s)
    G_mean = [test_grads(att, traj.theta(int(e)) if e < len(traj) else traj.theta_final,
                         Xt, yt).double().mean(0) for e in ends]
    t1 = time.perf_counter()
    ce, cf = epoch_scalars(att, ends, G_mean)
    scalars_s = time.perf_counter() - t1
    per_epoch_scalar = []
    for k in range(len(ends)):
        m = scalar_compare(cf[:, k], ce[:, k])
        m.update({"epoch": k + 1, "steps": int(ends[k]),
                  "lr": float(traj.hyper.lr[int(ends[k]) - 1, 0]),
                  "train_loss": float(hist[k, "train_loss"]),
                  "mean_abs_exact": float(np.abs(ce[:, k]).mean()),
                  "mean_abs_fast": float(np.abs(cf[:, k]).mean())})
        per_epoch_scalar.append(m)
        print(f"{run} epoch {k + 1}: lr {m['lr']:.3g}, train loss {m['train_loss']:.3f}; "
              f"fast vs exact (all {N} rows, mean test loss) Spearman {m['spearman']:.3f}, "
              f"sign error {m['sign_error']:.3f}, |exact|/|fast| "
              f"{m['mean_abs_exact'] / m['mean_abs_fast']:.3g}", flush=True)
    start = int(traj.epoch_starts[args.drop_epoch])
    we, wf = window_scalars(att, start, G_mean[-1])
    window = scalar_compare(wf, we)
    window.update({"start_step": start, "from_epoch": args.drop_epoch + 1,
                   "lr": sorted(set(float(v) for v in traj.hyper.lr[start:, 0].tolist()))})
    print(f"{run} window epochs {args.drop_epoch + 1}-{args.epochs}: {window}", flush=True)
    t2 = time.perf_counter()
    fwd, spec, X = forward_study(att, rows, ends, Xt, yt, run == "paper", args.probes,
                                 X_sub, y_sub, args.lanczos_iter, att.net_.batch_size)
    forward_s = time.perf_counter() - t2
    # integrated curvature: sum over steps of eta_t lambda_max / (1 - p), lambda_max of the
    # subset's Hessian measured mid-epoch and held for that epoch's steps
    per_ep = [int(n) * float(traj.hyper.lr[int(e) - 1, 0]) * sp["subset_max"] / (1 - sp["momentum"])
              for n, e, sp in zip(np.diff(np.concatenate([[0], ends])), ends, spec)]
    for k, m in enumerate(per_epoch_scalar):
        m["integrated_curvature"] = float(sum(per_ep[:k + 1]))
    window["integrated_curvature"] = float(sum(per_ep[args.drop_epoch:]))
    # consistency: the forward recurrences against the sweeps, same rows, final epoch
    fe, ff = np.asarray(fwd[-1]["forward_mean_contrib"]["exact"]), \
        np.asarray(fwd[-1]["forward_mean_contrib"]["fast"])
    check = {"exact_forward_vs_adjoint": float(np.max(np.abs(fe - ce[rows, -1]))
                                               / np.max(np.abs(ce[rows, -1]))),
             "fast_forward_vs_replay": float(np.max(np.abs(ff - cf[rows, -1]))
                                             / np.max(np.abs(cf[rows, -1])))}
    print(f"{run} checks (max rel. diff, forward against sweeps): {check}", flush=True)
    return {"run": run, "n_train": N, "steps": len(traj), "rows": rows.tolist(),
            "test_accuracy": test_accuracy(att, Xt, yt),
            "lrs": sorted(set(traj.hyper.lr[:, 0].tolist())),
            "per_epoch_scalar": per_epoch_scalar, "window": window, "forward": fwd,
            "spectra": spec, "checks": check,
            "timings": {"fit_s": fit_s, "scalars_s": scalars_s, "forward_s": forward_s}}


def markdown(results, args):
    md = markdown_head(
        f"fast_vs_exact_causes (Fashion-MNIST LeNet-5, {args.n_train} rows, {args.epochs} "
        f"epochs, {args.n_test} test points)",
        f"Fast HYDRA against our exact mode (finite-difference-verified) and the candidate "
        f"explanations of the paper's agreement (Spearman {PAPER['spearman']}, sign error "
        f"{PAPER['sign_error']}). Forward-tracked rows: {args.n_rows} (one per class); "
        f"Lanczos: {args.lanczos_iter} HVPs, subset of {args.hessian_rows} rows; "
        f"{args.probes} Lyapunov probes. One torch thread on a loaded 2-core machine.")
    windows = [r for r in results if r.get("window_only")]
    results = [r for r in results if not r.get("window_only")]
    if windows:
        md += [f"## Truncated window only (`--window-only`): sample weights act from epoch "
               f"{args.drop_epoch + 1} on, final mean test loss, all rows", "",
               "| run | train loss per epoch | test acc. | steps in the window | lr | "
               "integrated curvature | Spearman | sign error | mean abs. exact / fast | "
               "lambda_min, lambda_max (subset; batch) mid-window | eta lambda_max (subset) |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in windows:
            w, sp = r["window"], r["spectra"][0]
            md.append(f"| {r['run']} | {', '.join(f'{v:.3f}' for v in r['train_loss'])} | "
                      f"{r['test_accuracy']:.3f} | {w['steps']} | "
                      f"{', '.join(f'{v:g}' for v in w['lr'])} | "
                      f"{w['integrated_curvature']:.3g} | {w['spearman']:.3f} | "
                      f"{w['sign_error']:.3f} | {w['mean_abs_exact'] / w['mean_abs_fast']:.3g} | "
                      f"{sp['subset_min']:.3g}, {sp['subset_max']:.3g}; {sp['batch_min']:.3g}, "
                      f"{sp['batch_max']:.3g} | {sp['eta_max_subset']:.3g} |")
        md += ["", "Time: " + "; ".join(
            f"{r['run']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items())
            for r in windows), ""]
    if not results:
        return "\n".join(md) + "\n"
    by = {r["run"]: r for r in results}
    md += ["## Summary at the last epoch", "",
           "| run | lr | train loss | test acc. | integrated curvature | "
           "fast vs exact, mean test loss, all rows: "
           "Spearman / sign err. | vectors: rel. l2 err. / coord. sign err. / cosine | "
           "(row, test point) pairs: Spearman / sign err. | mean abs. exact / fast |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, f = r["per_epoch_scalar"][-1], r["forward"][-1]["fast_vs_exact"]
        md.append(f"| {r['run']} | {', '.join(f'{v:g}' for v in r['lrs'])} | "
                  f"{s['train_loss']:.3f} | {r['test_accuracy']:.3f} | "
                  f"{s['integrated_curvature']:.3g} | "
                  f"{s['spearman']:.3f} / {s['sign_error']:.3f} | {f['rel_error']:.3g} / "
                  f"{f['coord_sign_error']:.3f} / {f['cosine']:.3f} | "
                  f"{f['pairs']['spearman']:.3f} / {f['pairs']['sign_error']:.3f} | "
                  f"{s['mean_abs_exact'] / s['mean_abs_fast']:.3g} |")
    md += ["", f"Truncated to the epochs from {args.drop_epoch + 1} on (sample weights act "
           "only there; `last_epochs`), final mean test loss, all rows:", "",
           "| run | lr in the window | integrated curvature | Spearman | sign error | rel. l2 |",
           "|---|---|---|---|---|---|"]
    for r in results:
        w = r["window"]
        md.append(f"| {r['run']} | {', '.join(f'{v:g}' for v in w['lr'])} | "
                  f"{w['integrated_curvature']:.3g} | {w['spearman']:.3f} | "
                  f"{w['sign_error']:.3f} | {w['rel_l2']:.3g} |")
    if "paper" in by:
        f = by["paper"]["forward"][-1]
        md += ["", "## Candidates 1-3 (run `paper`, last epoch, forward-tracked rows)", "",
               "| approximation vs reference | vectors: rel. l2 err. | l2 err. (paper units) | "
               "coord. sign err. (all / top 10%) | coord. Spearman | cosine | pairs: Spearman | "
               "pairs: sign err. | per row over test points: Spearman |",
               "|---|---|---|---|---|---|---|---|---|"]
        for a, b in PAIRS:
            m = f[f"{a}_vs_{b}"]
            md.append(f"| {a} vs {b} | {m['rel_error']:.3g} | {m['l2_error_paper_units']:.3g} | "
                      f"{m['coord_sign_error']:.3f} / {m['coord_sign_error_top10']:.3f} | "
                      f"{m['coord_spearman']:.3f} | "
                      f"{m['cosine']:.3f} | {m['pairs']['spearman']:.3f} | "
                      f"{m['pairs']['sign_error']:.3f} | {m['per_row_over_test']:.3f} |")
    for r in results:
        md += ["", f"## Run `{r['run']}` per epoch", "",
               "| epoch | lr | train loss | all rows: Spearman / sign err. | vectors: rel. err. / "
               "coord. sign err. | pairs Spearman | integrated curvature | "
               "mean l2 of exact / fast (paper units) | "
               "log-growth / step: exact, exact - fast, probe | "
               "heavy-ball log-rate / step from lambda_min, "
               "lambda_max (subset; batch) | lambda_min, lambda_max (subset; batch) | "
               "eta lambda_max (subset; batch; limit) |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, f, sp in zip(r["per_epoch_scalar"], r["forward"], r["spectra"]):
            fe = f["fast_vs_exact"]
            md.append(
                f"| {s['epoch']} | {s['lr']:.3g} | {s['train_loss']:.3f} | "
                f"{s['spearman']:.3f} / {s['sign_error']:.3f} | {fe['rel_error']:.3g} / "
                f"{fe['coord_sign_error']:.3f} | {fe['pairs']['spearman']:.3f} | "
                f"{s['integrated_curvature']:.3g} | "
                f"{f['norm_exact_paper_units']:.3g} / {f['norm_fast_paper_units']:.3g} | "
                + ", ".join(f"{f[k]:.4f}" if k in f else "-" for k in (
                    "log_growth_per_step_exact", "log_growth_per_step_diff",
                    "log_growth_per_step_probe")) + " | "
                f"{math.log(sp['rate_subset_min']):.4f}, {math.log(sp['rate_subset_max']):.4f}; "
                f"{math.log(sp['rate_batch_min']):.4f}, {math.log(sp['rate_batch_max']):.4f} | "
                f"{sp['subset_min']:.3g}, {sp['subset_max']:.3g}; {sp['batch_min']:.3g}, "
                f"{sp['batch_max']:.3g} | {sp['eta_max_subset']:.3g}; {sp['eta_max_batch']:.3g}; "
                f"{sp['stability_limit']:.2g} |")
        if r["run"] == "paper":
            md += ["", "No-momentum probe (vanilla-GD exact map) log-growth per step: "
                   + ", ".join(f"{f['log_growth_per_step_probe_nomom']:.4f}"
                               for f in r["forward"])]
        md += ["", f"Checks (max rel. diff of the forward recurrences against the sweeps, "
               f"tracked rows, last epoch): {r['checks']}. Time: "
               + ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items())]
    return "\n".join(md) + "\n"


def main(argv=None):
    p = bench_parser(__doc__, quick="2,000 rows, 8 epochs, 500 test points, 10 tracked rows",
                     threads=1)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--drop-epoch", type=int, default=None,
                   help="run `drop`: lr x0.1 after this epoch (default: epochs // 2); "
                        "every run's truncated window starts after it")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-rows", type=int, default=10, help="forward-tracked rows")
    p.add_argument("--probes", type=int, default=2, help="Lyapunov probe vectors")
    p.add_argument("--lanczos-iter", type=int, default=20)
    p.add_argument("--window-only", action="store_true",
                   help="only the truncated window's fast/exact comparison and the Hessian's "
                        "extremes mid-window (for runs at the paper's size)")
    p.add_argument("--hessian-rows", type=int, default=512,
                   help="rows of the subset whose Hessian's extremes are measured")
    add_data_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.epochs = 2000, 8
        args.tag = args.tag or "quick"
    if args.drop_epoch is None:
        args.drop_epoch = args.epochs // 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    data = load_split("fashion-mnist", args.data_dir, 0, n_train=args.n_train,
                      n_valid=min(1000, 60000 - args.n_train))
    Xt_np, yt_np = data.X_test[:args.n_test], data.y_test[:args.n_test]
    t0 = time.perf_counter()
    results = []
    stem = tagged("fast_vs_exact_causes", args.tag)
    for run in args.runs:
        print(f"== {run}", flush=True)
        results.append(run_one(run, args, data, Xt_np, yt_np))
        md = markdown(results, args)
        if run != args.runs[-1]:
            from _common import save_results
            save_results(stem, run_record("fast_vs_exact_causes", args, t0, paper=PAPER,
                                          results=results), md, out=args.out)
    publish(stem, run_record("fast_vs_exact_causes", args, t0, paper=PAPER, results=results),
            md, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
