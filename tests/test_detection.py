"""SignClusterDetector on a planted sign structure (exact recovery), sign storage,
reference blocks, and as a sampler inside CleanedClassifier."""
import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from skorch import NeuralNetClassifier

from hydrattr import HydraAttributor
from hydrattr.cleaning import CleanedClassifier
from hydrattr.datasets import load_digits_split
from hydrattr.detection import SignClusterDetector
from hydrattr.metrics import jaccard_index
from hydrattr.models import MLP

D = 24  # references = one-hot validation rows, so C[i, j] = X_train[i, j]


class FeatureContributions(BaseEstimator):
    """Stub attributor with a known matrix: ``C = X_train @ X_val.T`` (with one-hot
    validation rows, row i's contributions are its own features)."""

    def fit(self, X, y):
        self.X_ = np.asarray(X, dtype=float)
        self.calls_ = []
        return self

    def attribute(self, X_test, y_test, objective="per_sample"):
        assert objective == "per_sample"
        self.calls_.append(len(X_test))
        return self.X_ @ np.asarray(X_test, dtype=float).T


def planted(n_per_class=40, n_classes=3, flip_frac=0.4, seed=0):
    """Per class: clean rows share a class signature (helpful on most references);
    flipped rows have a different signature that hurts most references. Signs are
    perturbed (10% of entries) and magnitudes random."""
    rng = np.random.RandomState(seed)
    X, y, flipped = [], [], []
    for c in range(n_classes):
        clean_sig = np.where(rng.rand(D) < 0.85, 1.0, -1.0)
        flip_sig = np.where(rng.rand(D) < 0.3, 1.0, -1.0)
        for k in range(n_per_class):
            is_flip = k < flip_frac * n_per_class
            sig = (flip_sig if is_flip else clean_sig).copy()
            noise = rng.rand(D) < 0.1
            sig[noise] *= -1
            X.append(sig * rng.uniform(0.5, 2.0, D))
            y.append(c)
            flipped.append(is_flip)
    perm = rng.permutation(len(y))
    return np.asarray(X)[perm], np.asarray(y)[perm], np.asarray(flipped)[perm]


def one_hot_validation():
    return np.eye(D), np.arange(D) % 3


def test_planted_sign_structure_is_recovered_exactly():
    X, y, flipped = planted()
    det = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=D,
                              validation_data=one_hot_validation(), random_state=0)
    Xk, yk = det.fit_resample(X, y)
    np.testing.assert_array_equal(det.label_issues_, flipped)
    for c in range(3):
        m = y == c
        assert jaccard_index(det.label_issues_[m], flipped[m]) == 1.0
        assert jaccard_index(~det.label_issues_[m], ~flipped[m]) == 1.0
    np.testing.assert_array_equal(det.cluster_labels_, flipped.astype(int))
    np.testing.assert_allclose(det.scores_, X.mean(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(det.sign_matrix(), np.sign(X).astype(np.int8))
    assert det.sign_vectors_.dtype == np.int8 and det.sign_vectors_.shape == (len(X), D)
    np.testing.assert_array_equal(Xk, X[~flipped])
    np.testing.assert_array_equal(det.sample_indices_, np.flatnonzero(~flipped))


def test_flagged_group_is_the_one_that_hurts_more_not_the_smaller_one():
    # 70% flipped: the flagged group is the larger one, chosen by its lower mean score
    X, y, flipped = planted(flip_frac=0.7, seed=1)
    det = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=D,
                              validation_data=one_hot_validation(), random_state=0).fit(X, y)
    np.testing.assert_array_equal(det.label_issues_, flipped)


def test_packed_storage_blocks_and_subsampled_references():
    X, y, flipped = planted(seed=2)
    full = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=D,
                               validation_data=one_hot_validation(), random_state=0).fit(X, y)
    packed = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=D, sign_storage="packed",
                                 reference_batch_size=5, validation_data=one_hot_validation(),
                                 random_state=0).fit(X, y)
    assert packed.sign_vectors_.dtype == np.uint8
    assert packed.sign_vectors_.shape == (len(X), 3)  # 24 bits in 3 bytes
    assert packed.attributor_.calls_ == [8, 8, 8]  # blocks rounded up to whole bytes
    np.testing.assert_array_equal(packed.sign_matrix(), full.sign_matrix())
    np.testing.assert_array_equal(packed.label_issues_, full.label_issues_)
    np.testing.assert_allclose(packed.scores_, full.scores_, rtol=1e-12)
    blocks = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=D, reference_batch_size=7,
                                 validation_data=one_hot_validation(), random_state=0).fit(X, y)
    assert blocks.attributor_.calls_ == [7, 7, 7, 3]
    np.testing.assert_array_equal(blocks.sign_vectors_, full.sign_vectors_)
    sub = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=10,
                              validation_data=one_hot_validation(), random_state=0).fit(X, y)
    ref = sub.reference_indices_
    assert sub.n_reference_ == 10 and len(np.unique(ref)) == 10 and ref.max() < D
    np.testing.assert_array_equal(sub.sign_matrix(), np.sign(X[:, ref]).astype(np.int8))
    many = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=1000,
                               validation_data=one_hot_validation(), random_state=0).fit(X, y)
    assert many.n_reference_ == D  # all validation points when fewer


