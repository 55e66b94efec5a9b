"""
Influence functions and HYDRA on the thesis's logistic-regression toy
=====================================================================

Brinkman & Horken (2018, "Finding influential examples", Sec. 4.1 and Fig. 5.2)
validate influence functions on a convex problem before moving to a CNN: a logistic
regression on two Gaussian clusters with one extreme, mislabeled outlier. For a convex
model trained to its optimum the first-order prediction of leave-one-out (LOO) should
line up with actually retraining without each sample, and the outlier should stand
out.

This example reproduces that figure with a skorch network and hydrattr:

* :class:`~hydrattr.InfluenceFunctionAttributor` (``solver="direct"``: the 3x3
  Hessian of the training objective at the trained weights);
* :class:`~hydrattr.HydraAttributor` in ``mode="exact"`` (the derivative through the
  recorded SGD run);
* against leave-one-out *retrained from scratch*, here with scikit-learn's
  ``LogisticRegression`` at the same penalty, as the thesis did.

Every method returns ``C[i, j] ~ loss_j(trained without i) - loss_j(trained with
all)``: positive means training sample ``i`` helped test point ``j``.
"""

# %%
# The data: two clusters plus an outlier
# --------------------------------------
# :func:`hydrattr.datasets.make_logistic_toy` draws two Gaussian clusters, labels
# them ``Y ~ Bernoulli(sigmoid(1 + x1 + x2))`` (thesis Eq. 4.2) and appends one point
# far out at (8, 8) with the label the model finds least likely there.
import matplotlib.pyplot as plt
import numpy as np
import torch
from skorch import NeuralNetBinaryClassifier
from sklearn.linear_model import LogisticRegression
from torch import nn

from hydrattr import HydraAttributor, InfluenceFunctionAttributor
from hydrattr.datasets import make_logistic_toy

N = 200
data = make_logistic_toy(N, random_state=0)
X, y = data.X, data.y.astype(np.float64)
out = data.outlier_index
test = make_logistic_toy(40, random_state=1)
X_test, y_test = test.X[[0, 20]], test.y[[0, 20]].astype(np.float64)  # one per cluster

fig, ax = plt.subplots(figsize=(5, 4.5))
for label, color in ((0, "tab:gray"), (1, "tab:orange")):
    m = y == label
    ax.scatter(X[m, 0], X[m, 1], s=14, c=color, label=f"class {label}")
ax.scatter(*X[out], s=120, facecolors="none", edgecolors="k", linewidths=1.5,
           label="outlier (class 0)")
ax.scatter(X_test[:, 0], X_test[:, 1], marker="*", s=200, c="gold", edgecolors="k",
           label="test points")
ax.set(xlabel="$x_1$", ylabel="$x_2$", title="Logistic toy: two clusters and an outlier")
ax.legend(loc="upper left", fontsize=8)
plt.show()

# %%
# A skorch logistic regression trained to its optimum
# ---------------------------------------------------
# One float64 ``nn.Linear(2, 1)`` with ``BCEWithLogitsLoss``, full-batch SGD with
# momentum. Weight decay ``lam`` on the weights (not on the bias, like scikit-learn)
# makes the optimum unique; 60 heavy-ball steps reach it to rounding error.
LAM = 1e-2


def make_net():
    return NeuralNetBinaryClassifier(
        nn.Linear(2, 1, dtype=torch.float64), criterion=nn.BCEWithLogitsLoss,
        optimizer=torch.optim.SGD, lr=4.0, optimizer__momentum=0.2,
        optimizer__weight_decay=LAM, optimizer__param_groups=[("bias", {"weight_decay": 0.0})],
        batch_size=-1, train_split=None, max_epochs=60, verbose=0)


inf = InfluenceFunctionAttributor(make_net(), solver="direct", random_state=0, verbose=0)
C_if = inf.fit(X, y).attribute(X_test, y_test)
print("Hessian eigenvalues:", np.round(inf.hessian_eigenvalues_, 4))

hydra = HydraAttributor(make_net(), mode="exact", random_state=0, verbose=0)
C_hydra = hydra.fit(X, y).attribute(X_test, y_test)

# %%
# Leave-one-out, retrained from scratch
# -------------------------------------
# scikit-learn minimises ``||w||^2 / 2 + C sum_k l_k``; dividing the net's objective
# ``(1/N) sum_k l_k + lam ||w||^2 / 2`` by ``lam`` shows it is the same problem with
# ``C = 1 / (N lam)``. Refitting without sample ``i`` at that ``C`` keeps every other
# sample's weight, which is what "removing ``i``" means in the influence derivation.


def bce(theta, Xe, ye):
    f = Xe @ theta[1:] + theta[0]
    return np.logaddexp(0, f) - ye * f


def refit(rows):
    m = LogisticRegression(C=1 / (N * LAM), solver="newton-cholesky", tol=1e-12)
    m.fit(X[rows], y[rows])
    return np.r_[m.intercept_, m.coef_.ravel()]


base = bce(refit(np.arange(N)), X_test, y_test)
C_loo = np.stack([bce(refit(np.delete(np.arange(N), i)), X_test, y_test) - base
                  for i in range(N)])

# %%
# Predicted against actual influence (thesis Fig. 5.2)
# ----------------------------------------------------
# Each dot is one training sample and one test point. The outlier (ringed) is the most
# influential sample: it hurts both test points (negative ``C``: removing it lowers
# their loss). It is also where a first-order prediction is least exact, since removing
# it moves the model the most; on other test points of this toy its second-order
# term is visible (``tests/test_logistic_toy.py`` checks Pearson >= 0.99 over all
# samples and eight test points).
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
colors = np.where(y == 1, "tab:orange", "tab:gray")
for ax, C, name in ((axes[0], C_if, "influence function (direct)"),
                    (axes[1], C_hydra, "HYDRA exact")):
    for j, marker in enumerate("os"):
        ax.scatter(C[:, j], C_loo[:, j], s=12, c=colors, marker=marker, alpha=0.7)
        ax.scatter(C[out, j], C_loo[out, j], s=150, facecolors="none", edgecolors="k")
    lim = np.abs(np.r_[C.ravel(), C_loo.ravel()]).max() * 1.1
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    r = np.corrcoef(C.ravel(), C_loo.ravel())[0, 1]
    ax.set(xlabel=f"predicted: {name}", title=f"Pearson r = {r:.4f}")
axes[0].set_ylabel("actual: leave-one-out retrained from scratch")
fig.suptitle("Influence of each training sample on two test points (o, s)")
plt.show()

# %%
# How close are the two approximations?
# -------------------------------------
# Trained to convergence, the derivative through the whole SGD run (HYDRA exact) is the
# implicit derivative at the optimum (the influence function), so the two agree to
# many digits on this convex problem; on non-convex networks stopped early they part.
rel = np.linalg.norm(C_hydra - C_if) / np.linalg.norm(C_if)
print(f"||C_hydra - C_if|| / ||C_if|| = {rel:.2e}")
top = np.argsort(-np.abs(C_if).max(axis=1))[:3]
print("most influential samples (IF):", top, "-> outlier index", out)
