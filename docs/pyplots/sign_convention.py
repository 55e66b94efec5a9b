"""The sign convention: C[i, j] = loss_j(without i) - loss_j(with all); positive = helpful.

Logistic toy (two clusters and one mislabeled outlier at (8, 8)), a linear net trained
with SGD + momentum, HYDRA exact attributions for one test point, and a check against
actually retraining without the two most helpful and the two most harmful samples.
"""
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from sklearn.base import clone
from skorch import NeuralNetClassifier
from torch import nn

from hydrattr import HydraAttributor
from hydrattr.datasets import make_logistic_toy
from hydrattr.plotting import CONTRIBUTION_CMAP, HARMFUL, HELPFUL

toy = make_logistic_toy(n_samples=120, random_state=0)
X, y = toy.X, toy.y
X_test, y_test = np.array([[1.0, 1.5]]), np.array([1])

net = NeuralNetClassifier(
    nn.Linear, module__in_features=2, module__out_features=2, module__dtype=torch.float64,
    criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.1,
    optimizer__momentum=0.9, optimizer__weight_decay=1e-2, max_epochs=30, batch_size=20,
    train_split=None, verbose=0)
attr = HydraAttributor(net, mode="exact", random_state=0, verbose=0).fit(X, y)
C = attr.attribute(X_test, y_test)[:, 0]


def test_loss(fitted):
    return -np.log(fitted.predict_proba(X_test)[0, y_test[0]])


order = np.argsort(C)
picked = list(order[:2]) + list(order[-2:])
actual = []
for i in picked:
    keep = np.arange(len(X)) != i
    torch.manual_seed(0)
    actual.append(test_loss(clone(net).fit(X[keep], y[keep])) - test_loss(attr.net_))

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.25, 1]})
lim = np.abs(C).max()
sc = ax0.scatter(X[:, 0], X[:, 1], c=C, cmap=CONTRIBUTION_CMAP, norm=TwoSlopeNorm(0, -lim, lim),
                 s=18 + 600 * np.abs(C) / lim, edgecolors=np.where(y == 1, "k", "none"),
                 linewidths=0.6)
ax0.scatter(*X_test[0], marker="*", s=320, c="gold", edgecolors="k", zorder=3,
            label="test point j (label 1)")
ax0.annotate("mislabeled outlier\n(label 0)", toy.X[toy.outlier_index], xytext=(3.5, 6.5),
             arrowprops=dict(arrowstyle="->"), fontsize=9)
fig.colorbar(sc, ax=ax0, label="C[i, j]   (blue: helpful, red: harmful)")
ax0.set_title("HYDRA (exact) contribution of each training sample")
ax0.set_xlabel("x1")
ax0.set_ylabel("x2  (black edge: label 1)")
ax0.legend(loc="lower right", fontsize=8)

pos = np.arange(len(picked))
ax1.bar(pos - 0.2, C[picked], 0.4, label="C[i, j] (HYDRA exact; blue: helpful, red: harmful)",
        color=np.where(C[picked] > 0, HELPFUL, HARMFUL))
ax1.bar(pos + 0.2, actual, 0.4, label="retrained without i", color="tab:gray")
ax1.axhline(0, color="k", lw=0.8)
ax1.set_xticks(pos, [f"sample {i}\nlabel {y[i]}" for i in picked], fontsize=8)
ax1.set_ylabel("loss_j(without i) - loss_j(with all)")
ax1.set_title("two most harmful, two most helpful")
ax1.legend(fontsize=8)
fig.tight_layout()
