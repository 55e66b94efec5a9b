"""
Sign-cluster detection of mislabeled samples, and the inter-class heatmap
=========================================================================

The detector of the HYDRA paper: each training sample is described by the *signs* of
its contributions to a few hundred validation points (helps / hurts). Within each class
(by its given, possibly wrong, label), k-means splits the sign vectors into two groups,
and the group that hurts the validation points more is flagged as mislabeled.

The validation points come from a small set with trusted labels (the digits'
validation split): with equally noisy validation labels the signs themselves are noisy.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from skorch import NeuralNetClassifier
from torch import nn

from hydrattr import HydraAttributor, SignClusterDetector
from hydrattr.datasets import load_digits_split, make_label_noise
from hydrattr.models import MLP
from hydrattr.plotting import CONTRIBUTION_CMAP, plot_interclass_contribution

data = load_digits_split(valid_size=0.2, random_state=0)
X, X_val, y_val = data.X_train, data.X_valid, data.y_valid
y_noisy, flipped = make_label_noise(data.y_train, 0.2, random_state=1)
print(f"{len(X)} training rows, {flipped.sum()} flipped; {len(X_val)} trusted validation rows")

net = NeuralNetClassifier(
    MLP, module__n_features=64, module__hidden=(32,), criterion=nn.CrossEntropyLoss,
    optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.9, max_epochs=10,
    batch_size=32, train_split=None, verbose=0)
detector = SignClusterDetector(HydraAttributor(net, mode="fast", random_state=0, verbose=0),
                               n_reference=200, validation_data=(X_val, y_val),
                               clustering="signs", random_state=0)
detector.fit(X, y_noisy)

# %%
# How well does it find the flipped labels?
# -----------------------------------------
train = detector.train_indices_
flag = detector.label_issues_[train]
truth = flipped[train]
precision = truth[flag].mean()
recall = flag[truth].mean()
print(f"flagged {flag.sum()} of {len(train)} training rows: precision {precision:.2f}, "
      f"recall {recall:.2f} (label noise {truth.mean():.0%})")
# %%
# Every class is split in two, so about half of the rows are flagged: the detector
# trades precision for recall. Its per-sample ``scores_`` (mean contribution to the
# references) rank the flipped rows too:
from hydrattr.metrics import mislabel_detection_auc  # noqa: E402

print(f"ROC AUC of scores_ for the flipped rows: "
      f"{mislabel_detection_auc(detector.scores_[train], truth):.2f}")

# %%
# Those scores can also do the split: ``clustering="mean"`` fits a two-component
# Gaussian mixture to each class's mean contributions instead of k-means on the signs.
# ``label_issues("mean")`` re-splits the fitted detector without recomputing anything.
# With few wrong labels it flags far fewer clean rows:
flag_mean = detector.label_issues("mean")[train]
print(f"mean split: flagged {flag_mean.sum()}, precision {truth[flag_mean].mean():.2f}, "
      f"recall {flag_mean[truth].mean():.2f}")

# %%
# The sign vectors of one class
# -----------------------------
# Rows: training samples labelled ``3``, sorted by cluster; columns: the reference
# validation points, sorted by their true class. Flipped samples (their true digit is
# something else) hurt the references of class 3 and help those of their true class.
cls = 3
pos = np.flatnonzero(y_noisy[train] == cls)
pos = pos[np.lexsort((truth[pos], detector.cluster_labels_[train][pos]))]
refs = detector.reference_indices_
ref_order = np.argsort(y_val[refs], kind="stable")
S = detector.sign_matrix(pos)[:, ref_order]

fig, ax = plt.subplots(figsize=(7, 4.2))
axes = [ax]
axes[0].imshow(S, aspect="auto", cmap=CONTRIBUTION_CMAP, vmin=-1, vmax=1, interpolation="nearest")
n0 = (detector.cluster_labels_[train][pos] == 0).sum()
axes[0].axhline(n0 - 0.5, color="k", lw=1.5)
axes[0].set_xlabel("reference validation points (sorted by label)")
axes[0].set_ylabel(f"training samples labelled {cls}")
axes[0].set_title(f"signs (blue = helps, red = hurts); below the line: flagged group\n"
                  f"{truth[pos][n0:].sum()} of {len(pos) - n0} flagged are truly flipped, "
                  f"{truth[pos][:n0].sum()} of {n0} kept", fontsize=9)
fig.tight_layout()

# %%
# The inter-class heatmap
# -----------------------
# Average contribution of each training class (rows) to each validation class
# (columns), normalized as in the paper: the diagonal is helpful; off-diagonal cells
# show which classes compete (e.g. 3 vs 8, 4 vs 9).
X_ref, y_ref = X_val[refs], y_val[refs]
C = detector.attributor_.attribute(X_ref, y_ref)
fig, ax = plt.subplots(figsize=(5.5, 4.5))
plot_interclass_contribution(C, y_noisy[train], y_ref, ax=ax)
ax.set_title("inter-class contribution (training labels noisy)", fontsize=9)
fig.tight_layout()
plt.show()
