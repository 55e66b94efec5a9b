"""
Quickstart: which training digits helped, and which hurt?
=========================================================

Train a small skorch network on scikit-learn's 8x8 digits with
:class:`~hydrattr.HydraAttributor` watching, then read off the contribution of every
training sample to every test prediction:

``C[i, j] ~ loss_j(trained without i) - loss_j(trained with all)``, positive = helpful.
"""

# %%
# Data and network
# ----------------
# Any skorch net trained with ``torch.optim.SGD`` works. ``train_split=None`` makes
# every training row take part in training (skorch would otherwise hold out 20%,
# whose contributions are then exactly zero).
import matplotlib.pyplot as plt
import numpy as np
import torch
from skorch import NeuralNetClassifier
from torch import nn

from hydrattr import HydraAttributor
from hydrattr.datasets import load_digits_split
from hydrattr.plotting import HARMFUL, HELPFUL

data = load_digits_split(valid_size=0.0, random_state=0)
X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
print(f"{len(X_train)} training and {len(X_test)} test images of 8x8 pixels")


class MLP(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


net = NeuralNetClassifier(
    MLP, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.05,
    optimizer__momentum=0.9, optimizer__weight_decay=1e-4, max_epochs=15, batch_size=32,
    train_split=None, verbose=0)

# %%
# Fit and attribute
# -----------------
# ``fit`` clones ``net`` and trains the clone exactly as ``net.fit`` would (same torch
# seed), recording the trajectory; ``mode="fast"`` then builds one vector per training
# sample so that ``attribute`` is a single matrix product.
attr = HydraAttributor(net, mode="fast", random_state=0, verbose=0)
attr.fit(X_train, y_train)
C = attr.attribute(X_test, y_test)
accuracy = (attr.net_.predict(X_test) == y_test).mean()
print(f"test accuracy {accuracy:.3f}; C has shape {C.shape}")

# %%
# One test point: its most helpful and most harmful training samples
# -------------------------------------------------------------------
j = 0
order = np.argsort(C[:, j])
helpful, harmful = order[::-1][:6], order[:6]

fig, axes = plt.subplots(2, 7, figsize=(9, 3.2))
for row, idx, name in ((0, helpful, "helpful"), (1, harmful, "harmful")):
    axes[row, 0].imshow(X_test[j].reshape(8, 8), cmap="gray_r")
    axes[row, 0].set_title(f"test, y={y_test[j]}", fontsize=8)
    for k, i in enumerate(idx):
        ax = axes[row, k + 1]
        ax.imshow(X_train[i].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"y={y_train[i]}  C={C[i, j]:+.1e}", fontsize=7,
                     color=HELPFUL if name == "helpful" else HARMFUL)
    axes[row, 1].set_ylabel(name)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("most helpful (top) and most harmful (bottom) training samples for one "
             "test image")
fig.tight_layout()

# %%
# The whole test set: net effect of each training sample
# -------------------------------------------------------
# Summing a row of ``C`` gives the first-order change of the *total* test loss if the
# sample were removed. Most samples help a little; a few hurt.
total = C.sum(axis=1)
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(total, bins=60, color="tab:gray")
ax.axvline(0, color="k", lw=0.8)
ax.set_xlabel("sum over test points of C[i, j]")
ax.set_ylabel("training samples")
ax.set_title(f"{(total < 0).sum()} of {len(total)} training samples hurt the test set overall")
fig.tight_layout()
plt.show()
