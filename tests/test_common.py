"""scikit-learn's estimator checks on every estimator of the package, plus clone,
nested parameters and pickling of fitted objects.

The checks feed data of many widths (1 to 20 features), label sets and dtypes, so the
skorch net used here is built to accept any of them (see ``AnyWidth``/``AnyLabelNet``);
what is checked is the estimators' scikit-learn behaviour (validation, ``n_features_in_``,
cloning, idempotent fits, pickling, not-fitted errors...), not attribution accuracy,
which the other test files check.
"""
import pickle
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from hydrattr import EnsembleAttributor, HydraAttributor
from hydrattr.cleaning import CleanedClassifier, LabelNoiseCleaner
from hydrattr.detection import SignClusterDetector

try:
    from hydrattr.influence import InfluenceFunctionAttributor
except ImportError:  # pragma: no cover - written concurrently
    InfluenceFunctionAttributor = None
try:
    from hydrattr.loo import LeaveOneOutAttributor
except ImportError:  # pragma: no cover
    LeaveOneOutAttributor = None

N_OUT = 32  # enough logits for every integer label the checks use


pytestmark = pytest.mark.usefixtures("one_thread")


class AnyWidth(nn.Module):
    """Three summary features of any input (mean, max, min over all entries), then a
    tiny float64 MLP: works for every number of features the checks generate."""

    def __init__(self, n_classes=N_OUT, hidden=3):
        super().__init__()
        self.l1 = nn.Linear(3, hidden, dtype=torch.float64)
        self.l2 = nn.Linear(hidden, n_classes, dtype=torch.float64)

    def forward(self, x):
        x = x.flatten(1)
        f = torch.stack([x.mean(1), x.amax(1), x.amin(1)], 1)
        return self.l2(torch.tanh(self.l1(f)))


class AnyLabelNet(NeuralNetClassifier):
    """Some checks give integral labels as floats (``y = np.array([0., 1., ...])``):
    skorch's classifier needs int64 targets, so cast them in the loss."""

    def get_loss(self, y_pred, y_true, *args, **kwargs):
        return super().get_loss(y_pred, y_true.long(), *args, **kwargs)


def tiny_net(**kw):
    params = dict(max_epochs=1, batch_size=32, criterion=nn.CrossEntropyLoss,
                  optimizer=torch.optim.SGD, lr=0.1,
                  optimizer__momentum=0.5, train_split=None, verbose=0,
                  iterator_train__shuffle=True)
    params.update(kw)
    return AnyLabelNet(AnyWidth, **params)


def hydra(mode="fast"):
    return HydraAttributor(tiny_net(), mode=mode, random_state=0, verbose=0)


def cleaner():
    return LabelNoiseCleaner(hydra(), fraction=0.1, random_state=0)


def detector():
    return SignClusterDetector(hydra(), n_reference=4, n_init=1, random_state=0)


def all_estimators():
    est = [hydra("fast"), hydra("exact"),
           EnsembleAttributor(hydra("fast"), n_estimators=2, random_state=0)]
    if LeaveOneOutAttributor is not None:
        est.append(LeaveOneOutAttributor(tiny_net(), track=2, random_state=0, verbose=0))
    if InfluenceFunctionAttributor is not None:
        est.append(InfluenceFunctionAttributor(tiny_net(), damping=0.1, random_state=0,
                                               verbose=0))
    est += [cleaner(), detector(), detector().set_params(clustering="mean"),
            CleanedClassifier(cleaner(), LogisticRegression())]
    return est


# Checks that cannot apply, with the reason. Currently every check passes for every
# estimator; keep the mapping (and the reason) here if one stops applying.
EXPECTED_FAILED = {}


def expected_failed_checks(estimator):
    return EXPECTED_FAILED.get(type(estimator).__name__, {})


@parametrize_with_checks(all_estimators(), expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        check(estimator)


# --------------------------------------------------------------------- parameters

def test_nested_params_reach_the_net_and_survive_clone():
    clf = CleanedClassifier(cleaner(), LogisticRegression())
    params = clf.get_params()
    assert params["cleaner__attributor__net__lr"] == 0.1
    assert params["cleaner__fraction"] == 0.1
    clf.set_params(cleaner__attributor__net__lr=0.5, cleaner__fraction=0.3,
                   cleaner__attributor__net__module__hidden=5)
    assert clf.cleaner.attributor.net.lr == 0.5
    assert clf.cleaner.attributor.net.module__hidden == 5
    c2 = clone(clf)
    assert c2.cleaner is not clf.cleaner and c2.cleaner.attributor.net is not clf.cleaner.attributor.net
    assert c2.get_params()["cleaner__attributor__net__lr"] == 0.5
    assert c2.get_params()["cleaner__fraction"] == 0.3
    det = detector().set_params(attributor__net__lr=0.25, attributor__mode="exact")
    assert det.get_params()["attributor__net__lr"] == 0.25
    assert clone(det).attributor.mode == "exact"


def test_nested_lr_changes_the_fitted_net():
    rng = np.random.RandomState(0)
    X, y = rng.randn(40, 3), rng.randint(0, 3, 40)
    c = cleaner().set_params(attributor__net__lr=0.0)  # lr 0: weights never move
    c.fit(X, y)
    net0 = c.net_  # the default (training dynamics) trains the attributor's net itself
    init = clone(c.attributor.net)
    torch.manual_seed(0)
    init.initialize()
    for p, q in zip(net0.module_.parameters(), init.module_.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ----------------------------------------------------------------------- pickling

def _data():
    rng = np.random.RandomState(1)
    X = rng.randn(60, 4)
    y = (X[:, 0] + 0.3 * rng.randn(60) > 0).astype(int)
    return X, y


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_pickled_fitted_attributor_attributes_identically(mode):
    X, y = _data()
    a = hydra(mode).fit(X[:40], y[:40])
    C = a.attribute(X[40:], y[40:])
    b = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(b.attribute(X[40:], y[40:]), C)  # bitwise: same ops


def test_pickled_fitted_samplers_and_meta_estimator():
    X, y = _data()
    for est in (cleaner(), detector()):
        est.fit(X, y)
        est2 = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(est2.scores_, est.scores_)
        np.testing.assert_array_equal(est2.sample_indices_, est.sample_indices_)
    clf = CleanedClassifier(cleaner(), LogisticRegression()).fit(X, y)
    clf2 = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(clf2.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(clf2.cleaner_.scores_, clf.cleaner_.scores_)


# ------------------------------------------------------------ parameter validation

def _validated_estimators():
    # scikit-learn's check_param_validation is not among the checks parametrize_with_checks
    # yields (scikit-learn runs it on its own estimators only), so it runs here on the
    # attributors and the samplers (cleaning, detection)
    from hydrattr.base import BaseAttributor

    return [e for e in all_estimators()
            if isinstance(e, (BaseAttributor, EnsembleAttributor, LabelNoiseCleaner,
                              SignClusterDetector))]


@pytest.mark.parametrize("estimator", _validated_estimators(),
                         ids=lambda e: f"{type(e).__name__}-{getattr(e, 'mode', '')}")
def test_param_validation(estimator):
    from sklearn.utils.estimator_checks import check_param_validation

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*never entered a gradient step.*")
        check_param_validation(type(estimator).__name__, estimator)
