"""Helpers shared by the benchmark scripts: the paper's LeNet-5 net, peak memory, and
atomic result files. Benchmarks are scripts, not package code; they import this module
from their own folder (``sys.path`` holds the script's directory when it runs)."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch


def peak_rss_gib():
    """Peak resident set size of this process in GiB (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def paper_lenet(epochs, lr=0.01, callbacks=(), **kwargs):
    """LeNet-5 (61,706 parameters) with the HYDRA paper's optimiser settings.

    SGD, momentum 0.9, weight decay 2e-5, batch 64, shuffled, ``train_split=None`` (every
    row is trained on, so every row is attributed). ``callbacks`` carries the schedule
    (the paper: MNIST lr x0.1 at epoch 5, Fashion-MNIST x0.5 on 2-epoch plateaus);
    ``kwargs`` override any other skorch parameter.
    """
    from skorch import NeuralNetClassifier

    from hydrattr.models import LeNet5

    params = dict(criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=lr,
                  optimizer__momentum=0.9, optimizer__weight_decay=2e-5, batch_size=64,
                  max_epochs=epochs, train_split=None, iterator_train__shuffle=True,
                  verbose=0, callbacks=list(callbacks))
    params.update(kwargs)
    return NeuralNetClassifier(LeNet5, **params)


def environment():
    """What a result depends on besides the code and its arguments: the torch and Python
    versions, torch's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``, e.g.
    ``AVX2`` or ``AVX512``: kernels of different levels round differently in the last
    bits, and a training run of thousands of steps amplifies that into different
    weights) and the number of torch threads."""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def run_record(benchmark, args, t0=None, **fields):
    """The head of every saved result: the benchmark's name, its command line
    (``sys.argv``), its parsed ``args`` and :func:`environment`, then ``total_s`` (seconds
    since ``t0``, a :func:`time.perf_counter` reading) when ``t0`` is given, then
    ``fields``."""
    record = {"benchmark": benchmark, "argv": sys.argv, "args": vars(args), **environment()}
    if t0 is not None:
        record["total_s"] = time.perf_counter() - t0
    record.update(fields)
    return record


def step_schedule(step_size=5, gamma=0.1):
    """The paper's MNIST schedule as a skorch callback: lr x ``gamma`` every ``step_size``
    epochs."""
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import StepLR

    return ("lr", LRScheduler(StepLR, step_size=step_size, gamma=gamma))


def add_run_args(parser, work=True):
    """The run options the cleaning/detection benchmarks share: ``--seed``, ``--threads``,
    ``--data-dir`` (default ``$HYDRATTR_DATA``), ``--tag`` and, with ``work=True``,
    ``--memmap`` and ``--work-dir`` (where memmapped trajectories and stores go)."""
    here = Path(__file__).resolve().parent
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    if work:
        parser.add_argument("--memmap", action="store_true",
                            help="trajectory on disk (work dir)")
    parser.add_argument("--data-dir", default=os.environ.get("HYDRATTR_DATA",
                                                             "/work/shared/data"))
    if work:
        parser.add_argument("--work-dir", default=str(here / "_work"))
    parser.add_argument("--tag", default=None, help="suffix of the result files")


def parse_settings(parser, values):
    """``dataset:rate`` strings (``--settings``) as ``(dataset, float(rate))`` pairs; any
    other dataset or a rate outside (0, 1) is a ``parser.error`` naming the value."""
    settings = []
    for s in values:
        ds, _, r = s.partition(":")
        try:
            rate = float(r)
        except ValueError:
            rate = float("nan")
        if ds not in ("mnist", "fashion-mnist") or not 0 < rate < 1:
            parser.error(f"--settings: expected dataset:rate with dataset mnist or "
                         f"fashion-mnist and 0 < rate < 1, got {s!r}")
        settings.append((ds, rate))
    return settings


def atomic_write(path, text):
    """Write ``text`` to ``path`` through a temporary file, so no half-written result
    file is ever left behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# where results go: benchmarks/results, or $HYDRATTR_BENCH_RESULTS (the tests' smoke runs)
RESULTS = Path(os.environ.get("HYDRATTR_BENCH_RESULTS")
               or Path(__file__).resolve().parent / "results")


def save_results(stem, payload, md, out=None):
    """Write ``<out>/<stem>.json`` (``payload``, indented JSON) and, unless ``md`` is None,
    ``<stem>.md`` (the markdown table ``md``), each through :func:`atomic_write`;
    ``out`` defaults to :data:`RESULTS`."""
    out = RESULTS if out is None else Path(out)
    (out / stem).parent.mkdir(parents=True, exist_ok=True)  # stem may name a subfolder
    atomic_write(out / f"{stem}.json", json.dumps(payload, indent=2))
    if md is not None:
        atomic_write(out / f"{stem}.md", md)
