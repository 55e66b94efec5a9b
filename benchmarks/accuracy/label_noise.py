"""Does the default cleaner find wrong labels at least as well as what a user would use
instead?

On each dataset, noise rate and seed: uniformly wrong labels (``make_label_noise``), one
net, and these removed sets, judged on the same rows in the same run:

* ``hydrattr default``: ``LabelNoiseCleaner(net)`` (training dynamics, estimated count);
* ``hydrattr trusted val``: the same with ``validation_data`` = a small clean set;
* ``detector``: ``SignClusterDetector(net)`` (margin trajectories, per-class k-means);
* ``contribution (paper)``: ``LabelNoiseCleaner(net, score_by="contribution")`` with the
  noisy validation split and the default threshold: the previous default;
* ``own loss``: one plain fit, the highest final training losses, as many as the default
  removes;
* ``AUM < 0``: the area under the margin (Pleiss et al. 2020; equal to the ``aum``
  package's value, tested in tests/test_label_issues.py) below zero;
* ``margin, CL count`` / ``margin, split count`` / ``margin, low count``: the default's
  ranking with confident learning's count, the trajectory split's, or their per-class
  minimum (the default's low count; the detector's set is its high one), for ablation;
* ``cleanlab``: ``cleanlab.filter.find_label_issues`` with its defaults on 5-fold
  out-of-fold probabilities of the same net;
* ``no filtering`` and ``oracle`` (the wrong labels themselves), for retraining.

Reported: precision and recall of each set, test accuracy of the net retrained on the kept
rows (same seed for every row; on (Fashion-)MNIST for 30 epochs, long enough that the net
fits the wrong labels it keeps: at 10 epochs the oracle set retrained no better than no
filtering, at 30 it is 8 points better), and cost in multiples of one plain training timed in the
same process.

    python benchmarks/accuracy/label_noise.py --datasets digits breast_cancer
    python benchmarks/accuracy/label_noise.py --datasets fashion-mnist --n-train 5000
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import oof_probs, resolve_data_dir, run_record, save_results  # noqa: E402
from _common.noise import precision_recall  # noqa: E402

from hydrattr import LabelNoiseCleaner, SignClusterDetector  # noqa: E402
from hydrattr.datasets import make_label_noise  # noqa: E402
from hydrattr.label_issues import (estimate_counts_from_dynamics,  # noqa: E402
                                   find_label_issues)

METHODS = ["hydrattr default", "hydrattr trusted val", "detector", "contribution (paper)",
           "own loss", "AUM < 0", "margin, CL count", "margin, split count",
           "margin, low count", "cleanlab",
           "no filtering", "oracle"]


# rows judged by precision and recall only, unless --retrain-all
ABLATION = ("AUM < 0", "margin, CL count", "margin, split count", "margin, low count")


def load(dataset, n_train, seed, data_dir):
    """``(X, y, X_val, y_val, X_test, y_test)``: train rows, a clean validation set of a
    tenth of their size, and test rows."""
    from sklearn.model_selection import train_test_split

    if dataset in ("digits", "breast_cancer"):
        from sklearn.datasets import load_breast_cancer, load_digits
        from sklearn.preprocessing import StandardScaler

        X, y = (load_digits if dataset == "digits" else load_breast_cancer)(return_X_y=True)
        X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y,
                                                  random_state=seed)
        X_tr, X_va, y_tr, y_va = train_test_split(X_tr, y_tr, test_size=0.1, stratify=y_tr,
                                                  random_state=seed)
        if dataset == "digits":
            X_tr, X_va, X_te = X_tr / 16.0, X_va / 16.0, X_te / 16.0
        else:
            sc = StandardScaler().fit(X_tr)
            X_tr, X_va, X_te = sc.transform(X_tr), sc.transform(X_va), sc.transform(X_te)
        f = np.float32
        return X_tr.astype(f), y_tr, X_va.astype(f), y_va, X_te.astype(f), y_te
    from hydrattr.datasets import load_idx_dataset

    X, y, X_test, y_test = load_idx_dataset(dataset, data_dir=resolve_data_dir(data_dir))
    rs = np.random.RandomState(seed)
    idx = rs.permutation(len(y))
    n_val = n_train // 10
    tr, va = idx[:n_train], idx[n_train:n_train + n_val]
    te = rs.permutation(len(y_test))[:2000]
    return X[tr], y[tr], X[va], y[va], X_test[te], y_test[te]


def make_net(dataset, n_features, n_classes, epochs):
    from skorch import NeuralNetClassifier

    from hydrattr.models import MLP, LeNet5

    common = dict(criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
                  optimizer__momentum=0.9, train_split=None, iterator_train__shuffle=True,
                  verbose=0, max_epochs=epochs)
    if dataset in ("digits", "breast_cancer"):
        return NeuralNetClassifier(MLP, module__n_features=n_features,
                                   module__n_classes=n_classes, lr=0.05, batch_size=32,
                                   **common)
    return NeuralNetClassifier(LeNet5, module__n_classes=n_classes, lr=0.05, batch_size=64,
                               optimizer__weight_decay=2e-5, **common)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def one_seed(args, dataset, rate, seed):
    from cleanlab.filter import find_label_issues as cleanlab_label_issues
    from sklearn.base import clone

    X, y, Xv, yv, Xt, yt = load(dataset, args.n_train, seed, args.data_dir)
    K = int(max(y.max(), yv.max(), yt.max()) + 1)
    yn, flipped = make_label_noise(y, rate, n_classes=K, random_state=seed + 100)
    net = make_net(dataset, int(np.prod(X.shape[1:])), K, args.epochs)

    def fit(Xa, ya, epochs=None, torch_seed=seed):
        torch.manual_seed(torch_seed)
        return clone(net).set_params(max_epochs=epochs or args.epochs).fit(Xa, ya)

    clone(net).set_params(max_epochs=1).fit(X[:256], yn[:256])  # warm-up, not timed
    plain, t_plain = timed(lambda: fit(X, yn))
    removed, cost = {}, {}
    cl, t = timed(lambda: LabelNoiseCleaner(net, random_state=seed).fit(X, yn))
    removed["hydrattr default"], cost["hydrattr default"] = cl.removed_mask_, t
    cl_t, t = timed(lambda: LabelNoiseCleaner(net, validation_data=(Xv, yv),
                                              random_state=seed).fit(X, yn))
    removed["hydrattr trusted val"], cost["hydrattr trusted val"] = cl_t.removed_mask_, t
    det, t = timed(lambda: SignClusterDetector(net, random_state=seed).fit(X, yn))
    removed["detector"], cost["detector"] = det.removed_mask_, t
    if not args.skip_contribution:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cc, t = timed(lambda: LabelNoiseCleaner(net, score_by="contribution",
                                                    random_state=seed).fit(X, yn))
        removed["contribution (paper)"], cost["contribution (paper)"] = cc.removed_mask_, t
    k = int(cl.removed_mask_.sum())
    with torch.no_grad():
        logp = torch.log_softmax(torch.as_tensor(plain.forward(X)), dim=1).numpy()
    own = -logp[np.arange(len(yn)), yn]
    m = np.zeros(len(yn), dtype=bool)
    m[np.argsort(-own, kind="stable")[:k]] = True
    removed["own loss"], cost["own loss"] = m, t_plain
    removed["AUM < 0"], cost["AUM < 0"] = cl.scores_ < 0, cost["hydrattr default"]
    # ablation of the default's count: its parts, seeded as the cleaner seeds them
    K_ = len(cl.classes_)
    rs = np.random.RandomState(seed)
    parts = estimate_counts_from_dynamics(cl.dynamics_, yn, K_, {
        c: rs.randint(np.iinfo(np.int32).max) for c in range(K_)})
    assert np.array_equal(parts.counts, cl.estimated_counts_)  # the same decision
    for name, counts in [("margin, CL count", parts.confident),
                         ("margin, split count", parts.split),
                         ("margin, low count", parts.low)]:
        removed[name] = find_label_issues(cl.scores_, yn, counts=counts)
        cost[name] = cost["hydrattr default"]
    probs, t = timed(lambda: oof_probs(net, X, yn, seed, n_folds=5, n_classes=K))
    removed["cleanlab"], cost["cleanlab"] = cleanlab_label_issues(yn, probs), t
    removed["no filtering"] = np.zeros(len(yn), dtype=bool)
    removed["oracle"] = flipped
    out = {"n_train": len(yn), "n_flipped": int(flipped.sum()), "plain_fit_s": t_plain,
           "rows": {}}
    for name, r in removed.items():
        p, rec = precision_recall(r, flipped)
        keep = ~r
        acc = None
        if args.retrain_all or name not in ABLATION:
            # the mean over retraining seeds (1000 * k + seed: the same for every row)
            acc = float(np.mean([(fit(X[keep], yn[keep], args.retrain_epochs,
                                      1000 * k + seed).predict(Xt) == yt).mean()
                                 for k in range(args.retrain_seeds)]))
        out["rows"][name] = {"removed": int(r.sum()), "precision": p, "recall": rec,
                             "retrained_acc": acc,
                             "cost": cost[name] / t_plain if name in cost else None}
    return out


def markdown(results):
    lines = ["# Finding wrong labels: hydrattr against cleanlab, the net's own loss and AUM",
             "", "Precision / recall of the removed set, retrained test accuracy (%), cost "
             "(x one plain training); mean over seeds.", ""]
    for key, runs in results.items():
        lines += [f"## {key} ({len(runs)} seeds, {runs[0]['n_train']} rows, "
                  f"{runs[0]['n_flipped']} wrong)", "",
                  "| method | removed | precision | recall | retrained acc | cost |",
                  "|---|---|---|---|---|---|"]
        for name in METHODS:
            rows = [r["rows"][name] for r in runs if name in r["rows"]]
            if not rows:
                continue
            mean = {f: np.mean([r[f] for r in rows]) for f in
                    ("removed", "precision", "recall")}
            accs = [r["retrained_acc"] for r in rows if r.get("retrained_acc") is not None]
            acc = f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f}" if accs else "-"
            costs = [r["cost"] for r in rows if r["cost"] is not None]
            c = f"{np.mean(costs):.2f}" if costs else "-"
            lines.append(f"| {name} | {mean['removed']:.0f} | {mean['precision']:.3f} | "
                         f"{mean['recall']:.3f} | {acc} | {c} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer"],
                   choices=["digits", "breast_cancer", "fashion-mnist", "mnist"])
    p.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=5000,
                   help="rows drawn from (Fashion-)MNIST's training file")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: 20 (digits, breast_cancer), 10 ((Fashion-)MNIST)")
    p.add_argument("--retrain-epochs", type=int, default=None,
                   help="epochs of the retraining on the kept rows; default: as --epochs "
                        "(digits, breast_cancer), 30 ((Fashion-)MNIST: trained until the "
                        "net fits its wrong labels, as a net trained to convergence does)")
    p.add_argument("--retrain-seeds", type=int, default=1,
                   help="retrainings per noise seed (torch seeds 1000 k + seed); the "
                        "accuracy reported is their mean")
    p.add_argument("--retrain-all", action="store_true",
                   help="retrain the ablation rows too (%s)" % ", ".join(ABLATION))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-contribution", action="store_true",
                   help="leave out the paper's contribution cleaner (the slowest row)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=None, help="results folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {}
    epochs_arg, retrain_arg = args.epochs, args.retrain_epochs
    stem = "label_noise" + (f"_{args.tag}" if args.tag else "")
    for dataset in args.datasets:
        small = dataset in ("digits", "breast_cancer")
        args.epochs = epochs_arg or (20 if small else 10)
        args.retrain_epochs = retrain_arg or (args.epochs if small else 30)
        for rate in args.rates:
            key = f"{dataset} {rate:.0%} wrong"
            results[key] = []
            for seed in args.seeds:
                results[key].append(one_seed(args, dataset, rate, seed))
                print(key, "seed", seed, {n: round(r["precision"], 3) for n, r in
                                          results[key][-1]["rows"].items()}, flush=True)
                # saved after every seed, so a long run that is stopped keeps what it did
                save_results(stem, run_record("label_noise", args, t0, results=results),
                             markdown(results), out=args.out)
    print(markdown(results))


if __name__ == "__main__":
    main()
