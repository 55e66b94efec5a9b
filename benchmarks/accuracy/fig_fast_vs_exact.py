"""The paper's Figures 3-5 on this machine: fast HYDRA and influence functions vs exact HYDRA.

Fashion-MNIST, LeNet-5, the paper's schedule (SGD momentum 0.9, batch 64, lr 0.01 halved
on plateaus of 2 epochs, weight decay 2e-5). ``--n-track`` training samples (the same
number from every class, 1% in the paper's 50k setting) are compared:

* **Figures 4 and 5** (sign-error rate and Spearman correlation against exact HYDRA):
  after every ``--eval-every`` epochs, the contribution of each tracked sample to the
  mean loss of ``--n-test`` test points, computed by exact HYDRA (adjoint sweep over the
  trajectory up to that epoch, Hessian kept) and by fast HYDRA (Hessian dropped).
  Paper, after 100 epochs: fast 0.986 / 0.014, influence functions 0.820 / 0.130.
* Influence functions (``InfluenceFunctionAttributor``, conjugate gradients with
  ``--if-damping``) at the final weights, against the final exact contributions.
* **Figure 3** (approximation error of the hypergradient): the forward recurrences with
  and without the Hessian for ``--tangent-rows`` tracked samples, and the mean l2 norm of
  ``d theta_t / d eps_i`` (exact minus fast) at the end of every epoch. Paper: it levels
  off (0.74 after about 70 epochs).

Usage::

    python benchmarks/accuracy/fig_fast_vs_exact.py --epochs 20             # 50k rows (long)
    python benchmarks/accuracy/fig_fast_vs_exact.py --quick                 # 3,000 rows, 10 epochs

Writes ``benchmarks/results/fig_fast_vs_exact[_TAG].json``, ``.md`` and three PNG plots.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import (add_data_arg, bench_parser, load_split, paper_lenet, publish,  # noqa: E402
                     tagged)
PAPER = {"fast": {"spearman": 0.986, "sign_error": 0.014},
         "influence_functions": {"spearman": 0.820, "sign_error": 0.130},
         "tangent_error_plateau": 0.74}


def make_net(epochs):
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    # paper: x0.5 when train+valid loss has not improved by 0.01% for 2 epochs; we have no
    # validation split inside the net (every row is attributed), so train loss is monitored
    return paper_lenet(epochs, callbacks=[
        ("lr", LRScheduler(ReduceLROnPlateau, monitor="train_loss", factor=0.5, patience=2,
                           threshold=1e-4))])


def stratified_rows(y, n_track, seed=0):
    rs = np.random.RandomState(seed)
    classes = np.unique(y)
    per = n_track // len(classes)
    rows = [rs.choice(np.flatnonzero(y == c), size=per, replace=False) for c in classes]
    return np.sort(np.concatenate(rows))


def compare(a, b):
    from scipy.stats import spearmanr

    return {"spearman": float(spearmanr(a, b)[0]),
            "sign_error": float(np.mean(np.sign(a) != np.sign(b))),
            "rel_l2_error": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def mean_test_grad(att, theta, Xt, yt):
    from hydrattr._core.functional import per_sample_grads
    from hydrattr._skorch import module_mode

    loss_fn = att._loss_fn()
    out = []
    with module_mode(att.net_.module_, training=False):
        for s in range(0, len(Xt), 256):
            out.append(per_sample_grads(loss_fn, theta, Xt[s:s + 256], yt[s:s + 256]).sum(0))
    return (torch.stack(out).sum(0) / len(Xt)).unsqueeze(0)


def tangent_errors(att, rows, ends, progress=True):
    """Forward recurrences with and without the Hessian; mean l2 error at each end step."""
    from hydrattr._core.functional import batch_products, per_sample_grads
    from hydrattr._core.steps import steps_for
    from hydrattr._skorch import module_mode

    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    steps, N = steps_for(traj), att.n_train_
    P = traj.spec.n_params
    ex = torch.zeros(len(rows), P, dtype=traj.dtype)
    fa = torch.zeros_like(ex)
    ex_s, fa_s = steps.tangent_state(ex), steps.tangent_state(fa)
    pos = {int(r): k for k, r in enumerate(rows)}
    out, ends = [], set(int(e) for e in ends)
    with module_mode(att.net_.module_, training=True):
        for t in range(len(traj)):
            idx = traj.indices[t]
            x, y = data_fn(idx)
            theta = traj.theta(t)
            w = torch.full((len(idx),), traj.weights[t], dtype=theta.dtype)
            _, hv, _ = batch_products(loss_fn, theta, x, y, w, ex,
                                      rng_state=traj.rng_states[t])
            inj = torch.zeros_like(ex)
            hit = [(b, pos[int(r)]) for b, r in enumerate(idx) if int(r) in pos]
            if hit:
                g = per_sample_grads(loss_fn, theta, x, y, independent=True)
                for b, k in hit:
                    inj[k] = traj.weights[t] * g[b]
            ctx = None
            if steps.needs_grad:
                raise NotImplementedError("tangent_errors: SGD only")
            ex, ex_s = steps.tangent(t, ex, ex_s, hv + inj, ctx)
            fa, fa_s = steps.tangent(t, fa, fa_s, inj, ctx)
            if t + 1 in ends:
                # tangents here are (1/N) d theta / d eps_i; the paper's nabla is d theta/d eps
                diff = N * (ex - fa).double().norm(dim=1)
                out.append({"step": t + 1, "mean_l2_error": float(diff.mean()),
                            "mean_l2_exact": float((N * ex).double().norm(dim=1).mean()),
                            "mean_rel_error": float((diff / (N * ex).double().norm(dim=1)
                                                     .clamp_min(1e-30)).mean())})
                if progress:
                    print(f"  tangent error after step {t + 1}: {out[-1]}", flush=True)
    return out


def main(argv=None):
    p = bench_parser(__doc__,
                     quick="3,000 rows, 10 epochs (evaluated every 2), 500 test points",
                     threads=1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-track", type=int, default=500)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    p.add_argument("--tangent-rows", type=int, default=20,
                   help="tracked samples for Figure 3 (0 to skip)")
    p.add_argument("--if-damping", type=float, default=0.01)
    p.add_argument("--if-maxiter", type=int, default=100)
    p.add_argument("--no-if", action="store_true", help="skip influence functions")
    add_data_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train, args.n_test, args.tangent_rows = 10, 3000, 500, 10
        args.eval_every = 2
    torch.set_num_threads(args.threads)

    from hydrattr import HydraAttributor
    from hydrattr._core.sweep import exact_adjoint, fast_replay
    from hydrattr._skorch import module_mode

    data = load_split("fashion-mnist", args.data_dir, 0, n_train=args.n_train,
                      n_valid=min(10000, 60000 - args.n_train))
    X, y = data.X_train, data.y_train
    Xt_np, yt_np = data.X_test[:args.n_test], data.y_test[:args.n_test]
    rows = stratified_rows(y, args.n_track)
    print(f"Fashion-MNIST {len(X)} train ({len(rows)} tracked), {len(Xt_np)} test, LeNet-5, "
          f"{args.epochs} epochs", flush=True)
    timings = {}
    t0 = time.perf_counter()
    att = HydraAttributor(make_net(args.epochs), mode="exact", random_state=0, verbose=0)
    att.fit(X, y)
    timings["fit_s"] = time.perf_counter() - t0
    traj = att.trajectory_
    counts = list(att.net_.history[:, "train_batch_count"])
    ends = np.cumsum(counts)
    eval_epochs = [e for e in range(1, args.epochs + 1)
                   if e % args.eval_every == 0 or e == args.epochs]
    Xt, yt = att._to_tensors(Xt_np, yt_np)
    rows_map = np.full(len(X), -1, dtype=np.int64)
    rows_map[rows] = np.arange(len(rows))
    loss_fn, data_fn = att._loss_fn(), att._data_fn()

    per_epoch = []
    C_final = {}
    for e in eval_epochs:
        pre = traj.head(int(ends[e - 1]))
        G = mean_test_grad(att, pre.theta_final, Xt, yt)
        t0 = time.perf_counter()
        with module_mode(att.net_.module_, training=True):
            ce = -exact_adjoint(pre, loss_fn, data_fn, G, rows_map, len(rows))[:, 0].numpy()
            t1 = time.perf_counter()
            cf = -fast_replay(pre, loss_fn, data_fn, G, rows_map, len(rows))[:, 0].numpy()
        t2 = time.perf_counter()
        m = compare(cf, ce)
        m.update({"epoch": e, "steps": len(pre), "exact_s": t1 - t0, "fast_s": t2 - t1,
                  "lr": float(traj.hyper.lr[len(pre) - 1, 0])})
        per_epoch.append(m)
        print(f"epoch {e}: fast vs exact {m}", flush=True)
        C_final = {"exact": ce, "fast": cf}

    result_if = None
    if not args.no_if:
        from hydrattr import InfluenceFunctionAttributor

        t0 = time.perf_counter()
        inf = InfluenceFunctionAttributor(make_net(args.epochs), solver="cg",
                                          damping=args.if_damping,
                                          cg_maxiter=args.if_maxiter, random_state=0,
                                          verbose=0)
        inf.fit(X, y)
        same = all(torch.equal(a, b) for a, b in zip(inf.net_.module_.parameters(),
                                                      att.net_.module_.parameters()))
        ci = inf.attribute(Xt_np, yt_np, objective="mean")[rows, 0]
        result_if = compare(ci, C_final["exact"])
        result_if.update({"solver": "cg", "damping": args.if_damping,
                          "cg_maxiter": args.if_maxiter, "same_weights_as_exact": same,
                          "time_s": time.perf_counter() - t0})
        print(f"influence functions vs exact: {result_if}", flush=True)

    tangents = []
    if args.tangent_rows:
        t0 = time.perf_counter()
        tangents = tangent_errors(att, rows[:: max(1, len(rows) // args.tangent_rows)]
                                  [:args.tangent_rows], ends)
        timings["tangent_s"] = time.perf_counter() - t0
        for k, rec in enumerate(tangents):
            rec["epoch"] = k + 1

    res = {"setting": {"dataset": "fashion-mnist", "model": "LeNet-5",
                       "n_params": att.spec_.n_params, "n_train": len(X),
                       "n_tracked": len(rows), "n_test": len(Xt_np), "epochs": args.epochs,
                       "steps": len(traj), "schedule": "lr 0.01, x0.5 on train-loss "
                       "plateaus of 2 epochs, momentum 0.9, wd 2e-5, batch 64",
                       "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
           "per_epoch_fast_vs_exact": per_epoch, "final_fast_vs_exact": per_epoch[-1],
           "influence_functions_vs_exact": result_if, "tangent_error_per_epoch": tangents,
           "timings": timings, "paper": PAPER}
    name = tagged("fig_fast_vs_exact", args.tag)
    os.makedirs(args.out, exist_ok=True)  # the plots go there before the results
    plots = make_plots(res, args.out, name)
    fin = per_epoch[-1]
    md = [f"# fig_fast_vs_exact (Fashion-MNIST, {len(X)} train, {len(rows)} tracked, "
          f"{args.epochs} epochs, {len(Xt_np)} test points)", "",
          "Contributions of the tracked samples to the mean test loss, against exact "
          "(Hessian-aware) HYDRA at the final epoch.", "",
          "| method | Spearman vs exact | sign-error rate | rel. L2 error | paper (Spearman / sign error) |",
          "|---|---|---|---|---|",
          f"| fast HYDRA | {fin['spearman']:.3f} | {fin['sign_error']:.3f} | "
          f"{fin['rel_l2_error']:.3f} | 0.986 / 0.014 |"]
    if result_if is not None:
        md.append(f"| influence functions (CG, damping {args.if_damping:g}) | "
                  f"{result_if['spearman']:.3f} | {result_if['sign_error']:.3f} | "
                  f"{result_if['rel_l2_error']:.3f} | 0.820 / 0.130 |")
    else:
        md.append("| influence functions | not run (--no-if) | | | 0.820 / 0.130 |")
    md += ["", "Per epoch (Figures 4 and 5; Figure 3 from the forward recurrences):", "",
           "| epoch | lr | Spearman | sign error | rel. L2 error | tangent l2 error (mean) | tangent rel. error |",
           "|---|---|---|---|---|---|---|"]
    for k, m in enumerate(per_epoch):
        tan = next((r for r in tangents if r["epoch"] == m["epoch"]), None)
        md.append(f"| {m['epoch']} | {m['lr']:.2g} | {m['spearman']:.3f} | "
                  f"{m['sign_error']:.3f} | {m['rel_l2_error']:.3f} | "
                  + (f"{tan['mean_l2_error']:.3g} | {tan['mean_rel_error']:.3f} |"
                     if tan else " | |"))
    md += ["", "Plots: " + ", ".join(os.path.basename(q) for q in plots), ""]
    publish(name, res, "\n".join(md), out=args.out)
    return 0


def make_plots(res, out, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ep = [m["epoch"] for m in res["per_epoch_fast_vs_exact"]]
    inf = res["influence_functions_vs_exact"]
    for key, label, fig_no in (("sign_error", "sign-error rate vs exact", 4),
                               ("spearman", "Spearman correlation with exact", 5)):
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.plot(ep, [m[key] for m in res["per_epoch_fast_vs_exact"]], "o-", label="fast HYDRA")
        if inf is not None:
            ax.plot([ep[-1]], [inf[key]], "s", color="C3", label="influence functions")
        ax.axhline(PAPER["fast"][key], color="C0", ls=":", lw=1, label="paper, fast")
        ax.axhline(PAPER["influence_functions"][key], color="C3", ls=":", lw=1,
                   label="paper, IF")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"Figure {fig_no} (Fashion-MNIST, LeNet-5)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, f"{name}_fig{fig_no}_{key}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    if res["tangent_error_per_epoch"]:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        tan = res["tangent_error_per_epoch"]
        ax.plot([r["epoch"] for r in tan], [r["mean_l2_error"] for r in tan], "o-")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean l2 error of d theta / d eps")
        ax.set_title("Figure 3: fast-vs-exact hypergradient error", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, f"{name}_fig3_tangent_error.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