def test_validation_split_rows_are_never_flagged():
    X, y, flipped = planted()
    det = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=5, validation_size=0.25,
                              random_state=0)
    det.fit(X, y)  # validation rows are not one-hot here: only the bookkeeping is checked
    va = det.validation_indices_
    assert len(va) == 30
    assert not det.label_issues_[va].any() and (det.cluster_labels_[va] == -1).all()
    assert np.isnan(det.scores_[va]).all()
    assert np.isin(det.reference_indices_, va).all()
    assert det.sign_vectors_.shape == (90, 5)


@pytest.mark.parametrize("kw, match", [
    (dict(n_reference=0), "n_reference"), (dict(n_init=0), "n_init"),
    (dict(sign_storage="bits"), "sign_storage"), (dict(reference_batch_size=0),
                                                  "reference_batch_size"),
    (dict(clustering="kmeans"), "clustering")])
def test_parameter_errors(kw, match):
    X, y, _ = planted()
    with pytest.raises(ValueError, match=match):
        SignClusterDetector(FeatureContributions(), **{"clustering": "signs", **kw}).fit(X, y)


def test_single_class_rows_and_identical_signs_are_not_split():
    X, y, _ = planted()
    X = np.abs(X)  # every sign +1: nothing to split
    det = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=D,
                              validation_data=one_hot_validation(), random_state=0).fit(X, y)
    assert not det.label_issues_.any() and (det.cluster_labels_ == 0).all()


def test_mean_clustering_recovers_groups_that_signs_cannot_see():
    """Every contribution positive (one sign vector per class, nothing for k-means to
    split) but the flipped rows help 5-20x less: the mean split recovers them exactly."""
    X, y, flipped = planted(seed=3)
    X = np.abs(X) * np.where(flipped, 0.1, 1.0)[:, None]
    kw = dict(n_reference=D, validation_data=one_hot_validation(), random_state=0)
    signs = SignClusterDetector(FeatureContributions(), clustering="signs", **kw).fit(X, y)
    assert not signs.label_issues_.any()
    mean = SignClusterDetector(FeatureContributions(), clustering="mean", **kw).fit(X, y)
    np.testing.assert_array_equal(mean.label_issues_, flipped)
    np.testing.assert_array_equal(mean.cluster_labels_, flipped.astype(int))
    np.testing.assert_array_equal(mean.sign_matrix(), signs.sign_matrix())  # same features


def test_mean_clustering_is_sklearns_gaussian_mixture_per_class():
    """Peer check: the flags equal a two-component GaussianMixture fitted by hand to each
    class's standardized scores, with the seeds the detector draws (references first)."""
    from sklearn.mixture import GaussianMixture

    X, y, _ = planted(n_per_class=60, flip_frac=0.5, seed=4)
    det = SignClusterDetector(FeatureContributions(), n_reference=D, n_init=3,
                              clustering="mean", validation_data=one_hot_validation(),
                              random_state=7).fit(X, y)
    rs = np.random.RandomState(7)
    rs.choice(D, size=D, replace=False)
    expected = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        s = X[y == c].mean(axis=1)
        z = ((s - s.mean()) / s.std()).reshape(-1, 1)
        gm = GaussianMixture(2, n_init=3, random_state=rs.randint(np.iinfo(np.int32).max))
        lab = gm.fit(z).predict(z)
        expected[y == c] = lab == np.argmin(gm.means_.ravel())
    assert 0 < expected.sum() < len(y)
    np.testing.assert_array_equal(det.label_issues_, expected)
    const = SignClusterDetector(FeatureContributions(), n_reference=D, clustering="mean",
                                validation_data=one_hot_validation(), random_state=0)
    const.fit(np.ones_like(X), y)  # equal scores within every class: nothing to split
    assert not const.label_issues_.any() and (const.cluster_labels_ == 0).all()


