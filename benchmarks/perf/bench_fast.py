"""Speed and memory of fast-mode HYDRA against a plain skorch fit, measured in one run.

LeNet-5 (61,706 parameters) on the MNIST training split with the paper's schedule
(SGD momentum 0.9, batch 64, lr 0.01 x0.1 after epoch 5, weight decay 2e-5). Times:

1. a plain ``NeuralNetClassifier.fit`` (the baseline);
2. ``HydraAttributor.fit`` tracking every training sample (training + recording + the
   pass that builds the per-sample store);
3. ``attribute`` on ``--n-test`` test points;

and the process's peak resident memory. Targets (issue 3): tracked fit <= 3x plain fit,
attribute(1,000 test points) <= 0.5x plain fit, peak RSS <= 16 GiB.

Usage::

    python benchmarks/perf/bench_fast.py --epochs 20            # the full setting
    python benchmarks/perf/bench_fast.py --quick                # 5,000 rows, 1 epoch

Results go to ``benchmarks/results/bench_fast.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import (RESULTS, add_data_arg, load_split, mnist_lenet, peak_rss_gib,  # noqa: E402
                     publish, tagged)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--storage", default="half", choices=["dense", "half", "memmap", "replay"])
    p.add_argument("--trajectory", default="memory", choices=["memory", "memmap"])
    add_data_arg(p)
    p.add_argument("--quick", action="store_true", help="5,000 rows, 1 epoch, 200 test points")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="", help="suffix for the result file names")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train, args.n_test = 1, 5000, 200

    from hydrattr import HydraAttributor

    data = load_split("mnist", args.data_dir, 0, n_train=args.n_train,
                      n_valid=min(10000, 60000 - args.n_train))
    X, y = data.X_train, data.y_train
    Xt, yt = data.X_test[:args.n_test], data.y_test[:args.n_test]
    print(f"MNIST {len(X)} train / {len(Xt)} test, LeNet-5, {args.epochs} epochs, "
          f"torch threads={torch.get_num_threads()}", flush=True)

    torch.manual_seed(0)
    t = time.perf_counter()
    plain = mnist_lenet(args.epochs).fit(X, y)
    t_plain = time.perf_counter() - t
    rss_plain = peak_rss_gib()
    print(f"plain skorch fit: {t_plain:.1f} s", flush=True)

    att = HydraAttributor(mnist_lenet(args.epochs), mode="fast", storage=args.storage,
                          trajectory=args.trajectory, random_state=0, verbose=0)
    t = time.perf_counter()
    att.fit(X, y)
    t_fit = time.perf_counter() - t
    print(f"HydraAttributor.fit (all {len(X)} tracked, storage={args.storage}): "
          f"{t_fit:.1f} s = {t_fit / t_plain:.2f}x plain", flush=True)
    same = all(torch.equal(a, b) for a, b in zip(plain.module_.parameters(),
                                                  att.net_.module_.parameters()))

    t = time.perf_counter()
    C = att.attribute(Xt, yt)
    t_attr = time.perf_counter() - t
    print(f"attribute({len(Xt)} test points): {t_attr:.1f} s = {t_attr / t_plain:.2f}x plain",
          flush=True)
    rss = peak_rss_gib()
    n_steps = att.net_.history[-1, "train_batch_count"] * args.epochs
    res = {
        "setting": {"dataset": "mnist", "model": "LeNet-5", "n_params": att.spec_.n_params,
                    "n_train": len(X), "n_test": len(Xt), "epochs": args.epochs,
                    "steps": int(n_steps), "storage": args.storage,
                    "trajectory": args.trajectory, "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "machine": platform.processor() or
                    platform.machine(), "torch": torch.__version__,
                    "device": str(att._device)},
        "plain_fit_s": t_plain, "tracked_fit_s": t_fit, "attribute_s": t_attr,
        "tracked_fit_ratio": t_fit / t_plain, "attribute_ratio": t_attr / t_plain,
        "peak_rss_gib": rss, "peak_rss_after_plain_fit_gib": rss_plain,
        "store_gib": att.store_.nbytes / 2**30 if att.store_ is not None else 0.0,
        "weights_identical_to_plain_fit": bool(same),
        "C_shape": list(C.shape), "C_finite": bool(np.isfinite(C).all()),
        "targets": {"tracked_fit_ratio": 3.0, "attribute_ratio": 0.5, "peak_rss_gib": 16.0},
    }
    res["meets"] = {k: res[k] <= v for k, v in res["targets"].items()}
    name = tagged("bench_fast", args.tag)
    md = [f"# bench_fast ({len(X)} train, {len(Xt)} test, {args.epochs} epochs, "
          f"storage={args.storage}, {os.cpu_count()} CPU cores)", "",
          "| measure | value | ratio to plain fit | target |", "|---|---|---|---|",
          f"| plain skorch fit | {t_plain:.1f} s | 1.00 | |",
          f"| HydraAttributor.fit, all rows tracked | {t_fit:.1f} s | {t_fit / t_plain:.2f} | <= 3 |",
          f"| attribute, {len(Xt)} test points | {t_attr:.1f} s | {t_attr / t_plain:.2f} | <= 0.5 |",
          f"| peak RSS | {rss:.2f} GiB | | <= 16 GiB |",
          f"| per-sample store | {res['store_gib']:.2f} GiB | | |",
          f"| trained weights identical to plain fit | {same} | | |", ""]
    publish(name, res, "\n".join(md), out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
