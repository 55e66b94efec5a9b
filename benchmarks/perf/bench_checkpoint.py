"""Exact mode from a checkpointed trajectory against the stored one: memory and time.

LeNet-5 (61,706 parameters) on MNIST with the speed benchmarks' schedule (SGD momentum
0.9, weight decay 2e-5, batch 64, lr x0.1 every 5 epochs). The same run is fitted twice
in one process, ``HydraAttributor(mode="exact", trajectory=...)`` with

1. ``"memory"``: every step's parameters stored (``T`` snapshots);
2. ``"checkpoint"``: the full state every ``k`` steps (``k`` minimising
   ``ceil(T / k) + k``), the steps between recomputed block by block during the sweep;

and exact contributions of all training rows to ``--n-test-cols`` test points (one
reverse sweep) are computed from each. Recorded: the parameter snapshots held (stored:
``T``; checkpointed: the peak of checkpoints plus the block buffer, counted by the
trajectory), their bytes, the peak RSS above the start of each fit + attribute block
(sampled), CPU seconds of the fit and of the sweep, the training steps recomputed, and
whether ``C`` is the same (bitwise).

Targets (issue 31): at most ``2 sqrt(T)`` snapshots; the sweep at most 2x the stored
trajectory's; ``C`` equal to float rounding.

Usage::

    python benchmarks/perf/bench_checkpoint.py                  # 2,000 rows, 2 epochs, 4 columns
    python benchmarks/perf/bench_checkpoint.py --epochs 10 --tag e10
    python benchmarks/perf/bench_checkpoint.py --quick          # 300 rows, 1 epoch, 2 columns

Results go to ``benchmarks/results/bench_checkpoint[_TAG].json`` and ``.md``.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import (PeakMemory, add_data_arg, bench_parser, load_split,  # noqa: E402
                     mnist_lenet, publish, release_memory, run_record, tagged)


def cpu_timed(fn):
    """``(fn(), CPU seconds of this process, wall seconds)``."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def one(trajectory, args, X, y, Xt, yt):
    from hydrattr import HydraAttributor

    att = HydraAttributor(mnist_lenet(args.epochs), mode="exact", trajectory=trajectory,
                          test_batch_size=max(len(Xt), 1), random_state=0, verbose=0)
    with PeakMemory() as mem:
        _, fit_s, fit_wall = cpu_timed(lambda: att.fit(X, y))
        held_after_fit = getattr(att.trajectory_, "held_", len(att.trajectory_))
        C, sweep_s, sweep_wall = cpu_timed(lambda: att.attribute(Xt, yt))
    traj = att.trajectory_
    T = len(traj)
    snap_bytes = att.spec_.n_params * torch.empty(0, dtype=traj.dtype).element_size()
    if trajectory == "checkpoint":
        snaps = {"snapshots_peak": traj.peak_held_, "snapshots_after_fit": held_after_fit,
                 "checkpoints": len(traj._ckpts), "spacing": traj.stride,
                 "levels": len(traj._strides()) - 1,
                 "snapshot_mib_peak": traj.peak_held_ * snap_bytes / 2**20,
                 "state_mib_peak": traj.peak_nbytes_ / 2**20,
                 "recomputed_steps": traj.recomputed_steps_}
    else:
        snaps = {"snapshots_peak": T, "snapshots_after_fit": T, "checkpoints": T,
                 "spacing": 1, "levels": 0, "snapshot_mib_peak": traj.nbytes / 2**20,
                 "state_mib_peak": traj.nbytes / 2**20, "recomputed_steps": 0}
    out = {"trajectory": trajectory, "steps": T, "fit_cpu_s": fit_s, "fit_wall_s": fit_wall,
           "sweep_cpu_s": sweep_s, "sweep_wall_s": sweep_wall,
           "rss_peak_above_start_mib": (mem.peak["VmRSS"] - mem.start["VmRSS"]) / 2**20,
           **snaps}
    print(f"{trajectory:>10}: {T} steps, fit {fit_s:.1f} s, sweep {sweep_s:.1f} s CPU, "
          f"snapshots peak {snaps['snapshots_peak']} ({snaps['snapshot_mib_peak']:.1f} MiB), "
          f"RSS peak +{out['rss_peak_above_start_mib']:.0f} MiB", flush=True)
    del att, traj
    release_memory()
    return out, C


