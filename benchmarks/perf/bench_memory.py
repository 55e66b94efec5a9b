"""Out of core: fast-mode HYDRA with the per-sample store and the trajectory on disk.

LeNet-5 (61,706 parameters) on MNIST, SGD (momentum 0.9, batch 64, lr 0.01, weight
decay 2e-5), every training sample tracked. Each configuration runs in its own
subprocess, which reports its own peak resident set size (``ru_maxrss``, the kernel's
high-water mark) and, sampled every 0.1 s from ``/proc/self/status``, the peak anonymous
and file-backed parts of it:

1. ``baseline``: ``storage="dense", trajectory="memory"`` (in RAM) on ``--n-baseline`` rows;
2. ``disk-same-n``: ``storage="memmap", trajectory="memmap"`` on the same rows: the
   slowdown of the disk store is ``fit`` (training + recording + store build) and
   ``attribute`` time against (1), measured in the same run;
3. ``disk-full``: ``storage="memmap", trajectory="memmap"`` on ``--n-train`` rows (50,000
   by default: a 12.3 GB float32 store on disk), checked against ``--ram-limit-gib``.

The disk store's pages are released from the process after every ~256 MiB touched
(``hydrattr._core.outofcore``), so RSS measures what the process really needs.

Usage::

    python benchmarks/perf/bench_memory.py                      # 50,000 tracked, 1 epoch
    python benchmarks/perf/bench_memory.py --quick              # 5,000 / 2,000 rows, 1 epoch
    python benchmarks/perf/bench_memory.py --n-train 20000 --n-baseline 5000 --epochs 1

Results: ``benchmarks/results/bench_memory[_TAG].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import (PeakMemory, add_data_arg, bench_parser, load_split, paper_lenet,  # noqa: E402
                     peak_rss_gib, save_results, tagged)


# -- child: one configuration ---------------------------------------------------------------
def _child(cfg):
    import numpy as np
    import torch

    from hydrattr import HydraAttributor

    torch.set_num_threads(cfg["threads"])
    with PeakMemory(interval=0.1, trim=False) as sampler:
        n = cfg["n_train"]
        data = load_split("mnist", cfg["data_dir"], 0, n_train=n,
                          n_valid=min(10000, 60000 - n))
        X, y = data.X_train, data.y_train
        Xt, yt = data.X_test[:cfg["n_test"]], data.y_test[:cfg["n_test"]]
        net = paper_lenet(cfg["epochs"])
        store_dir = tempfile.mkdtemp(prefix="bench-memory-", dir=cfg["store_dir"])
        try:
            att = HydraAttributor(net, mode="fast", storage=cfg["storage"],
                                  trajectory=cfg["trajectory"], store_dir=store_dir,
                                  random_state=0, verbose=0)
            t0 = time.perf_counter()
            att.fit(X, y)
            t_fit = time.perf_counter() - t0
            rss_after_fit = peak_rss_gib()
            t0 = time.perf_counter()
            C = att.attribute(Xt, yt)
            t_attr = time.perf_counter() - t0
            store_bytes = att.store_.nbytes
            checksum = float(np.nansum(np.abs(C[:200])))
            del att, C
        finally:
            shutil.rmtree(store_dir, ignore_errors=True)
    return {**cfg, "fit_s": t_fit, "attribute_s": t_attr,
            "peak_rss_gib": peak_rss_gib(), "peak_rss_after_fit_gib": rss_after_fit,
            "peak_rss_anon_gib": sampler.peak_gib("RssAnon"),
            "peak_rss_file_gib": sampler.peak_gib("RssFile"),
            "store_gib": store_bytes / 2**30, "checksum_first_200_rows": checksum}


# -- parent ---------------------------------------------------------------------------------
def _run(cfg):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"configuration {cfg['name']} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = bench_parser(__doc__, quick="5,000 / 2,000 rows, 1 epoch", threads=2)
    p.add_argument("--n-train", type=int, default=50000, help="rows tracked on disk")
    p.add_argument("--n-baseline", type=int, default=10000,
                   help="rows for the in-memory vs disk comparison (must fit in RAM)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--ram-limit-gib", type=float, default=4.0)
    add_data_arg(p)
    p.add_argument("--store-dir", default=None, help="where the memmap files go (tmp)")
    p.add_argument("--skip-full", action="store_true", help="only the same-n comparison")
    p.add_argument("--full-baseline", default="none", choices=["none", "dense", "half"],
                   help="also run an in-memory store on --n-train rows (needs the RAM: "
                        "half = 2 bytes per sample per parameter)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="run only these of baseline, disk-same-n, disk-full, memory-full")
    p.add_argument("--repeat", type=int, default=1,
                   help="run baseline and disk-same-n this many times, interleaved; times "
                        "are the minimum (the machine is shared), RSS the maximum")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    if args.quick:
        args.n_train, args.n_baseline, args.epochs, args.n_test = 5000, 2000, 1, 100
    common = dict(epochs=args.epochs, n_test=args.n_test, threads=args.threads,
                  data_dir=args.data_dir, store_dir=args.store_dir)
    configs = [
        dict(name="baseline", storage="dense", trajectory="memory", n_train=args.n_baseline),
        dict(name="disk-same-n", storage="memmap", trajectory="memmap", n_train=args.n_baseline),
    ]
    if not args.skip_full:
        configs.append(dict(name="disk-full", storage="memmap", trajectory="memmap",
                            n_train=args.n_train))
    if args.full_baseline != "none":
        configs.append(dict(name="memory-full", storage=args.full_baseline,
                            trajectory="memory", n_train=args.n_train))
    if args.configs:
        configs = [c for c in configs if c["name"] in args.configs]
    runs = {c["name"]: [] for c in configs}
    pair = [c for c in configs if c["name"] in ("baseline", "disk-same-n")]
    order = [c for _ in range(max(1, args.repeat)) for c in pair] + \
        [c for c in configs if c not in pair]
    for cfg in order:
        print(f"running {cfg['name']}: {cfg['n_train']} rows, storage={cfg['storage']}, "
              f"trajectory={cfg['trajectory']} ...", flush=True)
        r = _run({**common, **cfg})
        print(f"  fit {r['fit_s']:.1f} s, attribute {r['attribute_s']:.1f} s, peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB (anon {r['peak_rss_anon_gib']:.2f}, file "
              f"{r['peak_rss_file_gib']:.2f}), store {r['store_gib']:.2f} GiB", flush=True)
        runs[cfg["name"]].append(r)
    results = []
    for cfg in configs:
        rs = runs[cfg["name"]]
        best = dict(rs[0])
        for k in ("fit_s", "attribute_s"):
            best[k] = min(r[k] for r in rs)
        for k in ("peak_rss_gib", "peak_rss_after_fit_gib", "peak_rss_anon_gib",
                  "peak_rss_file_gib"):
            best[k] = max(r[k] for r in rs)
        best["repeats"] = len(rs)
        best["all_fit_s"] = [r["fit_s"] for r in rs]
        best["all_attribute_s"] = [r["attribute_s"] for r in rs]
        results.append(best)
    by = {r["name"]: r for r in results}
    summary = {}

    def compare(mem, disk, key):
        same = abs(mem["checksum_first_200_rows"] - disk["checksum_first_200_rows"]) <= \
            1e-3 * abs(mem["checksum_first_200_rows"])
        summary[key] = {"slowdown_fit": disk["fit_s"] / mem["fit_s"],
                        "slowdown_attribute": disk["attribute_s"] / mem["attribute_s"],
                        "same_contributions": bool(same)}

    if "baseline" in by and "disk-same-n" in by:
        compare(by["baseline"], by["disk-same-n"], "same_n")
    if "memory-full" in by and "disk-full" in by:
        compare(by["memory-full"], by["disk-full"], "full")
    if "disk-full" in by:
        summary["full_peak_rss_gib"] = by["disk-full"]["peak_rss_gib"]
        summary["full_within_ram_limit"] = by["disk-full"]["peak_rss_gib"] <= args.ram_limit_gib
    import torch

    meta = {"device": "cpu", "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": args.threads,
            "ram_limit_gib": args.ram_limit_gib, "command": " ".join(sys.argv),
            "load_avg_at_end": os.getloadavg()}
    lines = ["# bench_memory: fast mode with the per-sample store and trajectory on disk",
             "", f"`{meta['command']}` (times: min over {max(1, args.repeat)} interleaved "
             f"run(s)) - LeNet-5, MNIST, {args.epochs} epoch(s), "
             f"{args.threads} threads, {meta['cpu']}, torch {meta['torch']}; load average "
             f"at end {meta['load_avg_at_end'][0]:.1f} (shared machine)", "",
             "| config | rows | storage | trajectory | fit (s) | attribute (s) | peak RSS (GiB) "
             "| anon / file (GiB) | store (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['n_train']} | {r['storage']} | {r['trajectory']} | "
                     f"{r['fit_s']:.1f} | {r['attribute_s']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['peak_rss_anon_gib']:.2f} / {r['peak_rss_file_gib']:.2f} | "
                     f"{r['store_gib']:.2f} |")
    lines.append("")
    for key, what in (("same_n", f"{args.n_baseline} rows"), ("full", f"{args.n_train} rows")):
        if key in summary:
            c = summary[key]
            lines.append(f"Slowdown of the disk store against the in-memory store at "
                         f"{what}: fit x{c['slowdown_fit']:.2f}, attribute "
                         f"x{c['slowdown_attribute']:.2f}; same contributions: "
                         f"{c['same_contributions']}.")
    if "full_peak_rss_gib" in summary:
        lines.append(f"Full run peak RSS {summary['full_peak_rss_gib']:.2f} GiB "
                     f"(limit {args.ram_limit_gib} GiB): "
                     f"{'within' if summary['full_within_ram_limit'] else 'OVER'} the limit.")
    save_results(tagged("bench_memory", args.tag),
                 {"meta": meta, "results": results, "summary": summary},
                 "\n".join(lines) + "\n", out=args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