def test_label_issues_method_equals_a_refit_with_the_other_clustering():
    """Re-splitting the fitted contributions gives exactly the flags of a fresh fit
    with that clustering, and leaves the fitted detector as it was."""
    X, y, _ = planted(n_per_class=60, flip_frac=0.5, seed=5)
    X[:, :4] *= 0.05  # some references barely moved: the two splits disagree on rows
    kw = dict(n_reference=D, n_init=3, validation_size=0.25, random_state=3)
    fits = {c: SignClusterDetector(FeatureContributions(), clustering=c, **kw).fit(X, y)
            for c in ("signs", "mean")}
    for fitted, other in (("signs", "mean"), ("mean", "signs")):
        det = fits[fitted]
        before = det.label_issues_.copy()
        np.testing.assert_array_equal(det.label_issues(other), fits[other].label_issues_)
        np.testing.assert_array_equal(det.label_issues(), before)
        np.testing.assert_array_equal(det.label_issues_, before)
    assert (fits["signs"].label_issues_ != fits["mean"].label_issues_).any()
    with pytest.raises(ValueError, match="clustering"):
        fits["signs"].label_issues("gmm")
    with pytest.raises(NotFittedError):
        SignClusterDetector(FeatureContributions(), clustering="signs").label_issues()


def test_detector_with_hydra_inside_cleaned_classifier():
    """End to end with a real attributor: sign vectors are the signs of HYDRA's own C."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = load_digits_split(random_state=0)
        X, y = d.X_train[:240].astype(np.float64), d.y_train[:240]
        net = NeuralNetClassifier(
            MLP, module__n_features=64, module__n_classes=10, module__hidden=(16,),
            module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
            optimizer=torch.optim.SGD, lr=0.1,
            optimizer__momentum=0.9, max_epochs=3, batch_size=32, train_split=None,
            iterator_train__shuffle=True, verbose=0)
        det = SignClusterDetector(HydraAttributor(net, random_state=0, verbose=0), clustering="signs",
                                  n_reference=20, validation_size=0.25, random_state=0)
        clf = CleanedClassifier(det, LogisticRegression(max_iter=300)).fit(X, y)
        fitted = clf.cleaner_
        tr, ref = fitted.train_indices_, fitted.reference_indices_
        C = fitted.attributor_.attribute(X[ref], y[ref])
        np.testing.assert_array_equal(fitted.sign_matrix(), np.sign(C).astype(np.int8))
        np.testing.assert_allclose(fitted.scores_[tr], C.mean(axis=1), rtol=1e-12)
        kept = clf.sample_indices_
        assert len(kept) == len(X) - fitted.label_issues_.sum()
        ref_clf = LogisticRegression(max_iter=300).fit(X[kept], y[kept])
        np.testing.assert_allclose(clf.predict_proba(X), ref_clf.predict_proba(X), rtol=1e-10)
    finally:
        torch.set_num_threads(torch_threads)


def test_bare_net_is_wrapped_in_a_whole_run_hydra_attributor():
    """A bare skorch net becomes HydraAttributor(net) seeded by random_state, with the
    detector's verbose, the whole run (no last_epochs) and the caller's net untouched."""
    d = load_digits_split(random_state=0)
    X, y = d.X_train[:120].astype(np.float64), d.y_train[:120]
    net = NeuralNetClassifier(
        MLP, module__n_features=64, module__n_classes=10, module__hidden=(8,),
        module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD, lr=0.1, max_epochs=1, batch_size=32, train_split=None,
        verbose=0)
    det = SignClusterDetector(net, clustering="signs", n_reference=10, validation_size=0.25, random_state=0,
                              verbose=1).fit(X, y)
    att = det.attributor_
    assert isinstance(att, HydraAttributor) and att.net is not net
    assert att.random_state == 0 and att.verbose == 1 and att.last_epochs is None
    assert not hasattr(net, "module_")


def test_to_frame_adds_the_clusters():
    X, y, _ = planted()
    det = SignClusterDetector(FeatureContributions(), clustering="signs", n_reference=D,
                              validation_data=one_hot_validation(), random_state=0)
    with pytest.raises(NotFittedError):
        det.to_frame()
    det.fit(X, y)
    f = det.to_frame()
    assert list(f.columns) == ["label", "part", "score", "removed", "cluster"]
    np.testing.assert_array_equal(f["cluster"].to_numpy(), det.cluster_labels_)
    np.testing.assert_array_equal(f["removed"].to_numpy(), det.label_issues_)
    np.testing.assert_array_equal(f["label"].to_numpy(), y)
    assert (f["part"] == "train").all()  # an explicit validation set: every row trains
