"""The benchmark scripts still run, on tiny settings, and what they save holds together.

The scripts in ``benchmarks/`` reproduce the papers' tables over hours, so the suite
cannot run them at size; but a script that no longer runs is found only when someone
starts it (``fig_fast_vs_exact`` once crashed on a trajectory stand-in that lacked an
attribute the sweep had started to read). Each test runs one script (or a chain that
reads another's results) in a subprocess on a few hundred MNIST rows and one or two
epochs, with its results redirected to ``tmp_path`` (``HYDRATTR_BENCH_RESULTS``), and
checks invariants that hold at any size and that a broken script would violate:
trained weights identical to a plain skorch fit, the oracle row removing exactly the
flipped labels, forward and adjoint recurrences agreeing, shapes and finiteness.
Figures are not checked: at this size they mean nothing.

The scripts read the real MNIST files, so these tests need ``HYDRATTR_DATA`` (``.ci/run``
sets it when ``../shared/data`` exists) and are skipped without it.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DATA = os.environ.get("HYDRATTR_DATA")

pytestmark = pytest.mark.skipif(
    not DATA or not (Path(DATA) / "mnist").is_dir(),
    reason="the benchmark scripts need the MNIST files: set HYDRATTR_DATA")


def run(script, *args, tmp_path):
    """Run ``benchmarks/<script>.py args`` with its results under ``tmp_path/results``."""
    env = dict(os.environ, HYDRATTR_BENCH_RESULTS=str(tmp_path / "results"),
               OMP_NUM_THREADS="1", TQDM_DISABLE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def saved(tmp_path, stem):
    """The JSON a script saved (its markdown twin must exist too)."""
    folder = tmp_path / "results"
    assert (folder / f"{stem}.md").read_text().strip()
    assert not list(folder.glob("*.tmp")), "a temporary file was left behind"
    return json.loads((folder / f"{stem}.json").read_text())


def test_bench_fast(tmp_path):
    run("bench_fast", "--epochs", 1, "--n-train", 256, "--n-test", 8, "--tag", "t",
        tmp_path=tmp_path)
    res = saved(tmp_path, "bench_fast_t")
    assert res["weights_identical_to_plain_fit"] and res["C_finite"]
    assert res["C_shape"] == [256, 8]


def test_bench_exact(tmp_path):
    run("bench_exact", "--epochs", 1, "--n-train", 256, "--n-test-mean", 8,
        "--n-test-cols", 2, "--threads", 1, "--tag", "t", tmp_path=tmp_path)
    res = saved(tmp_path, "bench_exact_t")
    assert res["weights_identical_to_plain_fit"] and res["C_finite"]
    # the forward recurrence and the adjoint sweep compute the same derivative; float32
    # LeNet-5 over 4 steps agrees to ~4e-7 (bound 1e-4: a wrong step is off by O(1))
    assert res["forward_vs_adjoint_max_rel_diff"] < 1e-4


def test_bench_adam_fast(tmp_path):
    run("bench_adam_fast", "--epochs", 1, "--n-train", 64, "--n-test", 4, "--tag", "t",
        tmp_path=tmp_path)
    rows = saved(tmp_path, "bench_adam_fast_t")["rows"]
    assert {r["optimizer"] for r in rows} == {"Adam", "AdamW"}
    assert all(math.isfinite(r["pearson"]) for r in rows)


def test_bench_influence(tmp_path):
    run("bench_influence", "--epochs", 2, "--n-train", 100, "--loo-per-test", 2,
        "--loo-epochs", 1, "--batch-size", 50, "--cg-maxiter", 10, "--threads", 1,
        "--tag", "t", tmp_path=tmp_path)
    res = saved(tmp_path, "bench_influence_t")
    assert res["loo_same_trained_model"]  # LOO's full model is the attributors' model
    assert set(res["correlations"]) >= {"IF (CG)", "HYDRA fast", "HYDRA exact"}


def test_bench_memory(tmp_path):
    run("bench_memory", "--epochs", 1, "--n-train", 300, "--n-baseline", 200, "--n-test", 8,
        "--threads", 1, "--repeat", 1, "--tag", "t", tmp_path=tmp_path)
    summary = saved(tmp_path, "bench_memory_t")["summary"]
    # the disk-backed store and trajectory give the in-memory run's contributions
    assert summary["same_n"]["same_contributions"] is True


def test_bench_scaling_and_fig_scaling(tmp_path):
    run("bench_scaling", "--models", "lenet5", "--n-tracked", 64, "--n-test", 4,
        "--threads", 1, "--tag", "t", tmp_path=tmp_path)
    (row,) = saved(tmp_path, "bench_scaling_t")["results"]
    assert (row["model"], row["n_tracked"], row["n_params"]) == ("lenet5", 64, 61706)
    run("fig_scaling", tmp_path=tmp_path)  # reads every bench_scaling_*.json there
    assert (tmp_path / "results" / "fig_scaling.png").stat().st_size > 0


def test_fig_fast_vs_exact(tmp_path):
    run("fig_fast_vs_exact", "--epochs", 2, "--n-train", 200, "--n-test", 20, "--n-track", 20,
        "--tangent-rows", 2, "--eval-every", 1, "--threads", 1, "--if-maxiter", 5,
        "--tag", "t", tmp_path=tmp_path)
    res = saved(tmp_path, "fig_fast_vs_exact_t")
    assert [m["epoch"] for m in res["per_epoch_fast_vs_exact"]] == [1, 2]
    # two epochs at lr 0.01: fast and exact rank 20 rows alike (measured 1.000)
    assert res["final_fast_vs_exact"]["spearman"] > 0.9
    assert res["influence_functions_vs_exact"]["same_weights_as_exact"]


def _check_table3(res, n_train, rate):
    rows = {r["method"]: r for r in res["rows"]}
    n_flip = res["n_flipped"]
    assert n_flip == round(rate * n_train)
    assert rows["no_filtering"]["n_removed"] == 0
    assert (rows["oracle"]["n_removed"], rows["oracle"]["precision"],
            rows["oracle"]["recall"]) == (n_flip, 1.0, 1.0)
    for r in rows.values():  # every method removes r% (per class: up to one per class more)
        if r["method"] != "no_filtering":
            assert abs(r["n_removed"] - n_flip) <= 10, r
        assert 0 <= r["test_accuracy"] <= 1
    return rows


def test_table3_noise_cleaning(tmp_path):
    run("table3_noise_cleaning", "--n-train", 300, "--n-valid", 100, "--n-test", 100,
        "--epochs", 1, "--datasets", "mnist", "--rates", 0.5, "--methods", "final_lr",
        "ens_final_lr", "exact", "--n-estimators", 2, "--rules", "global", "per_class",
        "--retrain-seeds", 2, "--seeds-for", "oracle", "--threads", 1,
        "--work-dir", tmp_path / "work", "--tag", "t", tmp_path=tmp_path)
    (res,) = saved(tmp_path, "table3_t")["results"]
    rows = _check_table3(res, 300, 0.5)
    assert {"hydra_fast", "hydra_fast_pc", "hydra_fast_final_lr_pc",
            "hydra_fast_ens2_final_lr_pc", "hydra_exact"} <= set(rows)
    assert len(rows["oracle"]["test_accuracies"]) == 2
    assert np.isclose(rows["oracle"]["test_accuracy_mean"],
                      np.mean(rows["oracle"]["test_accuracies"]))
