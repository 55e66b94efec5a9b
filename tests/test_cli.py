"""The `hydrattr demo` main job end to end (tiny settings) and its error paths."""
import os

import pandas as pd
import pytest

from hydrattr.cli import main


def test_demo_writes_table_scores_and_grid(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["demo", "--epochs", "2", "--out", str(out), "--quiet", "--top", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "most harmful" in text and "most helpful" in text and "ROC AUC" in text
    scores = pd.read_csv(out / "scores.csv")
    assert {"row", "label_given", "label_true", "flipped", "score"} <= set(scores.columns)
    # 10% of the digits training rows were flipped, and the flags match the labels
    assert scores.flipped.mean() == pytest.approx(0.1, abs=0.005)
    assert ((scores.label_given != scores.label_true) == scores.flipped).all()
    assert (out / "harmful_helpful.png").stat().st_size > 1000
    assert not [f for f in os.listdir(out) if f.endswith(".part.png") or ".part" in f]


def test_demo_missing_data_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRATTR_DATA", raising=False)
    out = tmp_path / "never"
    rc = main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"),
               "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "HYDRATTR_DATA" in err and "data_dir" in err
    assert not out.exists()  # nothing half-written


def test_demo_rejects_bad_noise():
    with pytest.raises(SystemExit):
        main(["demo", "--noise", "1.5"])
