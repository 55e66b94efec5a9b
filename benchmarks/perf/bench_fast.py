"""Speed and memory of fast-mode HYDRA against a plain skorch fit, measured in one run.

LeNet-5 (61,706 parameters) on the MNIST training split with the paper's schedule
(SGD momentum 0.9, batch 64, lr 0.01 x0.1 after epoch 5, weight decay 2e-5). Times, all
in the same process, one after the other:

1. a plain ``NeuralNetClassifier.fit`` (the baseline);
2. ``HydraAttributor.fit`` tracking every training sample, once per ``--fit-paths``:
   ``two_pass`` (training while recording every step's parameters, then a second pass
   that recomputes per-sample gradients with ``vmap`` into the store), ``fused`` (the
   default: per-sample gradients from the training backward committed to the store
   during training, coefficients brought forward lazily, the ``Linear`` weights' terms
   logged as factors and never summed into full rows), ``fused_ring`` (those factors
   held in the filler's ring and written back to full rows before each fold, as before
   the factor log; still the path for ``storage="memmap"``) and ``fused_full`` (full
   rows in the ring, as before the factored ring), each with its profile (where the
   time went) and the peak resident memory of that fit;
3. ``attribute`` on ``--n-test`` test points (the fused fit's store), and the largest
   difference between the two paths' ``C``;

and the process's peak resident memory. Targets (issue 30): fused fit <= 1.5x plain fit,
attribute(1,000 test points) <= 0.3x plain fit.

Usage::

    python benchmarks/perf/bench_fast.py --n-train 10000 --epochs 20 --storage dense
    python benchmarks/perf/bench_fast.py --quick                # 5,000 rows, 1 epoch

Results go to ``benchmarks/results/bench_fast.json`` and ``.md``.
"""
from __future__ import annotations

import gc
import os
import platform
import sys
import time

import numpy as np
import torch

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import (PeakMemory, add_data_arg, bench_parser, load_split, mnist_lenet,  # noqa: E402
                     peak_rss_gib, release_memory, save_results, tagged)


