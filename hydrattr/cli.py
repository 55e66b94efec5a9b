"""The ``hydrattr`` command.

``hydrattr demo`` trains a small skorch network on data with injected label noise,
attributes the validation loss to every training sample with HYDRA, and reports how
well the most harmful samples find the flipped labels. With no arguments it runs on
sklearn's embedded digits in well under a minute; ``--dataset mnist`` or
``--dataset fashion-mnist`` with ``--data-dir`` (or ``HYDRATTR_DATA``) runs LeNet-5 on
the real data.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

__all__ = ["main", "run_demo"]


def _build(args):
    import torch
    from skorch import NeuralNetClassifier
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import StepLR

    from . import datasets
    from .models import MLP, LeNet5

    if args.dataset == "digits":
        data = datasets.load_digits_split(test_size=0.25, valid_size=0.2,
                                          random_state=args.seed)
        net = NeuralNetClassifier(
            MLP, module__n_features=64, module__n_classes=10, module__hidden=(64,),
            criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.05,
            optimizer__momentum=0.9, optimizer__weight_decay=2e-5, batch_size=32,
            max_epochs=args.epochs or 10, train_split=None, verbose=0,
            iterator_train__shuffle=True)
        shape = (8, 8)
    else:
        data = datasets.load_mnist_split(args.dataset, data_dir=args.data_dir,
                                         random_state=args.seed,
                                         n_train=args.n_train or 50000, n_valid=10000)
        # the paper's schedule: SGD momentum 0.9, batch 64, lr 0.01 x0.1 after epoch 5
        net = NeuralNetClassifier(
            LeNet5, criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
            lr=0.01, optimizer__momentum=0.9, optimizer__weight_decay=2e-5, batch_size=64,
            max_epochs=args.epochs or 3, train_split=None, verbose=0, iterator_train__shuffle=True,
            callbacks=[("lr", LRScheduler(StepLR, step_size=5, gamma=0.1))])
        shape = (28, 28)
    if args.n_valid:
        data.X_valid, data.y_valid = data.X_valid[:args.n_valid], data.y_valid[:args.n_valid]
    return data, net, shape


def _image_grid(images, titles, shape, path, suptitle):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), images, titles):
        ax.imshow(np.asarray(img).reshape(shape), cmap="gray_r")
        ax.set_title(title, fontsize=7)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic(path, write):
    """Write through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part" + os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_demo(args):
    """Run the demo described in the module docstring; returns a dict of results."""
    import pandas as pd

    from . import datasets, metrics
    from .hydra import HydraAttributor

    t0 = time.perf_counter()
    data, net, shape = _build(args)
    y_noisy, flipped = datasets.make_label_noise(data.y_train, args.noise,
                                                 random_state=args.seed)
    track = args.track if args.track else None
    att = HydraAttributor(net, mode=args.mode, storage=args.storage, track=track,
                          random_state=args.seed, verbose=int(not args.quiet))
    att.fit(data.X_train, y_noisy)
    acc = float(np.mean(att.net_.predict(data.X_test) == data.y_test))
    # one column: each sample's contribution to the mean validation loss
    scores = att.attribute(data.X_valid, data.y_valid, objective="mean")[:, 0]
    rows = att.rows_
    s, f = scores[rows], flipped[rows]
    k = max(1, int(round(args.noise * len(rows))))
    auc = metrics.mislabel_detection_auc(s, f) if 0 < f.sum() < len(f) else float("nan")
    prec = metrics.precision_at_k(s, f, k) if f.sum() else float("nan")
    table = pd.DataFrame({"row": rows, "label_given": y_noisy[rows],
                          "label_true": data.y_train[rows], "flipped": f, "score": s})
    order = np.argsort(s)
    harmful = table.iloc[order[:args.top]].reset_index(drop=True)
    helpful = table.iloc[order[::-1][:args.top]].reset_index(drop=True)
    elapsed = time.perf_counter() - t0
    print(f"\nhydrattr demo: {args.dataset}, {len(data.y_train)} training rows "
          f"({len(rows)} tracked), {args.noise:.0%} labels flipped, HYDRA {args.mode} mode")
    print(f"test accuracy of the noisy-trained net: {acc:.4f}")
    print("\nmost harmful training samples (lowest contribution to validation loss):")
    print(harmful.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nmost helpful training samples:")
    print(helpful.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nfinding the flipped labels by lowest score: ROC AUC = {auc:.4f}, "
          f"precision at k={k} (the noise rate) = {prec:.4f}")
    results = {"auc": auc, "precision_at_noise_rate": prec, "test_accuracy": acc,
               "seconds": elapsed}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        csv = os.path.join(args.out, "scores.csv")
        png = os.path.join(args.out, "harmful_helpful.png")
        _atomic(csv, lambda p: table.to_csv(p, index=False))
        picks = list(order[:8]) + list(order[::-1][:8])
        titles = [f"{'-' if n < 8 else '+'} #{rows[i]} y={y_noisy[rows[i]]}"
                  f"{'*' if f[i] else ''}" for n, i in enumerate(picks)]
        _atomic(png, lambda p: _image_grid(
            data.X_train[rows[picks]], titles, shape, p,
            "top: 8 most harmful, bottom: 8 most helpful (* = flipped label)"))
        print(f"wrote {csv} and {png}")
        results.update(csv=csv, png=png)
    print(f"done in {elapsed:.1f} s")
    return results


def main(argv=None):
    """Entry point of the ``hydrattr`` console script."""
    parser = argparse.ArgumentParser(prog="hydrattr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="noisy-label demo (digits by default, no files needed)")
    demo.add_argument("--dataset", choices=["digits", "mnist", "fashion-mnist"],
                      default="digits")
    demo.add_argument("--data-dir", default=None,
                      help="folder with the idx .gz files (default: $HYDRATTR_DATA)")
    demo.add_argument("--noise", type=float, default=0.1, help="fraction of labels flipped")
    demo.add_argument("--epochs", type=int, default=None)
    demo.add_argument("--n-train", type=int, default=None, help="MNIST training rows")
    demo.add_argument("--n-valid", type=int, default=None, help="validation rows attributed")
    demo.add_argument("--track", type=int, default=None,
                      help="attribute a random subset of this many training rows")
    demo.add_argument("--mode", choices=["fast", "exact"], default="fast")
    demo.add_argument("--storage", choices=["dense", "half", "memmap", "replay"],
                      default="dense")
    demo.add_argument("--top", type=int, default=10, help="rows shown per table")
    demo.add_argument("--out", default="hydrattr-out", help="folder for scores.csv and the PNG"
                      " ('' to write nothing)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0 <= args.noise < 1:
        parser.error("--noise must be in [0, 1)")
    try:
        run_demo(args)
    except FileNotFoundError as exc:
        print(f"hydrattr: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