def main(argv=None):
    p = bench_parser(__doc__, quick="300 rows, 1 epoch, 2 test columns", threads=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test-cols", type=int, default=4)
    add_data_arg(p)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train, args.n_test_cols = 1, 300, 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    from hydrattr import HydraAttributor

    data = load_split("mnist", args.data_dir, 0, n_train=args.n_train,
                      n_valid=min(10000, 60000 - args.n_train))
    X, y = data.X_train, data.y_train
    Xt, yt = data.X_test[:args.n_test_cols], data.y_test[:args.n_test_cols]
    print(f"MNIST {len(X)} train, LeNet-5, {args.epochs} epochs, {len(Xt)} test columns, "
          f"torch threads={torch.get_num_threads()}, {os.cpu_count()} cores", flush=True)

    # warm-up (library loading, first-call overheads), untimed
    for tr in ("memory", "checkpoint"):
        HydraAttributor(mnist_lenet(1), mode="exact", trajectory=tr, random_state=0,
                        verbose=0).fit(X[:128], y[:128]).attribute(Xt[:1], yt[:1])
    release_memory()

    rows, Cs = [], {}
    for tr in ("memory", "checkpoint"):
        row, Cs[tr] = one(tr, args, X, y, Xt, yt)
        rows.append(row)
    stored, ckpt = rows
    T = stored["steps"]
    diff = float(np.abs(Cs["checkpoint"] - Cs["memory"]).max())
    scale = float(np.abs(Cs["memory"]).max())
    res = run_record("bench_checkpoint", args, t0,
                     setting={"dataset": "mnist", "model": "LeNet-5", "n_train": len(X),
                              "epochs": args.epochs, "steps": T,
                              "n_test_cols": len(Xt), "device": "cpu",
                              "load_average_at_end": os.getloadavg()},
                     times_are="CPU seconds of this process (one torch thread)",
                     rows=rows,
                     C_identical=bool(np.array_equal(Cs["checkpoint"], Cs["memory"])),
                     C_max_abs_diff=diff, C_max_abs=scale,
                     sweep_ratio=ckpt["sweep_cpu_s"] / stored["sweep_cpu_s"],
                     fit_ratio=ckpt["fit_cpu_s"] / stored["fit_cpu_s"],
                     snapshot_bound=2 * math.sqrt(T),
                     targets={"snapshots": "<= 2 sqrt(T)", "sweep_ratio": 2.0})
    res["meets"] = {"snapshots": ckpt["snapshots_peak"] <= 2 * math.sqrt(T),
                    "sweep_ratio": res["sweep_ratio"] <= 2.0}
    md = [f"# bench_checkpoint ({len(X)} train, {args.epochs} epochs = {T} steps, "
          f"{len(Xt)} test columns, {os.cpu_count()} CPU cores, torch threads "
          f"{torch.get_num_threads()})", "",
          f"Command: `{' '.join(sys.argv)}`", "",
          "LeNet-5 exact mode, one reverse sweep for all rows; CPU seconds of this process "
          "(shared machine: wall times are in the JSON). Snapshots: parameter vectors "
          "held at once (checkpointed: the trajectory's own count, peak over fit and "
          "sweep); state: their bytes with the checkpoints' momentum buffers and module "
          "buffers.", "",
          "| trajectory | snapshots held (peak) | snapshot MiB | with state MiB | "
          "peak RSS above start | fit | sweep | steps recomputed |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['trajectory']} | {r['snapshots_peak']} | "
                  f"{r['snapshot_mib_peak']:.1f} | {r['state_mib_peak']:.1f} | "
                  f"{r['rss_peak_above_start_mib']:.0f} MiB | {r['fit_cpu_s']:.1f} s | "
                  f"{r['sweep_cpu_s']:.1f} s | {r['recomputed_steps']} |")
    md += ["", f"Checkpoint spacing {ckpt['spacing']} ({ckpt['checkpoints']} checkpoints, "
           f"{ckpt['levels']} recomputation level(s)); bound 2 sqrt(T) = "
           f"{2 * math.sqrt(T):.1f} snapshots: "
           f"{'met' if res['meets']['snapshots'] else 'NOT met'}. Sweep "
           f"{res['sweep_ratio']:.2f}x the stored trajectory's (target <= 2: "
           f"{'met' if res['meets']['sweep_ratio'] else 'NOT met'}); fit "
           f"{res['fit_ratio']:.2f}x. C identical bitwise: {res['C_identical']} "
           f"(max abs difference {diff:.1e}, largest |C| {scale:.1e}). Load average at the "
           f"end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", ""]
    publish(tagged("bench_checkpoint", args.tag), res, "\n".join(md), out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
