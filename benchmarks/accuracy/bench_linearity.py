"""Is removing one sample inside the linear regime that every attribution method assumes?

For the models of ``bench_peers`` (MNIST, 5,000 train / 500 test: logistic regression,
the ReLU MLP, and the same MLP with tanh), train once with HYDRA exact, then replay the
recorded run with one training row's loss multiplier set to ``1 - delta`` for
``delta`` from 1 (leave-one-out) down to 1e-6, and compare the finite difference

    (mean test loss(multiplier 1 - delta) - mean test loss) / delta

with HYDRA exact's derivative ``C[i].mean()`` (its first-order prediction of that
quotient, the same for every ``delta``). A smooth training map gives quotients that
converge to the derivative as ``delta`` shrinks (until float32 rounding takes over);
a ReLU network's SGD map is discontinuous (the ReLU derivative is a step, so a
pre-activation crossing zero changes a gradient by a finite amount), and a perturbation
of any size can switch a step to its other branch and move the final weights by a
finite amount.

Writes ``benchmarks/results/bench_linearity.{json,md,png}``.

Usage::

    python benchmarks/accuracy/bench_linearity.py            # 20 rows per model, ~15 min on 1 core
    python benchmarks/accuracy/bench_linearity.py --quick    # 5 rows, 3 models
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (PRESETS, RESULTS, add_data_arg, peer_net, peers_data,  # noqa: E402
                     save_results, test_losses)

DELTAS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
MODELS = {"lr": ("lr", {}), "mlp_relu": ("mlp", {}),
          "mlp_tanh": ("mlp", {"module__activation": "tanh"})}


def run_model(name, d, args, n_rows):
    import torch

    from hydrattr import HydraAttributor
    from hydrattr._core.replay import replay_training
    from hydrattr._skorch import module_mode

    kind, extra = MODELS[name]
    X, y, Xt, yt = d["X"], d["y"], d["Xt"], d["yt"]
    net = peer_net(kind, len(X), args.epochs).set_params(**extra)
    torch.manual_seed(args.seed)
    att = HydraAttributor(net, mode="exact", random_state=args.seed, verbose=0).fit(X, y)
    rows = np.sort(np.random.RandomState(args.seed + 3).choice(len(X), n_rows,
                                                               replace=False))
    # C = -(1/N) d loss / d eps; multiplier 1 - delta is eps = -delta / N, so the
    # first-order change of the loss is C * delta
    lin = att.attribute_forward(Xt, yt, rows).mean(axis=1)
    traj, loss_fn, data_fn = att.trajectory_, att._loss_fn(), att._data_fn()
    module = copy.deepcopy(att.net_.module_)

    def mean_test_loss(theta):
        torch.nn.utils.vector_to_parameters(theta.to(next(module.parameters()).dtype),
                                            module.parameters())
        return float(test_losses(module, Xt, yt).mean())

    t0 = time.perf_counter()
    with module_mode(att.net_.module_, training=True):
        base_theta = replay_training(traj, loss_fn, data_fn, np.ones(len(X)))
        base = mean_test_loss(base_theta)
        quot = np.empty((len(rows), len(DELTAS)))
        jump = np.empty((len(rows), len(DELTAS)))
        for a, r in enumerate(rows):
            for b, delta in enumerate(DELTAS):
                m = np.ones(len(X))
                m[r] = 1.0 - delta
                theta = replay_training(traj, loss_fn, data_fn, m)
                quot[a, b] = (mean_test_loss(theta) - base) / delta
                jump[a, b] = float((theta - base_theta).abs().max())
    from scipy.stats import spearmanr

    rel = np.abs(quot - lin[:, None]) / np.maximum(np.abs(lin[:, None]), 1e-30)
    per_delta = []
    for b, delta in enumerate(DELTAS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = float(spearmanr(quot[:, b], lin)[0])
        per_delta.append(dict(delta=delta, median_rel_error=float(np.median(rel[:, b])),
                              frac_off_10x=float(np.mean(rel[:, b] > 10)),
                              spearman=rho, median_abs_change=float(
                                  np.median(np.abs(quot[:, b]) * delta)),
                              median_max_abs_dtheta=float(np.median(jump[:, b]))))
    return dict(model=name, rows=rows.tolist(), linear=lin.tolist(), quotients=quot.tolist(),
                max_abs_dtheta=jump.tolist(), base_mean_test_loss=base,
                replay_s=time.perf_counter() - t0, per_delta=per_delta)


def markdown(res):
    a = res["args"]
    lines = ["# Is one sample's removal in the linear regime?", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']}; total {res['total_s'] / 60:.1f} min.", "",
             f"MNIST {a['n_train']:,} train / {a['n_test']} test, the `bench_peers` nets "
             f"(SGD, momentum 0.9, cosine lr from 0.05, {a['epochs']} epochs, float32), "
             f"{a['n_rows']} random training rows. For each row and `delta`, the recorded "
             "run is replayed with the row's loss multiplier `1 - delta`; `q = (mean test "
             "loss change) / delta` is compared with HYDRA exact's derivative (the "
             "first-order prediction of `q`, independent of `delta`).", "",
             "| model | delta | median relative error of q | rows off by >10x | Spearman(q, "
             "HYDRA) | median abs loss change | median max abs weight change |",
             "|---|---|---|---|---|---|---|"]
    for m in res["models"]:
        for p in m["per_delta"]:
            lines.append(f"| {m['model']} | {p['delta']:g} | {p['median_rel_error']:.3g} | "
                         f"{p['frac_off_10x']:.0%} | {p['spearman']:.2f} | "
                         f"{p['median_abs_change']:.2e} | {p['median_max_abs_dtheta']:.2e} |")
    lines += ["", "Reading: where the loss change itself is ~1e-8 (small `delta`), q is float32 "
              "rounding divided by `delta`, for every model. Above that, a smooth net's q "
              "agrees with the derivative; a ReLU net's does not at any `delta`, because "
              "its SGD map is discontinuous: the perturbation switches some ReLU derivative "
              "(a step function) in some step, which moves the final weights by a finite "
              "amount (last column), whatever the size of the perturbation.", "",
              "![linearity](bench_linearity.png)", ""]
    return "\n".join(lines) + "\n"


def figure(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in res["models"]:
        dl = [p["delta"] for p in m["per_delta"]]
        ax.plot(dl, [max(p["median_rel_error"], 1e-6) for p in m["per_delta"]], "o-",
                label=m["model"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.axhline(1.0, color="k", lw=0.5, ls="--")
    ax.set_xlabel("delta (loss multiplier 1 - delta; 1 = leave-one-out)")
    ax.set_ylabel("median |q - HYDRA exact| / |HYDRA exact|")
    ax.set_title("Finite differences vs the exact derivative", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rows per model")
    p.add_argument("--n-rows", type=int, default=None, help="training rows per model (20)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    add_data_arg(p)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    args.n_rows = args.n_rows or (5 if args.quick else 20)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    import torch

    torch.set_num_threads(args.threads)
    # the full-size bench_peers task
    pargs = argparse.Namespace(**PRESETS["peers"], seed=args.seed)
    d = peers_data(pargs.n_train, pargs.n_test, args.seed, args.data_dir)
    t0 = time.perf_counter()
    res = dict(command="python benchmarks/accuracy/bench_linearity.py " + " ".join(
        sys.argv[1:] if argv is None else argv),
        machine=f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}, "
                f"torch {torch.__version__}, {args.threads} thread(s)",
        args=dict(vars(args), n_train=pargs.n_train, n_test=pargs.n_test,
                  epochs=pargs.epochs), deltas=list(DELTAS), models=[])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("bench_linearity_quick" if args.quick else "bench_linearity")
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        res["models"].append(run_model(name, d, pargs, args.n_rows))
        res["total_s"] = time.perf_counter() - t0
        figure(res, out / f"{tag}.png")
        save_results(tag, res, markdown(res).replace("bench_linearity.png", f"{tag}.png"),
                     out=out, indent=1)
        for q in res["models"][-1]["per_delta"]:
            print(f"  delta={q['delta']:g}: median rel err {q['median_rel_error']:.3g}, "
                  f"off >10x {q['frac_off_10x']:.0%}, Spearman {q['spearman']:.2f}",
                  flush=True)
    print((out / f"{tag}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
