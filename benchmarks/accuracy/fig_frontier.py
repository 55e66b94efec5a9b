"""LDS against cost for every method of the committed bench_peers runs (issue 31's frontier).

Reads ``bench_peers_{lr,mlp,mlp_tanh,mlp_hard}.json`` (``--models``) from the results
folder, no training: for each run's model, each method that finished with a linear
datamodeling score (LDS) is a point at its cost, the ``x train`` multiple of the run's
table (wall time from raw data to ``C`` over one plain training run timed in the same
run, so runs on differently loaded machines stay comparable), one panel per model,
hydrattr's methods (ensembles included) beside the peers' (Captum, pyDVL, dattri).

The markdown table lists every point with the frontier verdict the issue asks for: a
point is *on the frontier* when no other method reaches at least its LDS at no more cost;
for a peer's point, ``hydrattr cover`` names the cheapest hydrattr method with at least its
LDS at no more than its cost (``-`` where there is none, the target missed). Saves
``fig_frontier.{png,md,json}`` in the results folder (``--out``, default
``benchmarks/results``, or ``$HYDRATTR_BENCH_RESULTS``).

Usage::

    python benchmarks/accuracy/fig_frontier.py
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]  # benchmarks/: the shared helpers in _common
sys.path.insert(0, str(BENCH_DIR))
from _common import RESULTS, save_results  # noqa: E402

MODELS = ("lr", "mlp", "mlp_tanh", "mlp_hard")
TITLES = {"lr": "logistic regression", "mlp": "ReLU MLP", "mlp_tanh": "tanh MLP",
          "mlp_hard": "ReLU MLP, constant lr (mlp_hard)"}
STYLE = {"hydrattr": ("k", "o"), "Captum": ("tab:orange", "s"), "pyDVL": ("tab:green", "D"),
         "dattri": ("tab:purple", "^")}


def label(row):
    """The method's name, with its number of models where it averages several (the
    ``hydra-*-ens`` members, TRAK's models), read from its settings."""
    m = re.search(r"n_estimators=(\d+)|TRAK-(\d+)", row.get("settings") or "")
    return f"{row['method']} (k={m.group(1) or m.group(2)})" if m else row["method"]


def load_points(results, models):
    """``{model: (run info, [point, ...])}`` for every model with a committed run; a point
    is a finished method with an LDS: method, library, lds, time_s, cost (x train)."""
    out = {}
    for model in models:
        path = Path(results) / f"bench_peers_{model}.json"
        if not path.is_file():
            continue
        run = json.loads(path.read_text())
        mres = run["models"].get(model)
        if mres is None:
            continue
        train_s = mres["train_s"]
        pts = [dict(method=label(r), library=r["library"].split()[0], lds=r["lds"],
                    time_s=r["time_s"], cost=r["time_s"] / r.get("train_s", train_s))
               for r in mres["rows"] if r.get("status") == "ok" and r.get("lds") is not None]
        a = run["args"]
        info = dict(file=path.name, n_params=mres["n_params"], train_s=train_s,
                    n_train=a["n_train"], n_test=a["n_test"], n_lds=a["n_lds"],
                    partial=bool(mres.get("partial")))
        out[model] = (info, pts)
    return out


