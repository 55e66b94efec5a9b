"""Result files: where they go, what every one records, and how they are written."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/

# where results go: benchmarks/results, or $HYDRATTR_BENCH_RESULTS (the tests' smoke runs)
RESULTS = Path(os.environ.get("HYDRATTR_BENCH_RESULTS") or BENCH / "results")


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


def atomic_write(path, text):
    """Write ``text`` to ``path`` through a temporary file, so no half-written result
    file is ever left behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value):
    """numpy scalars and arrays as plain JSON values; anything else as its ``str``."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def save_results(stem, payload, md, out=None, indent=2):
    """Write ``<out>/<stem>.json`` (``payload``, indented JSON) and, unless ``md`` is None,
    ``<stem>.md`` (the markdown table ``md``), each through :func:`atomic_write`;
    ``out`` defaults to :data:`RESULTS`."""
    out = RESULTS if out is None else Path(out)
    (out / stem).parent.mkdir(parents=True, exist_ok=True)  # stem may name a subfolder
    atomic_write(out / f"{stem}.json", json.dumps(payload, indent=indent, default=_jsonable))
    if md is not None:
        atomic_write(out / f"{stem}.md", md)


def load_result(stem, out=None):
    """The saved JSON ``<stem>.json`` from :data:`RESULTS` or, for raw runs that only feed
    a merged table, ``RESULTS/parts``; a ``SystemExit`` naming both places if neither has
    it."""
    out = RESULTS if out is None else Path(out)
    for folder in (out, out / "parts"):
        f = folder / f"{stem}.json"
        if f.exists():
            return json.loads(f.read_text())
    raise SystemExit(f"no results file {stem}.json in {out} or {out / 'parts'}")


def tagged(name, tag):
    """``name`` or ``name_<tag>``: the stem of a result file."""
    return f"{name}_{tag}" if tag else name


def bench_parser(doc, quick=None, threads=None):
    """The argument parser of a ``perf/`` or ``accuracy/`` benchmark, with the options
    they share; the script adds its own to it.

    The description is the script's docstring ``doc``, shown as written. The options:
    ``--quick`` (a reduced run; ``quick`` says what it runs), ``--threads`` (torch
    threads, default ``threads``; None: torch's own; False: no such option), ``--out``
    (the results folder, default :data:`RESULTS`) and ``--tag`` (suffix of the result
    file names, :func:`tagged`).
    """
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    if threads is not False:
        own = "torch's own" if threads is None else threads
        p.add_argument("--threads", type=int, default=threads,
                       help=f"torch threads (default: {own})")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: %(default)s)")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p


def markdown_head(title, settings):
    """The first lines of a result's markdown: ``# title``, the command that ran, and the
    ``settings`` paragraph."""
    return [f"# {title}", "", f"Command: `{' '.join(sys.argv)}`", "", settings, ""]


def default_tag(args):
    """A run's result tag: ``--tag``, else ``quick`` with ``--quick``, else
    ``n<n_train>_e<epochs>``."""
    return args.tag or ("quick" if getattr(args, "quick", False) else
                        f"n{args.n_train}_e{args.epochs}")


def start_run(args):
    """What every cleaning/detection benchmark does before its first fit: set torch's
    threads (``--threads``), create ``--work-dir`` where the script has one, and silence
    torch's UserWarnings."""
    import warnings

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "work_dir", None):
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def run_settings(benchmark, stem, args, settings, run_one, markdown):
    """``run_one(args, *setting)`` for every setting, saving ``<stem>`` (:func:`run_record`
    with ``results``, and ``markdown(results, args)``) after each one, so that a long run
    that is stopped keeps its rows; prints the markdown and returns the results."""
    t0, results, md = time.perf_counter(), [], ""
    for setting in settings:
        print("==", *setting, flush=True)
        results.append(run_one(args, *setting))
        md = markdown(results, args)
        save_results(stem, run_record(benchmark, args, t0, results=results), md)
    print(md)
    return results


def publish(stem, payload, md, out=None, indent=2):
    """:func:`save_results`, then print the markdown ``md``: how a run ends."""
    save_results(stem, payload, md, out=out, indent=indent)
    print(md)
