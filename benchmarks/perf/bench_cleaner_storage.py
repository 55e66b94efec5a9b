"""Which fast-mode storage should ``LabelNoiseCleaner`` use? Time and peak memory.

The cleaner needs one column of ``C`` per round (the contribution to the mean validation
loss). Fast mode can get it two ways:

* fill the ``n_train x n_params`` per-sample store at ``fit`` (``storage="dense"``, or
  ``"half"`` in float16) and multiply it by the validation gradient;
* keep only the trajectory and replay it once for that column (``storage="replay"``).

Each configuration runs ``LabelNoiseCleaner(HydraAttributor(net, storage=...,
last_epochs="final_lr"), fraction=r, stratify=True).fit_resample`` on the same noisy
MNIST rows (Table 3's setting: the paper's LeNet-5 and schedule, ``r`` uniformly wrong
labels, a clean validation set) in its own subprocess, which reports its wall time and
its peak resident set size (``ru_maxrss``). The parent checks that every storage gives
the dense store's scores (to float32 rounding; float16 for ``half``) and reports time and
memory as ratios against ``dense`` measured in the same run.

Usage::

    python benchmarks/perf/bench_cleaner_storage.py                 # 20,000 rows, 8 epochs
    python benchmarks/perf/bench_cleaner_storage.py --quick         # 2,000 rows, 3 epochs

Results: ``benchmarks/results/bench_cleaner_storage[_TAG].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
from _common import (add_run_args, add_setting_args, markdown_head, noisy_setting,  # noqa: E402
                     peak_rss_gib, publish, run_record, tagged)

STORAGES = ("dense", "half", "replay")


def _child(cfg):
    """One configuration, in this process: fit_resample, then time, memory, scores."""
    import torch

    from hydrattr import HydraAttributor, LabelNoiseCleaner

    torch.set_num_threads(cfg["threads"])
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    args = argparse.Namespace(**cfg["args"])
    d, y, flipped, net = noisy_setting(args, cfg["dataset"], cfg["rate"])
    rss_before = peak_rss_gib()
    t0 = time.perf_counter()
    cleaner = LabelNoiseCleaner(
        HydraAttributor(net, mode="fast", storage=cfg["storage"], last_epochs="final_lr",
                        random_state=args.seed, verbose=0), score_by="contribution",
        validation_data=(d.X_valid, d.y_valid), fraction=cfg["rate"], stratify=True,
        random_state=args.seed)
    cleaner.fit_resample(d.X_train, y)
    seconds = time.perf_counter() - t0
    removed = cleaner.removed_mask_
    np.savez(cfg["scores_path"], scores=cleaner.scores_, removed=removed)
    return {"storage": cfg["storage"], "fit_resample_s": seconds,
            "peak_rss_gib": peak_rss_gib(), "peak_rss_before_fit_gib": rss_before,
            "precision": float(flipped[removed].mean()), "n_removed": int(removed.sum()),
            "window_start_step": int(cleaner.attributor_.window_start_)}


def _run(cfg):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                           json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"storage={cfg['storage']} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows, args):
    base = rows[0]
    settings = (f"{args.dataset}, {args.n_train} training rows, {args.n_valid} clean validation "
                f"rows, {args.rate:.0%} wrong labels, LeNet-5, {args.epochs} epochs (lr "
                f"{args.lr}, MNIST drop at epoch {args.milestone}), "
                "`HydraAttributor(storage=..., last_epochs=\"final_lr\")`, per-class removal "
                f"of {args.rate:.0%}; each storage in its own process, one after the other, "
                f"{args.threads} torch thread(s). Ratios against `{base['storage']}` in the same "
                "run; 'added by the fit': peak RSS minus the peak before `fit_resample` "
                "(data loaded, net built).")
    lines = markdown_head("bench_cleaner_storage: LabelNoiseCleaner's fast-mode storage",
                          settings) + [
        "| storage | fit_resample (s) | time / dense | peak RSS (GiB) | added by the "
        "fit (GiB) | added / dense | precision | max rel. score diff vs dense | "
        "same removed set |",
        "|---|---|---|---|---|---|---|---|---|"]
    added = [r["peak_rss_gib"] - r["peak_rss_before_fit_gib"] for r in rows]
    for r, a in zip(rows, added):
        lines.append(f"| {r['storage']} | {r['fit_resample_s']:.1f} | "
                     f"{r['fit_resample_s'] / base['fit_resample_s']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | {a:.2f} | {a / max(added[0], 1e-9):.2f} | "
                     f"{r['precision']:.4f} | {r['max_rel_diff_vs_dense']:.1e} | "
                     f"{r['same_removed_as_dense']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(json.loads(argv[1]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 rows, 3 epochs, drop at 2")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--rate", type=float, default=0.8)
    p.add_argument("--storages", nargs="+", default=list(STORAGES), choices=STORAGES,
                   help="the first is the baseline of the ratios (default: dense)")
    add_setting_args(p, "table3_paper", skip=("n_test",), n_train=20000, n_valid=5000,
                     epochs=8)
    add_run_args(p, work=False)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_valid, args.epochs, args.milestone = 2000, 500, 3, 2
    if not 0 < args.rate < 1:
        p.error(f"--rate must be in (0, 1), got {args.rate}")
    args.threads = args.threads or 1
    tag = args.tag or ("quick" if args.quick else None)
    stem = tagged("bench_cleaner_storage", tag)
    t0 = time.perf_counter()
    child_args = {k: getattr(args, k) for k in ("data_dir", "seed", "n_train", "n_valid",
                                                "epochs", "lr", "milestone")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cleaner-") as tmp:
        for storage in args.storages:
            cfg = {"storage": storage, "dataset": args.dataset, "rate": args.rate,
                   "threads": args.threads, "args": child_args,
                   "scores_path": os.path.join(tmp, f"{storage}.npz")}
            row = _run(cfg)
            print(f"{storage:7s} {row['fit_resample_s']:.1f} s, peak RSS "
                  f"{row['peak_rss_gib']:.2f} GiB, precision {row['precision']:.4f}", flush=True)
            rows.append(row)
        base = np.load(os.path.join(tmp, f"{args.storages[0]}.npz"))
        ok = np.isfinite(base["scores"])
        for r in rows:
            out = np.load(os.path.join(tmp, f"{r['storage']}.npz"))
            s = out["scores"]
            if not np.array_equal(np.isfinite(s), ok):
                raise RuntimeError(f"storage={r['storage']} scored other rows than "
                                   f"{args.storages[0]}")
            r["max_rel_diff_vs_dense"] = float(np.abs(s[ok] - base["scores"][ok]).max()
                                               / np.abs(base["scores"][ok]).max())
            r["same_removed_as_dense"] = bool(np.array_equal(out["removed"], base["removed"]))
    payload = run_record("bench_cleaner_storage", args, t0, rows=rows)
    md = markdown(rows, args)
    publish(stem, payload, md)


if __name__ == "__main__":
    main()
