"""Exact mode on a low-rank basis of the test gradients against exact and fast mode.

``HydraAttributor(mode="exact", rank=r)`` runs the exact adjoint sweep on ``r``
orthonormal directions spanning (most of) the test gradients instead of on every test
point, and returns ``C`` for the test gradients projected onto their span. This script
trains the ``bench_peers`` MLP (784-64-10, ReLU; SGD with momentum 0.9, weight decay
1e-3, a cosine learning rate stepped every batch; ``--model mlp_tanh`` for tanh) once
on ``--n-train`` MNIST rows while recording the trajectory, and on ``--n-test`` test
points compares, on that one run:

* exact mode: one adjoint sweep for all test points (the reference ``C``);
* fast mode, replayed on the same trajectory (``storage="replay"``'s path: no store,
  the per-sample gradients recomputed at ``attribute``);
* exact mode with each ``rank`` of ``--ranks`` (ints: directions; floats in (0, 1): the
  share of each test gradient's squared norm to keep, on average).

For each: the seconds ``attribute`` takes (the fit is shared and not counted), and per
test point (column of ``C``) against exact mode's column: Spearman's rank correlation
over the training rows (mean, 5th percentile, minimum), the share of entries of the same
sign, and ``||C - C_exact||_F / ||C_exact||_F``; with ``rank``, the directions swept
(``rank_``) and the mean share of each test gradient's squared norm outside the span
(``truncation_error_``). ``--energy-ranks`` adds rows with the basis that keeps the
most of the unscaled test gradients' energy instead of the default unit-scaled one
(``lowrank_test_grads(normalize=False)``, swept by ``exact_adjoint`` directly). Last,
without a sweep, how many directions keep 50/90/99/99.9% of the unit-scaled test
gradients' energy for test sets of each size in ``--spectrum-test`` (another draw of
test points, the same trained net): how the rank a float ``rank`` takes grows with the
number of test points.

Usage::

    python benchmarks/accuracy/bench_lowrank.py --quick   # 500 rows, 1 epoch, 40 test points
    python benchmarks/accuracy/bench_lowrank.py           # 1,500 rows, 3 epochs, 200 test points

Writes ``benchmarks/results/bench_lowrank[_<tag>].{json,md}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH_DIR))
from _common import (PEER_MODELS, RESULTS, add_data_arg, markdown_head, peer_net,  # noqa: E402
                     peers_data, run_record, save_results, tagged)

QUICK = dict(n_train=500, n_test=40, epochs=1, ranks="2,8,0.9,0.99", energy_ranks="8",
             spectrum_test="40,100")
FULL = dict(n_train=1500, n_test=200, epochs=3, ranks="8,16,32,64,128,0.9,0.99",
            energy_ranks="16,64", spectrum_test="100,200,500,1000,2000")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a reduced run: {QUICK}")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--ranks", help="comma-separated ranks: ints, or floats in (0, 1)")
    p.add_argument("--energy-ranks", help="comma-separated int ranks also run with the "
                   "basis that keeps the most energy (unscaled test gradients)")
    p.add_argument("--spectrum-test", help="comma-separated test set sizes whose "
                   "gradients' spectrum is measured (no sweep)")
    p.add_argument("--model", default="mlp", choices=sorted(set(PEER_MODELS) - {"lr"}))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    add_data_arg(p)
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--tag", default=None, help="suffix of the result files (default: "
                   "'quick' with --quick, else none)")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tag is None:
        args.tag = "quick" if args.quick else ""
    args.rank_values = [float(r) if "." in r else int(r) for r in args.ranks.split(",") if r]
    args.energy_values = [int(r) for r in args.energy_ranks.split(",") if r]
    args.spectrum_sizes = [int(r) for r in args.spectrum_test.split(",") if r]
    return args


def _ranks(C):
    """Column-wise ranks (average ranks for ties), as Spearman's correlation uses them."""
    from scipy.stats import rankdata

    return rankdata(C, axis=0)


def compare(C, C_ref, R_ref):
    """Per-column agreement of ``C`` with the reference (``R_ref``: its column ranks)."""
    R = _ranks(C)
    a = R - R.mean(0)
    b = R_ref - R_ref.mean(0)
    rho = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    same_sign = (np.sign(C) == np.sign(C_ref)).mean(0)
    return dict(spearman_mean=float(rho.mean()), spearman_p5=float(np.percentile(rho, 5)),
                spearman_min=float(rho.min()), sign_agreement=float(same_sign.mean()),
                rel_error=float(np.linalg.norm(C - C_ref) / np.linalg.norm(C_ref)))


def energy_weighted(att, Xt, yt, rank):
    """``C`` of exact mode on the basis that keeps the most of ``||G||_F^2`` (the test
    gradients unscaled: ``lowrank_test_grads(normalize=False)``), by the same sweep."""
    import torch

    from hydrattr._core.lowrank import expand, lowrank_test_grads
    from hydrattr._core.sweep import exact_adjoint
    from hydrattr._skorch import module_mode

    tic = time.perf_counter()
    G = att._test_grads(*att._to_tensors(Xt, yt), "per_sample")
    lr = lowrank_test_grads(G, rank, normalize=False, seed=0)
    n = att.n_train_
    with module_mode(att.net_.module_, training=True):
        D = exact_adjoint(att.trajectory_, att._loss_fn(), att._data_fn(), lr.basis,
                          np.arange(n), n, adjoint_dtype=torch.float64)
    C = -expand(D, lr.coords).numpy()
    return C, time.perf_counter() - tic, lr


