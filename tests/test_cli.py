"""The `hydrattr demo` main job end to end (tiny settings) and its error paths."""
import errno
import gzip
import os
import re
import stat

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import hydrattr
from hydrattr import cli
from hydrattr.cli import main
from hydrattr.datasets import IDX_FILES, make_label_noise

N_TRAIN_DIGITS = 1077  # load_digits_split(test_size=0.25, valid_size=0.2)
N_FLIPPED_DIGITS = 108  # 10% of them


def _detection_rows(text):
    """The scored rows of the printed detection table: name -> (auc, precision)."""
    found = {}
    for name, key in [("HYDRA: lowest score", "hydra"), ("own training loss: highest", "own"),
                      ("LabelNoiseCleaner: lowest mean margin", "cleaner")]:
        m = re.search(re.escape(name) + r"\s+([0-9.]+)\s+([0-9.]+)", text)
        if m:
            found[key] = (float(m.group(1)), float(m.group(2)))
    return found


def test_demo_writes_table_scores_grid_and_baseline(tmp_path, capsys):
    out = tmp_path / "out"
    old_mask = os.umask(0o022)
    try:
        rc = main(["demo", "--epochs", "2", "--out", str(out), "--quiet", "--top", "3"])
    finally:
        os.umask(old_mask)
    assert rc == 0
    text = capsys.readouterr().out
    assert "most harmful" in text and "most helpful" in text and "ROC AUC" in text
    assert "nan" not in text
    scores = pd.read_csv(out / "scores.csv")
    assert {"row", "label_given", "label_true", "flipped", "score", "own_loss"} <= set(scores.columns)
    # 10% of the digits training rows were flipped, and the flags match the labels
    assert scores.flipped.mean() == pytest.approx(0.1, abs=0.005)
    assert ((scores.label_given != scores.label_true) == scores.flipped).all()
    assert (out / "harmful_helpful.png").stat().st_size > 1000
    assert not [f for f in os.listdir(out) if f.endswith(".part.png") or ".part" in f]
    # the printed table: HYDRA (lowest score = suspect) beside the own-loss baseline
    # (highest loss = suspect), both on the same rows as scores.csv
    rows = _detection_rows(text)
    k = int(round(0.1 * len(scores)))
    f = scores.flipped.to_numpy()
    for key, suspect in [("hydra", -scores.score.to_numpy()), ("own", scores.own_loss.to_numpy()),
                         ("cleaner", -scores.margin.to_numpy())]:
        auc, prec = rows[key]
        assert auc == pytest.approx(roc_auc_score(f, suspect), abs=6e-5)
        top = np.argsort(-suspect, kind="stable")[:k]
        assert prec == pytest.approx(f[top].mean(), abs=6e-5)
    assert f"precision at k={k}" in text
    # the default cleaner's removed set, counted from the same CSV
    removed = scores.removed_by_cleaner.to_numpy()
    assert (f"removes {removed.sum()} of {len(scores)} rows; {(removed & f).sum()} of them "
            f"are flipped") in text
    # files get the mode open() would give them (0666 less the umask), not mkstemp's 0600
    for name in ("scores.csv", "harmful_helpful.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644


def test_demo_tracked_rows_are_drawn_independently_of_the_noise(tmp_path, capsys):
    # tracking as many rows as are flipped used to track exactly the flipped rows
    out = tmp_path / "out"
    rc = main(["demo", "--epochs", "1", "--track", str(N_FLIPPED_DIGITS), "--out", str(out),
               "--quiet", "--top", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == N_FLIPPED_DIGITS
    assert 0 < scores.flipped.sum() < 0.3 * len(scores)
    assert "nan" not in text and set(_detection_rows(text)) == {"hydra", "own", "cleaner"}


def test_tracked_rows_at_the_readme_size_hold_the_noise_rate():
    # the README's MNIST command: 50,000 rows, 10% flipped, 5,000 tracked
    n, track, seed = 50000, 5000, 0
    _, flipped = make_label_noise(np.zeros(n, dtype=np.int64), 0.1, n_classes=10,
                                  random_state=seed)
    rows = cli._tracked_rows(n, track, seed)
    assert len(np.unique(rows)) == track and rows.min() >= 0 and rows.max() < n
    assert flipped[rows].mean() == pytest.approx(0.1, abs=0.015)
    assert np.array_equal(rows, cli._tracked_rows(n, track, seed))  # reproducible


@pytest.mark.parametrize("extra, which", [(["--noise", "0"], "no flipped label"),
                                          (["--noise", "0.1", "--track", "1"], None)])
def test_demo_refuses_to_print_an_undefined_auc(extra, which, capsys):
    rc = main(["demo", "--epochs", "1", "--track", "20", "--out", "", "--quiet",
               "--top", "2"] + extra)
    assert rc == 0
    text = capsys.readouterr().out
    assert "nan" not in text.lower()
    assert "undefined" in text and "--track" in text
    assert not _detection_rows(text)
    if which:
        assert which in text


@pytest.mark.parametrize("option, value", [("--epochs", "0"), ("--track", "0"),
                                           ("--n-valid", "0"), ("--top", "-1"),
                                           ("--n-train", "0"), ("--epochs", "two"),
                                           ("--noise", "1.5")])
def test_demo_rejects_bad_numbers_naming_the_option(option, value, capsys, monkeypatch):
    monkeypatch.setattr("hydrattr.hydra.HydraAttributor.fit", _never_train)
    with pytest.raises(SystemExit) as exc:
        main(["demo", option, value, "--out", ""])
    assert exc.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_demo_rejects_n_train_on_digits(capsys, monkeypatch):
    monkeypatch.setattr("hydrattr.hydra.HydraAttributor.fit", _never_train)
    with pytest.raises(SystemExit):
        main(["demo", "--n-train", "500", "--out", ""])
    assert "--n-train" in capsys.readouterr().err


def _never_train(self, *args, **kwargs):
    raise AssertionError("trained before refusing")


@pytest.mark.parametrize("extra, words", [(["--track", "5000"], ["--track 5000", "1077"]),
                                          (["--n-valid", "5000"], ["--n-valid 5000", "270"])])
def test_demo_refuses_more_rows_than_there_are(extra, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hydrattr.hydra.HydraAttributor.fit", _never_train)
    rc = main(["demo", "--out", str(tmp_path / "out")] + extra)
    assert rc == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words)
    assert not (tmp_path / "out").exists()


def test_help_is_plain_text_with_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for t in (top, text):
        assert "``" not in t and ":func:" not in t
    assert "demo" in top
    options = text.split("options:")[1]
    # one entry per option (the first line starts with "  --"), each naming its default
    entries = re.split(r"\n  (?=-)", "\n" + options.strip("\n"))[1:]
    names = [e.split()[0].rstrip(",") for e in entries]
    assert {"--dataset", "--data-dir", "--noise", "--epochs", "--n-train", "--n-valid",
            "--track", "--mode", "--storage", "--top", "--out", "--seed", "--quiet"} <= set(names)
    for name, entry in zip(names, entries):
        if name not in ("-h",):
            assert "default" in entry, entry
    assert "(default: 0.1)" in text and "(default: digits)" in text and "None" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"hydrattr {hydrattr.__version__}"


@pytest.mark.parametrize("make_out", ["file", "below_a_file"])
def test_demo_checks_out_before_training(make_out, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hydrattr.hydra.HydraAttributor.fit", _never_train)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker if make_out == "file" else blocker / "out"
    rc = main(["demo", "--out", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_demo_write_failure_after_training_is_a_clear_error(tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "_image_grid", full_disk)
    out = tmp_path / "out"
    rc = main(["demo", "--epochs", "1", "--track", "20", "--out", str(out), "--quiet",
               "--top", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--out" in err
    assert not [f for f in os.listdir(out) if ".part" in f]


def test_demo_missing_data_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRATTR_DATA", raising=False)
    out = tmp_path / "never"
    rc = main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"),
               "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "HYDRATTR_DATA" in err and "data_dir" in err and "--data-dir" in err
    assert not out.exists()  # nothing half-written


def _fake_mnist(folder, broken, how, n=10001):
    """The four idx files of an all-blank MNIST; ``broken`` is plain bytes or truncated.

    ``n`` holds the default 10,000 validation rows and one training row.
    """
    folder.mkdir()
    images = np.array([2051, n, 28, 28], dtype=">u4").tobytes() + bytes(n * 784)
    labels = np.array([2049, n], dtype=">u4").tobytes() + bytes(n)
    payload = {"images": images, "labels": labels}
    for key, name in IDX_FILES.items():
        raw = payload[key.split("_")[1]]
        data = gzip.compress(raw)
        if name == broken:
            data = raw if how == "plain" else data[:len(data) // 2]
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("how", ["plain", "truncated"])
def test_demo_names_the_data_file_that_is_not_gzip(how, tmp_path, capsys):
    broken = IDX_FILES["test_labels"]
    _fake_mnist(tmp_path / "data", broken, how)
    rc = main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
               "--n-train", "1", "--out", ""])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "data" / broken) in err and "gzip" in err
