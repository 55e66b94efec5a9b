"""The functional core of label-issue finding (hydrattr.label_issues) and the training
dynamics recorded from skorch's forward passes (hydrattr._skorch.fit_recording_dynamics)."""
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback

from hydrattr import LabelNoiseCleaner, SignClusterDetector
from hydrattr._skorch import fit_recording_dynamics
from hydrattr.datasets import load_digits_split, make_label_noise
from hydrattr.label_issues import (counts_below_trusted, estimate_issue_counts,
                                   find_label_issues, margins, remove_per_class,
                                   split_in_two)
from hydrattr.models import MLP


def mlp(epochs=20, **kw):
    params = dict(module__n_features=64, module__n_classes=10,
                  criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.05,
                  optimizer__momentum=0.9, batch_size=32, max_epochs=epochs,
                  train_split=None, verbose=0)
    params.update(kw)
    return NeuralNetClassifier(MLP, **params)


# -- pure functions ------------------------------------------------------------------
def test_margins_by_hand():
    lp = np.log(np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    m = margins(lp, np.array([0, 0, 1]))
    expected = np.log([0.7 / 0.2, 0.2 / 0.5, 0.1 / 0.8])
    np.testing.assert_allclose(m, expected, rtol=1e-12)
    # logits give the same margins (log-softmax subtracts one constant per row)
    np.testing.assert_allclose(margins(lp + 5.0, np.array([0, 0, 1])), expected, rtol=1e-12)


def planted_probs(n_per_class=100, K=4, wrong=(10, 20, 0, 5), seed=0):
    """Probabilities that put 0.8 on the true class (0.95 for wrongly labelled rows, which
    a net learns early); ``wrong[c]`` rows labelled ``c`` truly belong to class ``c + 1``."""
    rs = np.random.RandomState(seed)
    y_true = np.repeat(np.arange(K), n_per_class)
    y = y_true.copy()
    flipped = np.zeros(len(y), dtype=bool)
    for c, k in enumerate(wrong):
        rows = np.flatnonzero(y_true == (c + 1) % K)[:k]
        y[rows], flipped[rows] = c, True
    top = np.where(flipped, 0.95, 0.8)
    P = np.repeat(((1 - top) / (K - 1))[:, None], K, axis=1)
    P[np.arange(len(y)), y_true] = top
    P += rs.uniform(0, 0.01, P.shape)
    return P / P.sum(1, keepdims=True), y, flipped


def test_estimated_counts_recover_planted_wrong_labels():
    P, y, flipped = planted_probs()
    counts = estimate_issue_counts(P, y)
    # exact: every wrong row predicts its true class above that class's threshold
    np.testing.assert_array_equal(counts, [10, 20, 0, 5])
    mask = find_label_issues(P[np.arange(len(y)), y], y, counts=counts)
    np.testing.assert_array_equal(mask, flipped)


def test_estimated_counts_match_cleanlab_confident_joint():
    count = pytest.importorskip("cleanlab.count")
    rs = np.random.RandomState(1)
    P = rs.dirichlet(np.ones(5) * 0.3, size=400)
    y = rs.randint(0, 5, size=400)
    cj = count.compute_confident_joint(y, P, calibrate=True)
    off = cj.sum(1) - np.diag(cj)
    # cleanlab rounds its calibrated joint to integers after its own normalisation; per
    # class the two may differ by the rounding of one cell of each row (K - 1 cells)
    assert np.abs(estimate_issue_counts(P, y) - off).max() <= 4


def test_find_label_issues_rules():
    s = np.array([3.0, -1.0, np.nan, 0.5, -2.0, 1.0])
    y = np.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(find_label_issues(s, threshold=0.0),
                                  [False, True, False, False, True, False])
    np.testing.assert_array_equal(find_label_issues(s, fraction=0.4),
                                  [False, True, False, False, True, False])
    np.testing.assert_array_equal(find_label_issues(s, y, counts=[1, 2]),
                                  [False, True, False, True, True, False])
    # NaN rows are never removed, even when a quota would reach them
    assert not find_label_issues(s, y, counts=[3, 0])[2]
    with pytest.raises(ValueError, match="exactly one"):
        find_label_issues(s, fraction=0.1, threshold=0.0)
    with pytest.raises(ValueError, match="labels are required"):
        find_label_issues(s, counts=[1, 1])
    np.testing.assert_array_equal(remove_per_class(s[[0, 1, 3]], y[[0, 1, 3]], [1, 0]),
                                  [False, True, False])


def test_split_in_two_flags_the_planted_low_group():
    rs = np.random.RandomState(0)
    y = np.repeat([0, 1], 50)
    low = np.zeros(100, dtype=bool)
    low[:12], low[50:70] = True, True
    F = np.where(low[:, None], -1.0, 1.0) + rs.normal(0, 0.1, (100, 6))
    s = F.mean(1)
    for method in ("kmeans", "gmm"):
        clusters = split_in_two(F, s, y, {0: 1, 1: 2}, method=method)
        np.testing.assert_array_equal(clusters == 1, low)
    s[3] = np.nan
    assert split_in_two(F, s, y, {0: 1, 1: 2})[3] == -1


# -- training dynamics from the real forward passes -------------------------------------
class LogitsLog(Callback):
    """An independent record of every training batch's module output."""

    def on_train_begin(self, net, **kwargs):
        self.outputs = []

    def on_batch_end(self, net, training=False, y_pred=None, **kwargs):
        if training:
            self.outputs.append(y_pred.detach().clone())


def test_mean_margin_equals_the_aum_package(tmp_path):
    aum = pytest.importorskip("aum")
    d = load_digits_split(random_state=0)
    X, y = d.X_train[:200].astype(np.float32), d.y_train[:200]
    B = 32
    log = LogitsLog()
    # no shuffling: batch b of every epoch holds rows [b*B, (b+1)*B), an independent
    # way to know which rows each output belongs to
    net = mlp(epochs=3, batch_size=B, callbacks=[("log", log)])
    fitted, dyn = fit_recording_dynamics(net, X, y, seed=0)
    calc = aum.AUMCalculator(str(tmp_path), compressed=False)
    outputs = dict(fitted.callbacks_)["log"].outputs
    n_batches = -(-len(y) // B)
    assert len(outputs) == 3 * n_batches
    latest = {}
    for t, logits in enumerate(outputs):
        rows = np.arange((t % n_batches) * B, min((t % n_batches + 1) * B, len(y)))
        latest.update(calc.update(logits, torch.as_tensor(y[rows]), rows.tolist()))
    expected = np.array([latest[i].aum for i in range(len(y))])
    # float32 logits, float64 accumulation on our side: agreement to float32 rounding
    np.testing.assert_allclose(dyn.mean_margin(), expected, rtol=1e-5, atol=1e-5)
    assert dyn.count.sum(0).tolist() == [3] * len(y)


def test_dynamics_follow_shuffled_batches_and_probabilities_are_averaged():
    d = load_digits_split(random_state=0)
    X, y = d.X_train[:150].astype(np.float32), d.y_train[:150]
    _, dyn = fit_recording_dynamics(mlp(epochs=2, iterator_train__shuffle=True), X, y, seed=0)
    # every row enters once per epoch whatever the order
    np.testing.assert_array_equal(dyn.count, np.ones((2, 150)))
    np.testing.assert_allclose(dyn.mean_probs().sum(1), 1.0, rtol=1e-6)
    assert dyn.epoch_margins().shape == (150, 2)


def test_dynamics_refuse_a_diverged_run():
    d = load_digits_split(random_state=0)
    X, y = d.X_train[:100].astype(np.float32), d.y_train[:100]
    with pytest.raises(ValueError, match="diverged"):
        fit_recording_dynamics(mlp(epochs=3, lr=1e12), X, y, seed=0)


# -- the estimators' defaults on noisy data without trusted labels -----------------------
@pytest.fixture(scope="module")
def noisy_digits():
    d = load_digits_split(random_state=0)
    yn, flipped = make_label_noise(d.y_train, 0.2, random_state=1)
    return d.X_train.astype(np.float32), yn, flipped


def test_default_cleaner_finds_wrong_labels_without_trusted_data(noisy_digits):
    X, yn, flipped = noisy_digits
    with warnings.catch_warnings():  # a net that learned must not be reported as not
        warnings.filterwarnings("error", message=".*has not learned.*")
        c = LabelNoiseCleaner(mlp(), random_state=0).fit(X, yn)
    r = c.removed_mask_
    precision, recall = flipped[r].mean(), flipped[r].sum() / flipped.sum()
    # measured 0.95 / 0.90 (random: 0.20; the previous default 0.2-0.4); the bounds leave
    # room for other CPUs' rounding over 20 epochs of SGD
    assert precision >= 0.85 and recall >= 0.75
    assert np.isfinite(c.scores_).all()
    # the count: per class the midpoint of min(confident learning's estimate, the
    # low-margin group of the trajectory split) and that group's negative mean margins,
    # recomputed here from the fitted dynamics
    dyn, K = c.dynamics_, len(c.classes_)
    confident = estimate_issue_counts(dyn.mean_probs(), yn, n_classes=K)
    rs = np.random.RandomState(0)
    seeds = {k: rs.randint(np.iinfo(np.int32).max) for k in range(K)}
    split = split_in_two(dyn.epoch_margins(), c.scores_, yn, seeds) == 1
    low = np.minimum(confident, np.bincount(yn[split], minlength=K))
    high = np.bincount(yn[split & (c.scores_ < 0)], minlength=K)
    expected = np.floor((low + high) / 2 + 0.5).astype(int)
    np.testing.assert_array_equal(c.estimated_counts_, expected)
    np.testing.assert_array_equal(np.bincount(yn[r], minlength=K), expected)
    # each class loses exactly its lowest mean margins
    for k in range(K):
        rows = np.flatnonzero(yn == k)
        assert c.scores_[rows][r[rows]].max(initial=-np.inf) <= \
            c.scores_[rows][~r[rows]].min()


def test_counts_below_trusted_by_hand():
    trusted = np.arange(101.0)  # the 1% quantile is 1.0 exactly
    scores = np.array([0.5, 0.99, 1.0, 3.0, -7.0, np.nan])
    labels = np.array([0, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(counts_below_trusted(scores, labels, trusted, 3), [1, 1, 1])
    np.testing.assert_array_equal(
        counts_below_trusted(scores, labels, np.r_[trusted, np.nan], 4, quantile=0.5),
        [1, 2, 2, 0])
    with pytest.raises(ValueError, match="trusted_scores"):
        counts_below_trusted(scores, labels, [np.nan], 3)
    with pytest.raises(ValueError, match="quantile"):
        counts_below_trusted(scores, labels, trusted, 3, quantile=1.0)


def test_trusted_validation_caps_the_count(noisy_digits):
    X, yn, flipped = noisy_digits
    d = load_digits_split(random_state=0)
    Xv, yv = d.X_valid.astype(np.float32), d.y_valid
    c = LabelNoiseCleaner(mlp(), validation_data=(Xv, yv), random_state=0).fit(X, yn)
    r, K = c.removed_mask_, len(c.classes_)
    # the trusted rows' margins from the same run, recorded here independently (seed 0:
    # the cleaner's random_state); the training rows' scores confirm it is the same run
    _, dyn = fit_recording_dynamics(mlp(), np.concatenate([X, Xv]), np.r_[yn, yv], seed=0)
    np.testing.assert_array_equal(dyn.mean_margin()[:len(X)], c.scores_)
    cap = counts_below_trusted(c.scores_, yn, dyn.take(slice(len(X), None)).mean_margin(), K)
    assert (c.estimated_counts_ <= cap).all()
    np.testing.assert_array_equal(np.bincount(yn[r], minlength=K), c.estimated_counts_)
    # the issue's target: with trusted labels never worse than without (0.95 measured
    # without, see test_default_cleaner_finds_wrong_labels_without_trusted_data)
    assert flipped[r].mean() >= 0.85


def test_trusted_validation_is_trained_on_but_never_scored(noisy_digits):
    X, yn, flipped = noisy_digits
    d = load_digits_split(random_state=0)
    Xv, yv = d.X_valid.astype(np.float32), d.y_valid
    c = LabelNoiseCleaner(mlp(epochs=2), validation_data=(Xv, yv), random_state=0)
    c.fit(X, yn)
    assert len(c.scores_) == len(X) and len(c.removed_mask_) == len(X)
    # the net saw both: batches per epoch cover len(X) + len(Xv) rows
    seen = sum(b["train_batch_size"] for b in c.net_.history[0]["batches"])
    assert seen == len(X) + len(Xv)


def test_default_detector_flags_about_the_wrong_labels(noisy_digits):
    X, yn, flipped = noisy_digits
    det = SignClusterDetector(mlp(), random_state=0).fit(X, yn)
    flagged = det.label_issues_
    # issue target: within +-25% of the true count and at least 0.8 precise (measured
    # 1.09x and 0.90; the paper's sign clusters flagged 44% of the rows at 0.17)
    assert 0.75 * flipped.sum() <= flagged.sum() <= 1.25 * flipped.sum()
    assert flipped[flagged].mean() >= 0.8
    with pytest.raises(ValueError, match="no contributions"):
        det.label_issues("signs")


def test_detector_on_a_binary_task_flags_only_negative_margins():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    yn, flipped = make_label_noise(y, 0.2, random_state=100)
    net = mlp(module__n_features=30, module__n_classes=2)
    det = SignClusterDetector(net, random_state=0).fit(X, yn)
    flagged = det.label_issues_
    np.testing.assert_array_equal(flagged, (det.cluster_labels_ == 1) & (det.scores_ < 0))
    # a binary class split in two puts hard clean rows in the low group too (without the
    # sign rule 125 rows were flagged for 77 wrong ones, 0.58 precise); measured here:
    # within 5% of the true count at 0.83-0.89 precision over two seeds
    assert 0.75 * flipped.sum() <= flagged.sum() <= 1.25 * flipped.sum()
    assert flipped[flagged].mean() >= 0.75


def test_a_net_that_learned_nothing_is_reported():
    d = load_digits_split(random_state=0)
    X, y = d.X_train[:200].astype(np.float32), d.y_train[:200]
    with pytest.warns(UserWarning, match="has not learned the task"):
        LabelNoiseCleaner(mlp(epochs=1, lr=1e-6), random_state=0).fit(X, y)
    with pytest.warns(UserWarning, match="has not learned the task"):
        SignClusterDetector(mlp(epochs=1, lr=1e-6), random_state=0).fit(X, y)


def test_contribution_score_without_trusted_validation_warns():
    d = load_digits_split(random_state=0)
    X, y = d.X_train[:120].astype(np.float32), d.y_train[:120]
    with pytest.warns(UserWarning, match="validation_data with trusted labels"):
        LabelNoiseCleaner(mlp(epochs=1), score_by="contribution", fraction=0.1,
                          random_state=0).fit(X, y)
