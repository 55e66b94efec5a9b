"""Scaling study (the paper's Figure 1 analogue): fast-mode HYDRA cost per tracked sample
per parameter, for LeNet-5, DenseNet-40 and MobileNetV2, on whatever device is present.

Models (parameter counts as in the paper):

* ``lenet5``: LeNet-5 on 1x28x28 inputs (MNIST shape), 61,706 parameters;
* ``densenet40``: DenseNet-BC-40 (growth 12, bottleneck layers, compression 0.5) on
  3x32x32 inputs (CIFAR-10 shape), 176,122 parameters;
* ``mobilenetv2``: torchvision's MobileNetV2 with 10 classes on 3x32x32, 2,236,682.

For each model and each ``n`` in ``--n-tracked`` (400 / 2,000 / 10,000), one epoch on
``n`` training samples (all tracked; batch 64 unless ``--batch-size``, SGD momentum 0.9) is timed twice in the
same run: a plain skorch ``fit`` (the baseline) and ``HydraAttributor(mode="fast").fit``
(training + recording + the per-sample gradient pass that fills the store). The figure
of merit is the HYDRA overhead ``(t_hydra - t_plain) / (n * n_params)`` in nanoseconds
per tracked sample per parameter; constant in ``n`` means linear scaling. Inputs are
synthetic (random images, random labels: the cost does not depend on the values) unless
``--real`` loads MNIST / CIFAR-10 (``hydrattr.datasets``). BatchNorm models take
per-sample gradients of the real batch (``per_sample="auto"`` -> Jacobian of the batch
losses), which is the expensive exact path; ``--per-sample vmap`` times the cheaper
independent-sample approximation instead (not defined for MobileNetV2 on 32x32 inputs:
its last BatchNorm layers see a 1x1 map, and one sample at 1x1 has no batch statistics;
such a model gets a row that says so).

The per-sample store is float32 in RAM when it fits ``--ram-store-gib``, else a disk
memmap up to ``--disk-store-gib`` (10,000 x 2.24M float32 is 89 GB), else the run is
skipped and says so.

Usage::

    python benchmarks/perf/bench_scaling.py                     # all models, 400/2000/10000
    python benchmarks/perf/bench_scaling.py --quick             # 400 tracked (LeNet also 2,000)
    python benchmarks/perf/bench_scaling.py --models lenet5 --n-tracked 400 2000 10000

Results: ``benchmarks/results/bench_scaling[_TAG].json`` and ``.md`` with the device.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# benchmarks/ on the path: the shared helpers in _common
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import (add_data_arg, bench_parser, load_split, resolve_data_dir,  # noqa: E402
                     save_results, tagged)


# -- models ---------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        inter = 4 * growth
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class _Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet40(nn.Module):
    """DenseNet-BC (Huang et al. 2017) of depth 40, growth 12, compression 0.5: 176,122
    parameters with 10 classes on 3x32x32 inputs."""

    def __init__(self, n_classes=10, depth=40, growth=12, reduction=0.5):
        super().__init__()
        n = (depth - 4) // 6
        c = 2 * growth
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        layers = []
        for block in range(3):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if block < 2:
                out = int(c * reduction)
                layers.append(_Transition(c, out))
                c = out
        self.features = nn.Sequential(*layers)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, n_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def MobileNetV2(n_classes=10):  # noqa: N802 (a module factory)
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(num_classes=n_classes)


def _lenet(n_classes=10):
    from hydrattr.models import LeNet5

    return LeNet5(n_classes=n_classes)


MODELS = {"lenet5": (_lenet, (1, 28, 28)), "densenet40": (DenseNet40, (3, 32, 32)),
          "mobilenetv2": (MobileNetV2, (3, 32, 32))}


# -- one measurement ------------------------------------------------------------------------
def _data(model, n, real, data_dir, seed=0):
    shape = MODELS[model][1]
    if real:
        from hydrattr.datasets import load_cifar10

        if model == "lenet5":
            d = load_split("mnist", data_dir, seed, n_train=n, n_valid=0)
        else:
            d = load_cifar10(resolve_data_dir(data_dir), n_train=n, n_valid=0,
                             random_state=seed)
        return d.X_train.astype(np.float32), d.y_train
    rs = np.random.RandomState(seed)
    return rs.rand(n, *shape).astype(np.float32), rs.randint(0, 10, n).astype(np.int64)


def _net(model, device, batch_size=64, epochs=1):
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(MODELS[model][0], criterion=nn.CrossEntropyLoss,
                               optimizer=torch.optim.SGD, lr=0.01, optimizer__momentum=0.9,
                               batch_size=batch_size, max_epochs=epochs, train_split=None,
                               iterator_train__shuffle=True, verbose=0, device=device)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, n, device, args):
    from hydrattr import HydraAttributor

    X, y = _data(model, n, args.real, args.data_dir)
    n_params = sum(p.numel() for p in MODELS[model][0]().parameters())
    store_gib = n * n_params * 4 / 2**30
    if store_gib <= args.ram_store_gib:
        storage = "dense"
    elif store_gib <= args.disk_store_gib:
        storage = "memmap"
    else:
        return {"model": model, "n_tracked": n, "n_params": n_params, "skipped":
                f"store {store_gib:.1f} GiB > --disk-store-gib {args.disk_store_gib}"}
    torch.manual_seed(0)
    _sync(device)
    t0 = time.perf_counter()
    _net(model, device, args.batch_size).fit(X, y)
    _sync(device)
    t_plain = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir=args.store_dir) as tmp:
        att = HydraAttributor(_net(model, device, args.batch_size), mode="fast", storage=storage,
                              per_sample=args.per_sample, store_dir=tmp, random_state=0,
                              verbose=0)
        _sync(device)
        t0 = time.perf_counter()
        att.fit(X, y)
        _sync(device)
        t_hydra = time.perf_counter() - t0
        t0 = time.perf_counter()
        att.attribute(X[:args.n_test], y[:args.n_test])
        t_attr = time.perf_counter() - t0
        del att
    gc.collect()
    over = max(t_hydra - t_plain, 0.0)
    return {"model": model, "n_tracked": n, "n_params": n_params, "storage": storage,
            "store_gib": store_gib, "plain_fit_s": t_plain, "hydra_fit_s": t_hydra,
            "ratio": t_hydra / t_plain, "attribute_s": t_attr, "n_test": args.n_test,
            "overhead_ns_per_sample_param": 1e9 * over / (n * n_params),
            "hydra_ns_per_sample_param": 1e9 * t_hydra / (n * n_params)}


def _write(args, meta, results):
    """Save JSON and the markdown table (called after every measurement)."""
    meta = {**meta, "load_avg_at_end": os.getloadavg()}
    lines = ["# bench_scaling: fast-mode HYDRA cost per tracked sample per parameter", "",
             f"`{meta['command']}` on **{meta['device']}** ({meta['device_name']}), torch "
             f"{meta['torch']}, {meta['data']} inputs, per_sample={meta['per_sample']}, 1 epoch, "
             f"batch {meta['batch_size']}; load average at end {meta['load_avg_at_end'][0]:.1f} (shared machine).",
             "", "| model | params | tracked | store | plain fit (s) | HYDRA fit (s) | ratio | "
             "overhead (ns / sample / param) | attribute (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['n_params']:,} | {r['n_tracked']} | skipped: "
                         f"{r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['n_params']:,} | {r['n_tracked']} | {r['storage']} "
                     f"{r['store_gib']:.2f} GiB | {r['plain_fit_s']:.1f} | {r['hydra_fit_s']:.1f}"
                     f" | {r['ratio']:.1f} | {r['overhead_ns_per_sample_param']:.3f} | "
                     f"{r['attribute_s']:.2f} |")
    save_results(tagged("bench_scaling", args.tag),
                 {"meta": meta, "results": results}, "\n".join(lines) + "\n", out=args.out)
    return lines


def main(argv=None):
    p = bench_parser(__doc__, quick="400 tracked for every model, LeNet-5 also 2,000")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--n-tracked", nargs="+", type=int, default=[400, 2000, 10000])
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), cpu, cuda")
    p.add_argument("--per-sample", default="auto", choices=["auto", "vmap", "jacobian"])
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64,
                   help="training batch size (the paper: 64); the Jacobian path for BatchNorm "
                        "models costs O(batch) per sample and O(batch^2) memory per step")
    p.add_argument("--real", action="store_true", help="MNIST / CIFAR-10 instead of random")
    add_data_arg(p)
    p.add_argument("--ram-store-gib", type=float, default=2.0)
    p.add_argument("--disk-store-gib", type=float, default=40.0)
    p.add_argument("--store-dir", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else \
        (platform.processor() or platform.machine()) + f", {torch.get_num_threads()} threads"
    plan = [(m, n) for m in args.models for n in args.n_tracked]
    if args.quick:
        plan = [(m, 400) for m in args.models]
        if "lenet5" in args.models:
            plan.insert(1, ("lenet5", 2000))
    print(f"device: {device} ({dev_name}); torch {torch.__version__}", flush=True)
    # warm-up (first-call overheads of torch.func / cuDNN) on a tiny run per model
    failed = {}
    for m in dict.fromkeys(m for m, _ in plan):
        try:
            measure(m, 64, device, argparse.Namespace(**{**vars(args), "n_test": 2}))
        except Exception as exc:  # noqa: BLE001 - recorded as a row saying why
            failed[m] = f"{type(exc).__name__}: {exc}"[:200]
            print(f"{m}: failed in warm-up: {failed[m]}", flush=True)
    meta = {"device": device, "device_name": dev_name, "torch": torch.__version__,
            "per_sample": args.per_sample, "data": "real" if args.real else "synthetic",
            "command": " ".join(sys.argv), "batch_size": args.batch_size}
    results = []
    for m, n in plan:
        print(f"{m}: {n} tracked ...", flush=True)
        if m in failed:
            r = {"model": m, "n_tracked": n, "n_params": sum(
                p.numel() for p in MODELS[m][0]().parameters()), "skipped": failed[m]}
        else:
            r = measure(m, n, device, args)
        results.append(r)
        _write(args, meta, results)
        if "skipped" in r:
            print(f"  skipped: {r['skipped']}", flush=True)
            continue
        print(f"  plain fit {r['plain_fit_s']:.1f} s, HYDRA fit {r['hydra_fit_s']:.1f} s "
              f"(x{r['ratio']:.1f}), overhead {r['overhead_ns_per_sample_param']:.3f} ns per "
              f"tracked sample per parameter", flush=True)
    lines = _write(args, meta, results)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
