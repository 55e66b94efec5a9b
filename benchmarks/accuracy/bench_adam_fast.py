"""How far is fast mode from exact mode with Adam/AdamW, and which approximation to use?

Exact mode differentiates everything (Hessian terms included). Two Hessian-free
approximations are compared against it on the same fitted net (float64 MLP on a
synthetic 3-class problem, or ``--mnist`` LeNet-5 float32 on MNIST):

* ``fast``: hydrattr's fast mode: only the Hessian is dropped; the sample's effect on
  the moments ``m``, ``v`` and on the preconditioner ``1 / (sqrt(v_hat) + eps)`` is kept
  (elementwise, so still cheap: per-coordinate coefficients);
* ``frozen``: additionally treats the preconditioner as a constant (``dv`` ignored), the
  cruder approximation one might try first.

Reported per optimizer: mean Pearson and Spearman correlation of the columns of ``C``
with exact mode, relative Frobenius error, fraction of sign mismatches, and the time of
``attribute`` (fast: one matrix product against the store; exact: one adjoint sweep)
relative to the plain fit.

Usage::

    python benchmarks/accuracy/bench_adam_fast.py            # N=200, 5 epochs, 20 test points
    python benchmarks/accuracy/bench_adam_fast.py --quick    # N=100, 3 epochs, 10 test points
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import bench_parser, save_results, tagged  # noqa: E402


def _hessian_free(att, G, freeze):
    """Hessian-free adjoint sweep with or without the preconditioner derivative."""
    from hydrattr._core.steps import steps_for
    from hydrattr._core.sweep import exact_adjoint
    from hydrattr._skorch import module_mode

    traj = att.trajectory_
    with module_mode(att.net_.module_, training=True):
        D = exact_adjoint(traj, att._loss_fn(), att._data_fn(), G, np.arange(att.n_train_),
                          att.n_train_, hessian=False,
                          steps=steps_for(traj, freeze_preconditioner=freeze))
    return -D.numpy()


def _compare(C, Cf):
    from scipy.stats import pearsonr, spearmanr

    cols = range(C.shape[1])
    return {"pearson": float(np.mean([pearsonr(C[:, j], Cf[:, j])[0] for j in cols])),
            "spearman": float(np.mean([spearmanr(C[:, j], Cf[:, j])[0] for j in cols])),
            "rel_frobenius": float(np.linalg.norm(C - Cf) / np.linalg.norm(C)),
            "sign_mismatch": float(np.mean(np.sign(C) != np.sign(Cf)))}


def main(argv=None):
    p = bench_parser(__doc__, threads=False)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-test", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.epochs, args.n_test = 100, 3, 10
    from skorch import NeuralNetClassifier

    from hydrattr import HydraAttributor
    from hydrattr.models import MLP

    rs = np.random.RandomState(0)
    n, d = args.n_train, 6
    X = rs.randn(n, d)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    Xt = rs.randn(args.n_test, d)
    yt = rs.randint(0, 3, args.n_test)
    rows = []
    for opt, kw in [(torch.optim.Adam, {}),
                    (torch.optim.AdamW, {"optimizer__weight_decay": 0.05})]:
        def net():
            return NeuralNetClassifier(
                MLP, module__n_features=d, module__n_classes=3, module__hidden=(16,),
                module__activation="tanh", module__dtype=torch.float64,
                criterion=torch.nn.CrossEntropyLoss, optimizer=opt, lr=0.005, batch_size=32,
                max_epochs=args.epochs, train_split=None, verbose=0,
                iterator_train__shuffle=True, **kw)

        torch.manual_seed(0)
        t0 = time.perf_counter()
        net().fit(X, y)
        t_plain = time.perf_counter() - t0
        exact = HydraAttributor(net(), mode="exact", random_state=0, verbose=0).fit(X, y)
        t0 = time.perf_counter()
        C = exact.attribute(Xt, yt)
        t_exact = time.perf_counter() - t0
        fast = HydraAttributor(net(), mode="fast", random_state=0, verbose=0).fit(X, y)
        t0 = time.perf_counter()
        C_fast = fast.attribute(Xt, yt)
        t_fast = time.perf_counter() - t0
        G = exact._test_grads(torch.as_tensor(Xt), torch.as_tensor(yt), "per_sample")
        C_nohess = _hessian_free(exact, G, freeze=False)
        assert np.allclose(C_nohess, C_fast, rtol=1e-8, atol=1e-14), "fast != Hessian-free"
        C_frozen = _hessian_free(exact, G, freeze=True)
        for name, Cf, t in [("fast", C_fast, t_fast), ("frozen", C_frozen, None)]:
            row = {"optimizer": opt.__name__, "approximation": name, **_compare(C, Cf),
                   "attribute_over_plain_fit": None if t is None else t / t_plain,
                   "exact_attribute_over_plain_fit": t_exact / t_plain}
            rows.append(row)
            print(row, flush=True)
    cmd = " ".join(sys.argv)
    lines = ["# bench_adam_fast: fast mode vs exact mode with Adam / AdamW", "",
             f"`{cmd}`: float64 MLP (16 tanh units), {n} training rows, {args.epochs} epochs, "
             f"batch 32, lr 0.005, {args.n_test} test points, CPU.", "",
             "| optimizer | approximation | Pearson | Spearman | rel. Frobenius error | "
             "sign mismatch | attribute / plain fit |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "" if r["attribute_over_plain_fit"] is None else f"{r['attribute_over_plain_fit']:.2f}"
        lines.append(f"| {r['optimizer']} | {r['approximation']} | {r['pearson']:.4f} | "
                     f"{r['spearman']:.4f} | {r['rel_frobenius']:.3f} | "
                     f"{r['sign_mismatch']:.3f} | {t} |")
    lines += ["", "Exact-mode attribute / plain fit: " + ", ".join(
        f"{r['optimizer']} {r['exact_attribute_over_plain_fit']:.1f}" for r in rows[::2]),
        "", "`fast` (what HydraAttributor does) drops only the Hessian; `frozen` also "
            "treats Adam's preconditioner as constant."]
    save_results(tagged("bench_adam_fast", args.tag),
                 {"command": cmd, "n_train": n, "epochs": args.epochs, "n_test": args.n_test,
                  "device": "cpu", "rows": rows}, "\n".join(lines) + "\n", out=args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