def spectrum(att, args):
    """Directions that keep 50/90/99/99.9% of the unit-scaled test gradients' energy (what
    a float ``rank`` keeps), for test sets of each size of ``--spectrum-test``."""
    import torch

    d = peers_data(args.n_train, max(args.spectrum_sizes), args.seed + 7, args.data_dir)
    G = att._test_grads(*att._to_tensors(d["Xt"], d["yt"]), "per_sample").double()
    G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-300)
    out = {}
    for m in args.spectrum_sizes:
        s = torch.linalg.svdvals(G[:m]).numpy()
        kept = np.cumsum(s ** 2) / (s ** 2).sum()
        out[m] = {f"{f:g}": int(np.argmax(kept >= f)) + 1 for f in (0.5, 0.9, 0.99, 0.999)}
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch

    from hydrattr import HydraAttributor

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    d = peers_data(args.n_train, args.n_test, args.seed, args.data_dir)
    X, y, Xt, yt = d["X"], d["y"], d["Xt"], d["yt"]
    print(f"{len(X)} train / {len(Xt)} test, {args.model}, {args.epochs} epochs", flush=True)
    net = peer_net(args.model, len(X), args.epochs)
    att = HydraAttributor(net, mode="exact", test_batch_size=len(Xt),
                          random_state=args.seed, verbose=0)
    tic = time.perf_counter()
    att.fit(X, y)
    fit_s = time.perf_counter() - tic
    n_params = att.spec_.n_params
    test_acc = float((att.net_.predict(Xt) == yt).mean())

    def timed(**params):
        att.set_params(**params)
        tic = time.perf_counter()
        C = att.attribute(Xt, yt)
        return C, time.perf_counter() - tic

    C_exact, exact_s = timed(mode="exact", rank=None)
    R_ref = _ranks(C_exact)
    rows = [dict(method="exact", rank=None, swept=len(Xt), truncation_error=0.0,
                 time_s=exact_s, **compare(C_exact, C_exact, R_ref))]
    print(f"exact: {exact_s:.1f} s", flush=True)
    C_fast, fast_s = timed(mode="fast", rank=None)
    rows.append(dict(method="fast (replay)", rank=None, swept=None, truncation_error=None,
                     time_s=fast_s, **compare(C_fast, C_exact, R_ref)))
    print(f"fast: {fast_s:.1f} s", flush=True)
    for r in args.rank_values:
        C_r, s = timed(mode="exact", rank=r)
        rows.append(dict(method=f"exact, rank={r}", rank=r, swept=att.rank_,
                         truncation_error=att.truncation_error_, time_s=s,
                         **compare(C_r, C_exact, R_ref)))
        print(f"rank={r}: {att.rank_} directions, {s:.1f} s, "
              f"Spearman {rows[-1]['spearman_mean']:.4f}", flush=True)

    for r in args.energy_values:
        C_r, s, lr = energy_weighted(att, Xt, yt, r)
        column_mean = float(lr.column_errors.mean())
        rows.append(dict(method=f"exact, rank={r}, most-energy basis", rank=r,
                         swept=lr.rank, truncation_error=column_mean, time_s=s,
                         energy_outside=lr.truncation_error,
                         **compare(C_r, C_exact, R_ref)))
        print(f"rank={r}, most-energy basis: {s:.1f} s, "
              f"Spearman {rows[-1]['spearman_mean']:.4f}", flush=True)
    spec = spectrum(att, args)
    res = run_record("bench_lowrank", args, t_start, n_params=n_params, fit_s=fit_s,
                     test_acc=test_acc, directions_for_energy=spec, rows=rows)
    settings = (
        f"MNIST, {len(X):,} training rows, {len(Xt)} test points, the `{args.model}` net of "
        f"bench_peers ({n_params:,} parameters, {args.epochs} epochs, test accuracy "
        f"{test_acc:.3f}), float32, {args.threads} torch thread(s). One recorded run; "
        f"`attribute` seconds only (fit {fit_s:.1f} s, shared). Agreement is per test "
        f"point (column of C) with exact mode's column over the training rows; 'left "
        f"out' is the mean over test points of the share of each one's squared gradient "
        f"norm outside the span (`truncation_error_`). The most-energy rows use the basis "
        f"of the unscaled test gradients (`lowrank_test_grads(normalize=False)`) instead of "
        f"the default unit-scaled one.")
    lines = markdown_head("Exact mode on a low-rank basis of the test gradients", settings)
    lines += ["| method | directions swept | left out | attribute s | Spearman "
              "mean | Spearman p5 | Spearman min | sign agreement | rel. error |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        te = "" if r["truncation_error"] is None else f"{r['truncation_error']:.2e}"
        lines.append(
            f"| {r['method']} | {'' if r['swept'] is None else r['swept']} | {te} | "
            f"{r['time_s']:.1f} | {r['spearman_mean']:.4f} | {r['spearman_p5']:.4f} | "
            f"{r['spearman_min']:.4f} | {r['sign_agreement']:.4f} | {r['rel_error']:.2e} |")
    lines += ["", "Directions needed to keep a share of the unit-scaled test gradients' energy "
              "(what a float `rank` keeps), by number of test points (another draw of "
              "MNIST test points, same trained net):", "",
              "| test points | 50% | 90% | 99% | 99.9% |", "|---|---|---|---|---|"]
    for m, v in spec.items():
        lines.append(f"| {m} | " + " | ".join(str(v[k]) for k in ("0.5", "0.9", "0.99",
                                                                    "0.999")) + " |")
    md = "\n".join(lines) + "\n"
    save_results(tagged("bench_lowrank", args.tag), res, md, out=args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
