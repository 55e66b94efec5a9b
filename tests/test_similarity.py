"""Tests for hydrattr.similarity: hand-computed cases and sklearn / scipy peers."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.metrics.pairwise import cosine_similarity
from torch import nn

from hydrattr.similarity import (
    centroid_relationship,
    cosine_similarity_scores,
    embedding_scores,
    extract_embeddings,
    mahalanobis_scores,
)

# float64 results computed two ways agree to ~1e-15; 1e-10 leaves ample room
TOL = 1e-10


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),  # 1x6x6 -> 3x4x4 = 48
        nn.Linear(48, 8), nn.Tanh(),
        nn.Dropout(0.5),  # must be inactive: embeddings are taken in eval mode
        nn.Linear(8, 4),
    ).double()


# ------------------------------------------------------------------ cosine

def test_cosine_hand_computed():
    X_train = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    X_test = np.array([[2.0, 0.0], [0.0, 0.0]])
    S = cosine_similarity_scores(X_train, X_test)
    expected = np.array([[1.0, 0.0], [1 / np.sqrt(2), 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(S, expected, atol=TOL)


def test_cosine_matches_sklearn_on_images(rng):
    X_train = rng.random((20, 1, 5, 5))
    X_test = rng.random((7, 1, 5, 5))
    S = cosine_similarity_scores(X_train, X_test)
    assert S.shape == (20, 7)
    np.testing.assert_allclose(S, cosine_similarity(X_train.reshape(20, -1),
                                                    X_test.reshape(7, -1)), atol=TOL)
    with pytest.raises(ValueError, match="X_train and X_test"):
        cosine_similarity_scores(X_train, rng.random((3, 24)))


# ------------------------------------------------------------------ embeddings

def test_default_layer_is_input_of_last_linear(rng):
    net = _net()
    X = torch.as_tensor(rng.random((10, 1, 6, 6)))
    E = extract_embeddings(net, X, batch_size=3)  # batches of 3, 3, 3, 1
    with torch.no_grad():
        manual = net[4](net[3](net[2](net[1](net[0](X)))))  # up to Tanh; Dropout off in eval
    assert E.shape == (10, 8)
    np.testing.assert_allclose(E, manual.numpy(), atol=TOL)
    assert net.training  # training mode restored


def test_named_layer_output(rng):
    net = _net()
    X = rng.random((5, 1, 6, 6))
    E = extract_embeddings(net, X, layer="0")  # conv output, flattened per sample
    with torch.no_grad():
        manual = net[0](torch.as_tensor(X)).reshape(5, -1)
    np.testing.assert_allclose(E, manual.numpy(), atol=TOL)
    logits = extract_embeddings(net.eval(), X, layer="6")
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.as_tensor(X)).numpy(), atol=TOL)
    with pytest.raises(ValueError, match="layer"):
        extract_embeddings(net, X, layer="fc9")


def test_skorch_net_and_embedding_scores(rng):
    skorch = pytest.importorskip("skorch")
    X_train = rng.random((12, 1, 6, 6)).astype(np.float32)
    X_test = rng.random((4, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 12)
    net = skorch.NeuralNetClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 4)),
        criterion=nn.CrossEntropyLoss, max_epochs=1, train_split=None, verbose=0)
    net.fit(X_train, y)
    S = embedding_scores(net, X_train, X_test)
    m = net.module_

    def emb(X):  # manual forward up to the input of the last Linear
        with torch.no_grad():
            return m[2](m[1](m[0](torch.as_tensor(X)))).double().numpy()

    expected = cosine_similarity(emb(X_train), emb(X_test))
    assert S.shape == (12, 4)
    np.testing.assert_allclose(S, expected, atol=1e-6)  # float32 network activations
    D = embedding_scores(net.module_, X_train, X_test, metric="euclidean")
    np.testing.assert_allclose(
        D, np.linalg.norm(emb(X_train)[:, None] - emb(X_test)[None], axis=2), atol=1e-5)
    with pytest.raises(ValueError, match="metric"):
        embedding_scores(net, X_train, X_test, metric="manhattan")
    with pytest.raises(ValueError, match="net_or_module"):
        embedding_scores(object(), X_train, X_test)


# ------------------------------------------------------------------ Mahalanobis

def test_mahalanobis_hand_computed():
    # class 0: points -1, 0, 1 on a line along x with y-spread; class 1 two points
    E = np.array([[-1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [5.0, 5.0], [7.0, 5.0], [6.0, 8.0]])
    y = np.array([0, 0, 0, 1, 1, 1])
    # class 0: mean (0, 0), cov = [[1, -0.5], [-0.5, 1]] (ddof=1),
    # inverse = (1/0.75) [[1, 0.5], [0.5, 1]]; d^2 of (-1, 0) = 1/0.75 -> d = sqrt(4/3)
    # (0, 1): 1/0.75 -> sqrt(4/3); (1, -1): (1 - 1 + 1)/0.75 -> sqrt(4/3)
    D = mahalanobis_scores(E, y, reg=0.0)
    np.testing.assert_allclose(D[:3], np.sqrt(4 / 3) * np.ones(3), atol=TOL)
    # with n points in d = n - 1 dims every point has d^2 = (n - 1)^2 / n = 4/3 for n = 3
    np.testing.assert_allclose(D[3:], np.sqrt(4 / 3) * np.ones(3), atol=TOL)


def test_mahalanobis_matches_scipy(rng):
    E = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 3))
    y = np.repeat([0, 1, 2], 20)
    E[y == 1] += 4.0
    D = mahalanobis_scores(E, y, reg=0.0)
    for c in range(3):
        Ec = E[y == c]
        VI = np.linalg.inv(np.cov(Ec, rowvar=False))
        mu = Ec.mean(axis=0)
        np.testing.assert_allclose(D[y == c], [mahalanobis(e, mu, VI) for e in Ec], atol=TOL)
    # ridge version: S + reg * trace(S) / d * I
    Ec = E[y == 0]
    S = np.cov(Ec, rowvar=False)
    VI = np.linalg.inv(S + 0.1 * np.trace(S) / 3 * np.eye(3))
    np.testing.assert_allclose(mahalanobis_scores(E, y, reg=0.1)[y == 0],
                               [mahalanobis(e, Ec.mean(0), VI) for e in Ec], atol=TOL)
    # broadcast to (n_train, n_test): identical columns
    B = mahalanobis_scores(E, y, E_test=np.zeros((4, 3)))
    assert B.shape == (60, 4)
    np.testing.assert_allclose(B, np.repeat(mahalanobis_scores(E, y)[:, None], 4, axis=1))


def test_mahalanobis_errors():
    E = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 0.0]])
    with pytest.raises(ValueError, match="singular"):
        mahalanobis_scores(E[:3], [0, 0, 0], reg=0.0)  # collinear points
    assert np.all(np.isfinite(mahalanobis_scores(E[:3], [0, 0, 0])))  # default ridge works
    with pytest.raises(ValueError, match="at least 2"):
        mahalanobis_scores(E, [0, 0, 0, 1])
    with pytest.raises(ValueError, match="y_train"):
        mahalanobis_scores(E, [0, 0, 0])
    with pytest.raises(ValueError, match="reg"):
        mahalanobis_scores(E, [0, 0, 1, 1], reg=-1.0)


# ------------------------------------------------------------------ centroid relationship

def test_centroid_relationship_hand_computed():
    # class 0 centroid (1, 0); class 1 centroid (0, 2)
    E_train = np.array([[1.0, 1.0], [1.0, -1.0], [0.0, 2.0], [0.0, 2.0]])
    y_train = np.array([0, 0, 1, 1])
    E_test = np.array([[1.0, 0.0], [1.0, 1.0]])
    R = centroid_relationship(E_train, y_train, E_test)
    s = 1 / np.sqrt(2)
    # train 0/1: cos to (1, 0) is s; test 0: cos 1, test 1: cos s
    # train 2/3: cos to (0, 1) is 1; test 0: cos 0, test 1: cos s
    expected = np.array([[1 / s, 1.0], [1 / s, 1.0], [0.0, s], [0.0, s]])
    np.testing.assert_allclose(R, expected, atol=TOL)
    # Euclidean variant: train 0 is at distance 1 from (1, 0); test 1 also at 1
    Re = centroid_relationship(E_train, y_train, E_test, metric="euclidean")
    assert Re[0, 1] == pytest.approx(1.0) and Re[0, 0] == pytest.approx(0.0)
    assert np.all(np.isnan(Re[2:]))  # train 2/3 sit on their centroid: 0 denominator


def test_centroid_relationship_matches_sklearn(rng):
    E_train = rng.normal(size=(30, 5)) + 1.0
    y_train = rng.integers(0, 3, 30)
    E_test = rng.normal(size=(6, 5)) + 1.0
    R = centroid_relationship(E_train, y_train, E_test)
    for i in range(30):
        mu = E_train[y_train == y_train[i]].mean(axis=0, keepdims=True)
        d_train = cosine_similarity(E_train[i:i + 1], mu)[0, 0]
        d_test = cosine_similarity(E_test, mu)[:, 0]
        np.testing.assert_allclose(R[i], d_test / d_train, atol=TOL)
    with pytest.raises(ValueError, match="metric"):
        centroid_relationship(E_train, y_train, E_test, metric="dot")
