"""BaseAttributor input handling shared by every attributor."""
import numpy as np
import pytest
import torch
from skorch import NeuralNetRegressor
from torch import nn

from hydrattr import HydraAttributor, InfluenceFunctionAttributor

N, D = 30, 3


def _data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.5 * rng.standard_normal(N)
    Xt = rng.standard_normal((5, D))
    yt = Xt @ np.array([1.0, -2.0, 0.5])
    return X, y, Xt, yt


def _net(flat):
    torch.manual_seed(0)
    layers = [nn.Linear(D, 1, dtype=torch.float64)] + ([nn.Flatten(0)] if flat else [])
    return NeuralNetRegressor(nn.Sequential(*layers), criterion=nn.MSELoss,
                              optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.5,
                              batch_size=10, train_split=None, max_epochs=5, verbose=0)


@pytest.mark.parametrize("make", [
    lambda net: HydraAttributor(net, mode="fast", random_state=0, verbose=0),
    lambda net: HydraAttributor(net, mode="exact", random_state=0, verbose=0),
    lambda net: InfluenceFunctionAttributor(net, damping=0.1, random_state=0, verbose=0),
], ids=["hydra-fast", "hydra-exact", "if"])
def test_column_regression_target_matches_flat_target(make):
    # skorch's NeuralNetRegressor convention: module output (n, 1) with y of shape (n, 1).
    # Flattening y to (n,) would broadcast MSELoss to an n x n loss and change every
    # number; the same model written with a flat output and flat y is the ground truth.
    # Same seed, same float64 arithmetic, so agreement is to rounding (1e-10 relative).
    X, y, Xt, yt = _data()
    flat = make(_net(flat=True)).fit(X, y).attribute(Xt, yt)
    col = make(_net(flat=False)).fit(X, y[:, None]).attribute(Xt, yt[:, None])
    assert col.shape == (N, 5)
    np.testing.assert_allclose(col, flat, rtol=1e-10, atol=1e-12 * np.abs(flat).max())


def test_fit_checks_params_before_touching_data():
    # the _check_params hook lives in BaseAttributor.fit: a bad parameter is reported
    # even when the data are bad too (nothing is trained first)
    with pytest.raises(ValueError, match="mode"):
        HydraAttributor(_net(flat=True), mode="bogus").fit(np.full((4, D), np.nan),
                                                          np.zeros(4))
