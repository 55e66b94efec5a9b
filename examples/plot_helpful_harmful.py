"""
Inspecting the helpful and harmful training samples of one prediction
=====================================================================

A network trained on digits with 5% of the labels flipped makes a mistake on a test
image. Which training samples pushed it there? HYDRA in exact mode differentiates
that one test loss through the whole recorded training run (one backward sweep), and
leave-one-out retraining confirms what it finds.
"""

# %%
# Train on noisy labels while recording
# -------------------------------------
import matplotlib.pyplot as plt
import numpy as np
import torch
from skorch import NeuralNetClassifier
from torch import nn

from hydrattr import HydraAttributor
from hydrattr.datasets import load_digits_split, make_label_noise
from hydrattr.models import MLP
from hydrattr.plotting import HARMFUL, HELPFUL, top_contributors

data = load_digits_split(valid_size=0.0, random_state=0)
X_train, X_test, y_test = data.X_train.astype(np.float64), data.X_test.astype(np.float64), \
    data.y_test
y_noisy, flipped = make_label_noise(data.y_train, 0.05, random_state=0)
print(f"{flipped.sum()} of {len(y_noisy)} training labels flipped")

# float64 so that the comparison with retraining below is not blurred by rounding
net = NeuralNetClassifier(
    MLP, module__n_features=64, module__hidden=(32,), module__dtype=torch.float64,
    criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.02,
    optimizer__momentum=0.9, optimizer__weight_decay=1e-3, max_epochs=10, batch_size=32,
    train_split=None, verbose=0)
attr = HydraAttributor(net, mode="exact", random_state=0, verbose=0).fit(X_train, y_noisy)

# %%
# Pick a mistake and attribute it
# -------------------------------
# The test point with the highest loss among the misclassified ones.
proba = attr.net_.predict_proba(X_test)
loss = -np.log(proba[np.arange(len(y_test)), y_test])
wrong = np.flatnonzero(proba.argmax(1) != y_test)
j = wrong[np.argmax(loss[wrong])]
print(f"test image {j}: label {y_test[j]}, predicted {proba[j].argmax()}, loss {loss[j]:.2f}")

c = attr.attribute(X_test[[j]], y_test[[j]])[:, 0]  # one column: contributions to loss_j
order = np.argsort(c)
harmful, helpful = order[:8], order[::-1][:8]

# %%
# The same rows as a table (``hydrattr.plotting.top_contributors``), with whether each
# training label was flipped:
table = top_contributors(c[:, None], n=8, y_train=y_noisy)
table["flipped"] = flipped[table["row"]]
print(table.to_string(index=False))

# %%
# The samples themselves
# ----------------------
# Harmful samples (removing them would lower this test loss) are often images of the
# true digit carrying a wrong label, or images of the predicted digit that look like
# the test image. A purple title marks a flipped label.
fig, axes = plt.subplots(2, 9, figsize=(11, 3.3))
for row, idx, name in ((0, harmful, "harmful"), (1, helpful, "helpful")):
    axes[row, 0].imshow(X_test[j].reshape(8, 8), cmap="gray_r")
    axes[row, 0].set_title(f"test: y={y_test[j]}", fontsize=8)
    for k, i in enumerate(idx):
        ax = axes[row, k + 1]
        ax.imshow(X_train[i].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"y={y_noisy[i]} ({c[i]:+.0e})", fontsize=7,
                     color="tab:purple" if flipped[i] else "k")
    axes[row, 1].set_ylabel(name, fontsize=9)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("most harmful (top) and most helpful (bottom) training samples; "
             "purple = flipped label")
fig.tight_layout()

top = order[:20]
print(f"flipped labels among the 20 most harmful samples: {flipped[top].sum()} "
      f"(base rate {flipped.mean():.0%})")

# %%
# Check against leave-one-out
# ---------------------------
# Retrain without each of the three most harmful and three most helpful samples, in
# the same batch order (what HYDRA differentiates), and compare the measured change of
# the test loss with ``C``.
try:
    from hydrattr.loo import LeaveOneOutAttributor
except ImportError:  # pragma: no cover - leave-one-out not available
    LeaveOneOutAttributor = None

if LeaveOneOutAttributor is not None:
    rows = np.concatenate([order[:3], order[::-1][:3]])
    loo = LeaveOneOutAttributor(net, track=rows, order="same", random_state=0, verbose=0)
    measured = loo.fit(X_train, y_noisy).attribute(X_test[[j]], y_test[[j]])[rows, 0]
    fig, ax = plt.subplots(figsize=(7, 3))
    pos = np.arange(len(rows))
    ax.bar(pos - 0.2, c[rows], 0.4, label="HYDRA exact C[i, j] (blue: helpful, red: harmful)",
           color=np.where(c[rows] > 0, HELPFUL, HARMFUL))
    ax.bar(pos + 0.2, measured, 0.4, label="retrained without i (same order)",
           color="tab:gray")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(pos, [f"#{i}\ny={y_noisy[i]}" for i in rows], fontsize=8)
    ax.set_ylabel("loss_j(without i) - loss_j(with all)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    for i, pred, true in zip(rows, c[rows], measured):
        print(f"sample {i:4d}: C = {pred:+.4f}, leave-one-out = {true:+.4f}")
plt.show()