def main(argv=None):
    p = bench_parser(__doc__, quick="5,000 rows, 1 epoch, 200 test points")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--storage", default="half", choices=["dense", "half", "memmap"])
    p.add_argument("--trajectory", default="memory", choices=["memory", "memmap"])
    p.add_argument("--filler", default="auto", choices=["auto", "deferred", "lazy"],
                   help="the fused fit's store filler (auto: the library's choice; the "
                        "others force DeferredStore or LazyStore, for comparisons)")
    p.add_argument("--fit-paths", nargs="+", default=["two_pass", "fused"],
                   choices=["two_pass", "fused", "fused_ring", "fused_full"],
                   help="fits to time (the last is attributed)")
    add_data_arg(p)
    p.add_argument("--note", default="", help="a line for the markdown (e.g. 'shared machine')")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train, args.n_test = 1, 5000, 200
    if args.threads:
        torch.set_num_threads(args.threads)

    from hydrattr import HydraAttributor
    from hydrattr._fused import FusedRecorder

    FusedRecorder.STORE_KIND = args.filler

    data = load_split("mnist", args.data_dir, 0, n_train=args.n_train,
                      n_valid=min(10000, 60000 - args.n_train))
    X, y = data.X_train, data.y_train
    Xt, yt = data.X_test[:args.n_test], data.y_test[:args.n_test]
    print(f"MNIST {len(X)} train / {len(Xt)} test, LeNet-5, {args.epochs} epochs, "
          f"torch threads={torch.get_num_threads()}", flush=True)

    mnist_lenet(1).fit(X[:256], y[:256])  # warm-up: first-call costs stay out of the timings
    torch.manual_seed(0)
    t = time.perf_counter()
    plain = mnist_lenet(args.epochs).fit(X, y)
    t_plain = time.perf_counter() - t
    rss_plain = peak_rss_gib()
    print(f"plain skorch fit: {t_plain:.1f} s", flush=True)

    fits, Cs = {}, {}
    att = None
    for path in args.fit_paths:
        att = None
        release_memory()
        FusedRecorder.FACTOR_LINEAR = path != "fused_full"
        FusedRecorder.LOG_FACTORS = path == "fused"
        att = HydraAttributor(mnist_lenet(args.epochs), mode="fast", storage=args.storage,
                              trajectory=args.trajectory,
                              fit_path="two_pass" if path == "two_pass" else "fused",
                              random_state=0, verbose=0)
        with PeakMemory() as mem:
            t = time.perf_counter()
            att.fit(X, y)
            t_fit = time.perf_counter() - t
        same = all(torch.equal(a, b) for a, b in zip(plain.module_.parameters(),
                                                      att.net_.module_.parameters()))
        prof = dict(getattr(att, "_fit_profile", {}))
        rest = t_fit - sum(prof.values())
        fits[path] = {"fit_s": t_fit, "ratio": t_fit / t_plain, "ran": att.fit_path_,
                      "profile_s": prof, "training_and_recording_s": rest,
                      "peak_rss_gib": mem.peak.get("VmRSS", 0) / 2**30,
                      "weights_identical_to_plain_fit": bool(same),
                      "hooks_fallback": getattr(att, "hooks_fallback_", None),
                      "store_filler": getattr(att, "_fit_filler", None),
                      "factored_linear_weights": getattr(att, "_fit_factored", None)}
        print(f"HydraAttributor.fit (fit_path={path}, all {len(X)} tracked, "
              f"storage={args.storage}): {t_fit:.1f} s = {t_fit / t_plain:.2f}x the first plain; "
              f"profile {', '.join(f'{k} {v:.1f}' for k, v in prof.items())}", flush=True)
        if path != args.fit_paths[-1]:
            Cs[path] = att.attribute(Xt, yt)
    t = time.perf_counter()
    C = att.attribute(Xt, yt)
    t_attr = time.perf_counter() - t
    # the plain fit again, last: on a shared machine the load changes from one fit to the
    # next, and the faster of the two plain fits is the baseline of every ratio
    torch.manual_seed(0)
    t = time.perf_counter()
    mnist_lenet(args.epochs).fit(X, y)
    t_plain_after = time.perf_counter() - t
    print(f"plain skorch fit again: {t_plain_after:.1f} s", flush=True)
    t_plain_first = t_plain
    t_plain = min(t_plain_first, t_plain_after)
    for f in fits.values():
        f["ratio"] = f["fit_s"] / t_plain
    print(f"attribute({len(Xt)} test points): {t_attr:.1f} s = {t_attr / t_plain:.2f}x plain",
          flush=True)
    diffs = {k: float(np.max(np.abs(v - C)) / np.max(np.abs(C))) for k, v in Cs.items()}
    rss = peak_rss_gib()
    last = args.fit_paths[-1]
    n_steps = att.net_.history[-1, "train_batch_count"] * args.epochs
    res = {
        "setting": {"dataset": "mnist", "model": "LeNet-5", "n_params": att.spec_.n_params,
                    "n_train": len(X), "n_test": len(Xt), "epochs": args.epochs,
                    "steps": int(n_steps), "storage": args.storage,
                    "trajectory": args.trajectory, "filler": args.filler,
                    "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "machine": platform.processor() or
                    platform.machine(), "torch": torch.__version__,
                    "device": str(att._device), "note": args.note},
        "plain_fit_s": t_plain, "plain_fit_runs_s": [t_plain_first, t_plain_after],
        "fits": fits,
        "tracked_fit_s": fits[last]["fit_s"], "attribute_s": t_attr,
        "tracked_fit_ratio": fits[last]["ratio"], "attribute_ratio": t_attr / t_plain,
        "C_max_rel_diff_to_last_path": diffs,
        "peak_rss_gib": rss, "peak_rss_after_plain_fit_gib": rss_plain,
        "store_gib": att.store_.nbytes / 2**30 if att.store_ is not None else 0.0,
        "weights_identical_to_plain_fit": all(f["weights_identical_to_plain_fit"]
                                              for f in fits.values()),
        "C_shape": list(C.shape), "C_finite": bool(np.isfinite(C).all()),
        "fit_peak_rss_gib": fits[last]["peak_rss_gib"],
        "targets": {"tracked_fit_ratio": 1.5, "attribute_ratio": 0.3},
    }
    if len(X) >= 50000 and args.storage in ("half", "memmap"):  # issue 30's memory targets
        res["targets"]["fit_peak_rss_gib"] = 8.0 if args.storage == "half" else 2.0
    res["meets"] = {k: res[k] <= v for k, v in res["targets"].items()}
    name = tagged("bench_fast", args.tag)
    md = [f"# bench_fast ({len(X)} train, {len(Xt)} test, {args.epochs} epochs, "
          f"storage={args.storage}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads)", ""]
    if args.note:
        md += [args.note, ""]
    md += ["| measure | value | ratio to plain fit | target |", "|---|---|---|---|",
           f"| plain skorch fit (faster of {t_plain_first:.1f} s before and "
           f"{t_plain_after:.1f} s after the fits) | {t_plain:.1f} s | 1.00 | |"]
    for path, f in fits.items():
        md.append(f"| HydraAttributor.fit, fit_path={path!r}, all rows tracked | "
                  f"{f['fit_s']:.1f} s | {f['ratio']:.2f} | "
                  f"{'<= 1.5' if path == 'fused' else ''} |")
    md += [f"| attribute, {len(Xt)} test points | {t_attr:.1f} s | {t_attr / t_plain:.2f} | "
           f"<= 0.3 |",
           f"| peak RSS (process) | {rss:.2f} GiB | | |",
           f"| per-sample store | {res['store_gib']:.2f} GiB | | |",
           f"| trained weights identical to plain fit | {res['weights_identical_to_plain_fit']}"
           f" | | |"]
    for k, v in diffs.items():
        md.append(f"| max abs C difference, {k} vs {last}, relative to max abs C | {v:.1e} | | |")
    md += ["", "Where each fit spent its time (seconds):", "",
           "| part | " + " | ".join(fits) + " |", "|---|" + "---|" * len(fits)]
    parts = ["training_and_recording_s"] + sorted({k for f in fits.values()
                                                   for k in f["profile_s"]})
    for part in parts:
        cells = [f"{f['training_and_recording_s'] if part == 'training_and_recording_s' else f['profile_s'].get(part, 0.0):.1f}"
                 for f in fits.values()]
        md.append(f"| {part} | " + " | ".join(cells) + " |")
    md.append("| peak RSS of the fit (GiB) | " + " | ".join(f"{f['peak_rss_gib']:.2f}"
                                                          for f in fits.values()) + " |")
    md.append("| store filler | " + " | ".join(str(f["store_filler"] or "-")
                                               for f in fits.values()) + " |")
    md.append("| Linear weights held as factors in its ring | " + " | ".join(
        str(len(f["factored_linear_weights"] or [])) for f in fits.values()) + " |")
    if "fit_peak_rss_gib" in res["targets"]:
        md += ["", f"Peak RSS of the {last} fit: {res['fit_peak_rss_gib']:.2f} GiB, target "
               f"<= {res['targets']['fit_peak_rss_gib']:.0f} GiB ({args.storage}, "
               f"{len(X)} rows): {'met' if res['meets']['fit_peak_rss_gib'] else 'not met'}."]
    md.append("")
    save_results(name, res, "\n".join(md), out=args.out)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
