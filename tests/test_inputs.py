"""Every accepted input kind gives the numpy-input contribution matrix.

X as a numpy array (the reference), a torch tensor, a skorch ``SliceDict`` (dict inputs
to ``forward``) or a ``torch.utils.data.Dataset`` (y read from the dataset). Training is
shuffled, so the rows of C only match if dataset indices are carried through. The same
seed gives the same batches and the same float64 numbers, so C must agree to rounding
(rtol 1e-12; in practice the values are bitwise equal).
"""
import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from skorch.helper import SliceDict
from torch import nn

from hydrattr import HydraAttributor

N, D, K = 40, 5, 3


class TwoInputMLP(nn.Module):
    """``forward(a, b)`` on two feature blocks; ``forward(x)`` splits one array the same way."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 8, dtype=torch.float64), nn.Tanh(),
                                 nn.Linear(8, K, dtype=torch.float64))

    def forward(self, a, b=None):
        if b is None:
            a, b = a[:, :2], a[:, 2:]
        return self.net(torch.cat([a, b], dim=1))


class PairDataset(torch.utils.data.Dataset):
    """Items ``(x_i, y_i)`` as skorch requires."""

    def __init__(self, X, y):
        self.X, self.y = torch.as_tensor(X), torch.as_tensor(y)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def _data(n, seed):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, D)
    y = (X[:, 0] + X[:, 3] > 0).astype(np.int64) + (X[:, 1] > 1).astype(np.int64)
    return X, y


def _net():
    return NeuralNetClassifier(TwoInputMLP, criterion=torch.nn.CrossEntropyLoss,
                               optimizer=torch.optim.SGD, lr=0.1, optimizer__momentum=0.9,
                               batch_size=16, max_epochs=2, train_split=None, verbose=0,
                               iterator_train__shuffle=True)


def _as(kind, X, y):
    if kind == "numpy":
        return X, y
    if kind == "tensor":
        return torch.as_tensor(X), torch.as_tensor(y)
    if kind == "slicedict":
        return SliceDict(a=X[:, :2], b=X[:, 2:]), y
    if kind == "dataset":
        return PairDataset(X, y), None
    raise ValueError(kind)


X_TRAIN, Y_TRAIN = _data(N, 0)
X_TEST, Y_TEST = _data(6, 1)


@pytest.fixture(scope="module", params=["fast", "exact"])
def reference(request):
    att = HydraAttributor(_net(), mode=request.param, random_state=0, verbose=0)
    att.fit(X_TRAIN, Y_TRAIN)
    return request.param, att.attribute(X_TEST, Y_TEST)


@pytest.mark.parametrize("kind", ["tensor", "slicedict", "dataset"])
def test_input_kind_gives_numpy_contributions(reference, kind):
    mode, C_ref = reference
    att = HydraAttributor(_net(), mode=mode, random_state=0, verbose=0)
    att.fit(*_as(kind, X_TRAIN, Y_TRAIN))
    assert att.n_train_ == N
    for test_kind in (kind, "numpy"):
        C = att.attribute(*_as(test_kind, X_TEST, Y_TEST))
        assert C.shape == (N, len(X_TEST))
        np.testing.assert_allclose(C, C_ref, rtol=1e-12, atol=1e-15)


def test_input_errors_are_clear():
    att = HydraAttributor(_net(), verbose=0)
    with pytest.raises(ValueError, match="same number of rows"):
        att.fit({"a": X_TRAIN[:, :2], "b": X_TRAIN[:-1, 2:]}, Y_TRAIN)
    with pytest.raises(ValueError, match="y has 39 rows but X has 40"):
        att.fit(SliceDict(a=X_TRAIN[:, :2], b=X_TRAIN[:, 2:]), Y_TRAIN[:-1])
    with pytest.raises(ValueError, match="y is required"):
        att.fit({"a": X_TRAIN[:, :2], "b": X_TRAIN[:, 2:]}, None)
    with pytest.raises(ValueError, match="y has 39 rows"):
        att.fit(PairDataset(X_TRAIN, Y_TRAIN), Y_TRAIN[:-1])
    bad = {"a": X_TRAIN[:, :2].copy(), "b": X_TRAIN[:, 2:]}
    bad["a"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        att.fit(bad, Y_TRAIN)
    att.fit(SliceDict(a=X_TRAIN[:, :2], b=X_TRAIN[:, 2:]), Y_TRAIN)
    with pytest.raises(ValueError, match="keys and per-sample shapes"):
        att.attribute({"a": X_TEST[:, :3], "b": X_TEST[:, 3:]}, Y_TEST)


def test_select_rows_values_and_errors():
    """``select_rows`` (HydraAttributor(track=...), LeaveOneOutAttributor(track=...))."""
    from hydrattr._inputs import select_rows

    np.testing.assert_array_equal(select_rows(None, 5, 0, "track"), np.arange(5))
    np.testing.assert_array_equal(select_rows([4, 1], 5, 0, "track"), [4, 1])
    drawn = select_rows(3, 10, 0, "track")
    assert len(set(drawn)) == 3 and list(drawn) == sorted(drawn) and drawn.max() < 10
    np.testing.assert_array_equal(select_rows(3, 10, 0, "track"), drawn)  # seeded
    assert not np.array_equal(select_rows(3, 1000, 1, "track"), select_rows(3, 1000, 0, "track"))
    for bad, msg in [(0, "between 1 and n_samples=5, got 0"), (6, "got 6"),
                     ([[1, 2]], "1-d array"), ([], "1-d array"), ([1.0], "1-d array"),
                     ([1, 1], r"unique row indices in \[0, 5\)"), ([5], r"\[0, 5\)"),
                     ([-1], r"\[0, 5\)")]:
        with pytest.raises(ValueError, match=msg):
            select_rows(bad, 5, 0, "indices")
    with pytest.raises(ValueError, match="^track must"):
        select_rows([7], 5, 0, "track")


def test_row_selection_errors_name_the_parameter():
    from hydrattr import LeaveOneOutAttributor

    with pytest.raises(ValueError, match=r"^track must hold unique row indices in \[0, 40\)"):
        HydraAttributor(_net(), track=[3, 3], verbose=0).fit(X_TRAIN, Y_TRAIN)
    with pytest.raises(ValueError, match="^track must be between 1 and n_samples=40, got 41"):
        LeaveOneOutAttributor(_net(), track=41, verbose=0).fit(X_TRAIN, Y_TRAIN)