def frontier_verdicts(pts):
    """Mark each point: ``on_frontier`` (no other point has at least its LDS at no more
    cost, one of them strictly better) and, for a peer, ``hydrattr_cover``: the cheapest
    hydrattr point with at least its LDS at no more than its cost (None: none)."""
    for p in pts:
        p["on_frontier"] = not any(
            q is not p and q["lds"] >= p["lds"] and q["cost"] <= p["cost"]
            and (q["lds"] > p["lds"] or q["cost"] < p["cost"]) for q in pts)
        if p["library"] != "hydrattr":
            cover = [q for q in pts if q["library"] == "hydrattr"
                     and q["lds"] >= p["lds"] and q["cost"] <= p["cost"]]
            p["hydrattr_cover"] = min(cover, key=lambda q: q["cost"])["method"] if cover \
                else None
    return pts


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = list(data)
    ncol = 2 if len(models) > 1 else 1
    nrow = (len(models) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.6 * nrow), squeeze=False)
    handles = {}
    for ax, model in zip(axes.ravel(), models):
        info, pts = data[model]
        for p in pts:
            color, marker = STYLE.get(p["library"], ("tab:gray", "x"))
            # filled: on the frontier; hollow: another method does at least as well
            # for no more cost
            ax.scatter(p["cost"], p["lds"], marker=marker, s=40, zorder=3,
                       facecolors=color if p["on_frontier"] else "none", edgecolors=color)
            handles.setdefault(p["library"], Line2D(
                [], [], ls="", marker=marker, color=color, label=p["library"]))
            ax.annotate(p["method"], (p["cost"], p["lds"]), fontsize=7,
                        xytext=(4, 3) if p["library"] == "hydrattr" else (4, -10),
                        textcoords="offset points")
        front = sorted((p for p in pts if p["on_frontier"]), key=lambda p: p["cost"])
        if front:
            xs = [p["cost"] for p in front]
            ys = [p["lds"] for p in front]
            ax.step(xs + [xs[-1] * 3], ys + [ys[-1]], where="post", color="0.6", lw=1,
                    zorder=1)
        ax.set_xscale("log")
        ax.set_xlabel("cost (x one plain training run, same run)")
        ax.set_ylabel("LDS")
        ax.set_title(f"{TITLES.get(model, model)}: {info['n_params']:,} params, "
                     f"{info['n_train']:,} / {info['n_test']}"
                     + (" (partial run)" if info["partial"] else ""), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(models):]:
        ax.axis("off")
    fig.legend(handles.values(), handles.keys(), loc="lower center",
               ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle("bench_peers: linear datamodeling score against cost (grey: the frontier; "
                 "hollow: dominated)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data, png):
    lines = ["# LDS against cost: the bench_peers frontier", "",
             "Command: `python benchmarks/accuracy/fig_frontier.py`", "",
             "Read from the committed `bench_peers_<model>.json` runs (no training). Cost: "
             "the run's `x train` multiple (wall time from raw data to C over one plain "
             "training run timed in the same run). `frontier`: no other method has at "
             "least this LDS at no more cost. `hydrattr cover` (peers only): the cheapest "
             "hydrattr method with at least the peer's LDS at no more than its cost; `-`: "
             "none, so issue 31's target (hydrattr on the frontier at every cost level) is "
             "missed there.", ""]
    for model, (info, pts) in data.items():
        missed = [p["method"] for p in pts
                  if p["library"] != "hydrattr" and p["hydrattr_cover"] is None]
        lines += [f"## {TITLES.get(model, model)} (`{info['file']}`, {info['n_params']:,} "
                  f"parameters, {info['n_train']:,} train / {info['n_test']} test, "
                  f"{info['n_lds']} LDS subsets, one training run {info['train_s']:.1f} s"
                  + (", partial run" if info["partial"] else "") + ")", "",
                  "| method | library | LDS | time s | x train | frontier | hydrattr cover |",
                  "|---|---|---|---|---|---|---|"]
        for p in sorted(pts, key=lambda p: p["cost"]):
            cover = "" if p["library"] == "hydrattr" else (p["hydrattr_cover"] or "-")
            lines.append(f"| {p['method']} | {p['library']} | {p['lds']:.3f} | "
                         f"{p['time_s']:.1f} | {p['cost']:.1f} | "
                         f"{'yes' if p['on_frontier'] else ''} | {cover} |")
        lines += ["", ("Every peer point is covered by a hydrattr method." if not missed else
                       f"Peer points without a hydrattr cover: {', '.join(missed)}."), ""]
    lines += [f"![frontier]({Path(png).name})", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--results", default=str(RESULTS),
                   help="folder with the bench_peers_<model>.json runs (default: %(default)s)")
    p.add_argument("--out", default=str(RESULTS), help="where the figure and table go")
    p.add_argument("--tag", default="fig_frontier", help="output file stem")
    args = p.parse_args(argv)
    data = load_points(args.results, args.models.split(","))
    if not data:
        raise SystemExit(f"no bench_peers_<model>.json for {args.models} in {args.results}: "
                         "run benchmarks/accuracy/bench_peers.py first")
    for _, pts in data.values():
        frontier_verdicts(pts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{args.tag}.png"
    plot(data, png)
    md = markdown(data, png)
    save_results(args.tag, {"args": vars(args),
                            "models": {m: dict(info, points=pts)
                                       for m, (info, pts) in data.items()}}, md, out=out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
