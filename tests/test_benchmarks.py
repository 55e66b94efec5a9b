"""The benchmark scripts still run, on tiny settings, and what they save holds together.

The scripts in ``benchmarks/`` (``perf/``, ``accuracy/``, ``paper/``, ``studies/``)
reproduce the papers' tables over hours, so the suite cannot run them at size; but a
script that no longer runs is found only when someone starts it (``fig_fast_vs_exact``
once crashed on a trajectory stand-in that lacked an attribute the sweep had started to
read). Each test runs one script (or a chain that reads another's results) in a
subprocess on a few hundred MNIST rows and one or two epochs, with its results
redirected to ``tmp_path`` (``HYDRATTR_BENCH_RESULTS``), and checks invariants that hold
at any size and that a broken script would violate:
trained weights identical to a plain skorch fit, the oracle row removing exactly the
flipped labels, forward and adjoint recurrences agreeing, two same-seed runs agreeing
bitwise, shapes and finiteness.
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
    """Run ``benchmarks/<script>.py args`` (``script``: ``<folder>/<name>``, e.g.
    ``perf/bench_fast``) with its results under ``tmp_path/results``."""
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
    run("perf/bench_fast", "--epochs", 1, "--n-train", 256, "--n-test", 8, "--tag", "t",
        "--fit-paths", "two_pass", "fused_full", "fused_ring", "fused", "--filler", "deferred",
        tmp_path=tmp_path)
    res = saved(tmp_path, "bench_fast_t")
    assert res["weights_identical_to_plain_fit"] and res["C_finite"]
    assert res["C_shape"] == [256, 8]
    # LeNet-5's three Linear weights held as factors, or not; the same C: both stores are
    # equal here, but C is a float32 product over 61,706 coordinates whose rounding
    # differs from one product to the next (up to ~1e-4 of the largest entry seen); a
    # wrong term is off by O(1)
    assert len(res["fits"]["fused"]["factored_linear_weights"]) == 3
    assert len(res["fits"]["fused_ring"]["factored_linear_weights"]) == 3
    assert res["fits"]["fused"]["store_filler"] == "FactorLogStore"
    assert res["fits"]["fused_ring"]["store_filler"] == "DeferredStore"
    assert res["fits"]["fused_full"]["factored_linear_weights"] == []
    assert max(res["C_max_rel_diff_to_last_path"].values()) < 1e-3


def test_bench_exact(tmp_path):
    run("perf/bench_exact", "--epochs", 1, "--n-train", 256, "--n-test-mean", 8,
        "--n-test-cols", 2, "--threads", 1, "--tag", "t", tmp_path=tmp_path)
    res = saved(tmp_path, "bench_exact_t")
    assert res["weights_identical_to_plain_fit"] and res["C_finite"]
    # the forward recurrence and the adjoint sweep compute the same derivative; float32
    # LeNet-5 over 4 steps agrees to ~4e-7 (bound 1e-4: a wrong step is off by O(1))
    assert res["forward_vs_adjoint_max_rel_diff"] < 1e-4
    # the HVP sweep ran over every recorded step and the ratio is reported
    assert res["hvp_sweep_s"] > 0 and res["column_sweeps"] == 1
    assert "per_extra_column_over_hvp_sweep" in res["meets"]


def test_bench_checkpoint(tmp_path):
    run("perf/bench_checkpoint", "--quick", "--tag", "t", tmp_path=tmp_path)
    res = saved(tmp_path, "bench_checkpoint_t")
    # the checkpointed trajectory recomputes the recorded run bit for bit on the CPU
    assert res["C_identical"] and res["meets"]["snapshots"]
    assert [r["trajectory"] for r in res["rows"]] == ["memory", "checkpoint"]


def test_bench_adam_fast(tmp_path):
    run("accuracy/bench_adam_fast", "--epochs", 1, "--n-train", 64, "--n-test", 4,
        "--tag", "t", tmp_path=tmp_path)
    rows = saved(tmp_path, "bench_adam_fast_t")["rows"]
    assert {r["optimizer"] for r in rows} == {"Adam", "AdamW"}
    assert all(math.isfinite(r["pearson"]) for r in rows)


def test_bench_lowrank(tmp_path):
    run("accuracy/bench_lowrank", "--n-train", 200, "--n-test", 12, "--epochs", 1, "--ranks",
        "3,12,0.9", "--energy-ranks", 3, "--spectrum-test", "12,20", "--tag", "t",
        tmp_path=tmp_path)
    res = saved(tmp_path, "bench_lowrank_t")
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["exact", "fast (replay)", "exact, rank=3", "exact, rank=12",
                          "exact, rank=0.9", "exact, rank=3, most-energy basis"]
    assert rows["exact"]["spearman_mean"] == 1 and rows["exact"]["rel_error"] == 0
    # rank >= n_test spans every test gradient: exact mode's C up to float32 rounding
    assert rows["exact, rank=12"]["swept"] == 12
    assert rows["exact, rank=12"]["rel_error"] < 1e-4
    assert rows["exact, rank=12"]["truncation_error"] < 1e-6
    assert rows["exact, rank=3"]["swept"] == 3 and rows["exact, rank=0.9"]["swept"] <= 12
    assert all(math.isfinite(r["spearman_mean"]) for r in rows.values())
    assert sorted(res["directions_for_energy"]) == ["12", "20"]


def test_bench_influence(tmp_path):
    run("accuracy/bench_influence", "--epochs", 2, "--n-train", 100, "--loo-per-test", 2,
        "--loo-epochs", 1, "--batch-size", 50, "--cg-maxiter", 10, "--threads", 1,
        "--tag", "t", tmp_path=tmp_path)
    res = saved(tmp_path, "bench_influence_t")
    assert res["loo_same_trained_model"]  # LOO's full model is the attributors' model
    assert set(res["correlations"]) >= {"IF (CG)", "HYDRA fast", "HYDRA exact"}


def test_bench_memory(tmp_path):
    run("perf/bench_memory", "--epochs", 1, "--n-train", 300, "--n-baseline", 200,
        "--n-test", 8, "--threads", 1, "--repeat", 1, "--tag", "t", tmp_path=tmp_path)
    summary = saved(tmp_path, "bench_memory_t")["summary"]
    # the disk-backed store and trajectory give the in-memory run's contributions
    assert summary["same_n"]["same_contributions"] is True


def test_bench_cleaner_storage(tmp_path):
    run("perf/bench_cleaner_storage", "--n-train", 300, "--n-valid", 100, "--epochs", 2,
        "--milestone", 1, "--threads", 1, "--tag", "t", tmp_path=tmp_path)
    rows = {r["storage"]: r for r in saved(tmp_path, "bench_cleaner_storage_t")["rows"]}
    assert set(rows) == {"dense", "half", "replay"}
    # the same scores however they are computed: replay and the float32 dense store
    # differ in summation order only; the float16 store keeps ~3 significant digits
    assert rows["replay"]["max_rel_diff_vs_dense"] < 1e-4
    assert rows["half"]["max_rel_diff_vs_dense"] < 1e-2
    assert len({r["n_removed"] for r in rows.values()}) == 1
    assert all(r["window_start_step"] > 0 for r in rows.values())  # final phase: epoch 2


def test_bench_scaling_and_fig_scaling(tmp_path):
    run("perf/bench_scaling", "--models", "lenet5", "--n-tracked", 64, "--n-test", 4,
        "--threads", 1, "--tag", "t", tmp_path=tmp_path)
    (row,) = saved(tmp_path, "bench_scaling_t")["results"]
    assert (row["model"], row["n_tracked"], row["n_params"]) == ("lenet5", 64, 61706)
    run("perf/fig_scaling", tmp_path=tmp_path)  # reads every bench_scaling_*.json there
    assert (tmp_path / "results" / "fig_scaling.png").stat().st_size > 0


def test_fig_fast_vs_exact(tmp_path):
    run("accuracy/fig_fast_vs_exact", "--epochs", 2, "--n-train", 200, "--n-test", 20,
        "--n-track", 20, "--tangent-rows", 2, "--eval-every", 1, "--threads", 1, "--if-maxiter", 5,
        "--tag", "t", tmp_path=tmp_path)
    res = saved(tmp_path, "fig_fast_vs_exact_t")
    assert [m["epoch"] for m in res["per_epoch_fast_vs_exact"]] == [1, 2]
    # two epochs at lr 0.01: fast and exact rank 20 rows alike (measured 1.000)
    assert res["final_fast_vs_exact"]["spearman"] > 0.9
    assert res["influence_functions_vs_exact"]["same_weights_as_exact"]


def test_fast_vs_exact_causes(tmp_path):
    common = ("--n-train", 200, "--epochs", 2, "--n-test", 20, "--n-rows", 2,
              "--lanczos-iter", 5, "--hessian-rows", 64, "--threads", 1)
    run("studies/fast_vs_exact_causes", *common, "--runs", "paper", "lr0.001", "--tag", "t",
        tmp_path=tmp_path)
    res = {r["run"]: r for r in saved(tmp_path, "fast_vs_exact_causes_t")["results"]}
    paper = res["paper"]
    assert [m["epoch"] for m in paper["per_epoch_scalar"]] == [1, 2]
    # the forward recurrences against the exact adjoint and the fast replay (float32;
    # measured 1e-7), and Algorithm 1 run literally against fast mode (measured 6e-8)
    for r in res.values():
        assert max(r["checks"].values()) < 1e-4, r["checks"]
    assert paper["forward"][-1]["alg1_vs_fast"]["rel_error"] < 1e-5
    assert all(math.isfinite(sp["subset_max"]) for sp in paper["spectra"])
    run("studies/fast_vs_exact_causes", *common, "--runs", "paper", "--window-only",
        "--drop-epoch", 1, "--tag", "w", tmp_path=tmp_path)
    (w,) = saved(tmp_path, "fast_vs_exact_causes_w")["results"]
    assert w["window_only"] and w["window"]["steps"] == w["steps"] - w["window"]["start_step"]


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
    run("paper/table3_noise_cleaning", "--n-train", 300, "--n-valid", 100, "--n-test", 100,
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

    # a second run of the same setting with another optional row, merged into the first:
    # the merge refuses rows that differ, so the shared rows (no filtering, fast HYDRA,
    # oracle) must come out bitwise the same from a second process with the same seed
    run("paper/table3_noise_cleaning", "--n-train", 300, "--n-valid", 100, "--n-test", 100,
        "--epochs", 1, "--datasets", "mnist", "--rates", 0.5, "--methods", "rounds",
        "--rules", "per_class", "--retrain-seeds", 2, "--seeds-for", "oracle",
        "--threads", 1, "--work-dir", tmp_path / "work", "--tag", "t2", tmp_path=tmp_path)
    run("paper/table3_noise_cleaning", "--merge", "t,t2", "--tag", "merged", tmp_path=tmp_path)
    (merged,) = saved(tmp_path, "table3_merged")["results"]
    merged_rows = {r["method"]: r for r in merged["rows"]}
    assert set(merged_rows) == set(rows) | {"hydra_fast_pc_r2"}
    assert merged_rows["hydra_fast_pc"] == rows["hydra_fast_pc"]


def test_table4_sign_clusters(tmp_path):
    run("paper/table4_sign_clusters", "--datasets", "mnist", "--methods", "if_arnoldi",
        "--if-rank", 5, "--if-arnoldi-iter", 10, "--n-train", 300, "--n-valid", 100,
        "--n-reference", 20, "--epochs", 1, "--threads", 1, "--work-dir", tmp_path / "work",
        "--tag", "t", tmp_path=tmp_path)
    (res,) = saved(tmp_path, "table4_t")["results"]
    rows = {r["method"]: r for r in res["rows"]}
    assert any(m.startswith("hydra_fast") for m in rows) and any("if" in m for m in rows)
    assert all(0 <= r["jaccard_correct"] <= 1 for r in rows.values())


def test_table4_splits(tmp_path):
    run("studies/table4_splits", "--datasets", "mnist", "--rates", 0.5, "--seeds", 1,
        "--n-train", 300, "--n-valid", 100, "--n-reference", 20, "--epochs", 2, "--threads", 1,
        "--windows", "all", 1, "--tag", "t", tmp_path=tmp_path)
    out = saved(tmp_path, "table4_splits_t")
    rows = {r["window"]: r for r in out["summary"]}
    assert set(rows) == {"all", "1"} and all(r["n_seeds"] == 1 for r in rows.values())
    for row in rows.values():
        assert all(0 <= row[k][0] <= 100 for k in ("signs_jaccard_correct",
                                                   "mean_jaccard_correct"))
    # the window is the last of two epochs: it starts where the first one ended
    starts = {r["window"]: r["window_start_step"] for r in out["runs"]}
    assert starts["all"] == 0 and starts["1"] == math.ceil(300 / 64)


def test_table4_ensemble_parts_and_cleaning_from_parts(tmp_path):
    common = ["--dataset", "mnist", "--n-train", 300, "--n-valid", 100, "--epochs", 1,
              "--threads", 1, "--work-dir", tmp_path / "work"]
    for k in (0, 1):  # one member per process, then the combination
        run("paper/table4_ensemble_parts", *common, "--n-reference", 20, "--member", k,
            tmp_path=tmp_path)
    run("paper/table4_ensemble_parts", *common, "--n-reference", 20, "--combine", "--tag", "t",
        tmp_path=tmp_path)
    (res,) = saved(tmp_path, "table4_t")["results"]
    rows = {r["method"]: r for r in res["rows"]}
    # the average of one member is that member
    assert rows["hydra_fast_ens1"]["jaccard_correct"] == rows["hydra_fast_m0"]["jaccard_correct"]
    assert "hydra_fast_ens2" in rows
    run("studies/cleaning_from_parts", *common, "--tag", "t", tmp_path=tmp_path)
    out = saved(tmp_path, "cleaning_from_parts_t")
    assert [r["method"] for r in out["rows"]] == ["hydra_fast_m0", "hydra_fast_m1",
                                                  "hydra_fast_ens2"]
    e = out["errors"]  # kept by every member <= kept by one member <= kept by any member
    assert e["kept_wrong_by_every_member"] <= min(e["kept_wrong_per_member"])
    assert max(e["kept_wrong_per_member"]) <= e["kept_wrong_by_any_member"]


def test_hydra_objectives(tmp_path):
    run("studies/hydra_objectives", "--settings", "mnist:0.5", "--seeds", 1, "--n-train", 300,
        "--n-valid", 100, "--epochs", 2, "--no-cleanlab", "--threads", 1, "--tag", "t",
        tmp_path=tmp_path)
    (res,) = saved(tmp_path, "hydra_objectives_t")["results"]
    # the checkpoint sweep's final row against the package's fast mode (float32; the
    # script itself stops above 1e-4, measured 2e-7 here)
    assert max(res["check_max_rel_err"]) < 1e-4


def test_loo_cleaning(tmp_path):
    run("studies/loo_cleaning", "--dataset", "mnist", "--rate", 0.5, "--n-train", 100,
        "--n-valid", 50, "--epochs", 1, "--n-per-group", 2, "--threads", 1, "--tag", "t",
        tmp_path=tmp_path)
    res = saved(tmp_path, "loo_cleaning_t")
    assert len(res["subset_rows"]) == 4  # two flipped and two clean rows retrained
    assert all(0 <= v["auc"] <= 1 for v in res["full_set"].values())


@pytest.mark.parametrize("script", ["table3_gap", "oof_cleaning", "table3_tuned"])
def test_cleanlab_benchmarks(script, tmp_path):
    pytest.importorskip("cleanlab")  # optional: these scripts compare against it
    size = ["--n-train", 300, "--n-valid", 100, "--epochs", 1, "--threads", 1, "--tag", "t"]
    if script == "table3_gap":
        run(f"studies/{script}", "--datasets", "mnist", "--rates", 0.5, "--n-seeds", 1,
            "--n-test", 100, *size, tmp_path=tmp_path)
        (res,) = saved(tmp_path, "table3_gap_t")["results"]
        rows = {(r["method"], r["set"]): r for r in res["rows"]}
        assert (rows["oracle", "clean rows"]["n_rows"], rows["oracle", "clean rows"]["n_wrong"]) \
            == (150, 0)
        for m in ("hydra_fast_pc", "cleanlab"):  # the sets are built from the kept one
            kept = rows[m, "kept"]
            assert rows[m, "oracle + kept wrong"]["n_rows"] == 150 + kept["n_wrong"]
            assert rows[m, "oracle - lost clean"]["n_rows"] == kept["n_rows"] - kept["n_wrong"]
            assert (rows[m, "random errors"]["n_rows"], rows[m, "random errors"]["n_wrong"]) \
                == (kept["n_rows"], kept["n_wrong"])
    elif script == "oof_cleaning":
        run(f"studies/{script}", "--settings", "mnist:0.5", "--folds", 2, *size,
            tmp_path=tmp_path)
        (res,) = saved(tmp_path, "oof_cleaning_t")["results"]
        # zero-weight rows leave the trained weights bitwise unchanged (checked by the
        # script too; it stops otherwise)
        assert res["zero_weight_check_max_abs_diff"] == 0
        assert {r["method"] for r in res["rows"]} >= {"hydra_oof", "cleanlab"}
    else:
        run(f"studies/{script}", "--settings", "mnist:0.5", "--grid", 1.0, 0.75,
            "--reference", "none", "--retrain-seeds", 1, "--n-test", 100,
            "--work-dir", tmp_path / "work", *size, tmp_path=tmp_path)
        (res,) = saved(tmp_path, "parts/table3_tuned_t")["results"]
        # kept share g of the oracle's 1 - r: fraction 1 - g (1 - r) = 0.5 and 0.625
        assert sorted({r["fraction"] for r in res["grid"]}) == [0.5, 0.625]


def test_bench_peers_and_linearity(tmp_path):
    run("accuracy/bench_peers", "--n-train", 100, "--n-test", 5, "--n-loo", 3, "--n-lds", 4,
        "--epochs", 1, "--models", "lr", "--methods",
        "hydra-fast,hydra-exact,hydra-lowrank,hydra-lowrank-32,hydrattr-if-cg", "--no-noisy",
        "--tag", "peers", tmp_path=tmp_path)
    rows = saved(tmp_path, "peers")["models"]["lr"]["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [
        ("hydra-fast", "ok"), ("hydra-exact", "ok"), ("hydra-lowrank", "ok"),
        ("hydra-lowrank-32", "ok"), ("hydrattr-if-cg", "ok")]
    assert "rank=32" in rows[3]["settings"]
    # the ensembles and --sweep-batch: two exact members of 3 sweeps each (5 test points,
    # 2 a sweep), their settings saying so, and an LDS computed for each
    run("accuracy/bench_peers", "--n-train", 100, "--n-test", 5, "--n-loo", 3, "--n-lds", 4,
        "--epochs", 1, "--models", "lr", "--methods",
        "hydra-exact,hydra-exact-ens,hydrattr-if-arnoldi-ens", "--ens-models-exact", 2,
        "--ens-models-if", 3, "--sweep-batch", 2, "--no-noisy", "--tag", "peers_ens",
        tmp_path=tmp_path)
    rows = saved(tmp_path, "peers_ens")["models"]["lr"]["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [
        ("hydra-exact", "ok"), ("hydra-exact-ens", "ok"), ("hydrattr-if-arnoldi-ens", "ok")]
    assert "3 adjoint sweeps of at most 2 of the 5 test points" in rows[0]["settings"]
    assert "n_estimators=2" in rows[1]["settings"] and "3 adjoint sweeps" in rows[1]["settings"]
    assert "n_estimators=3" in rows[2]["settings"]
    assert all(np.isfinite(r["lds"]) for r in rows)
    run("accuracy/bench_linearity", "--quick", "--n-rows", 2, "--models", "lr", "--threads", 1,
        "--tag", "lin", tmp_path=tmp_path)
    res = saved(tmp_path, "lin")
    (model,) = res["models"]
    assert model["model"] == "lr" and len(model["per_delta"]) == len(res["deltas"])
