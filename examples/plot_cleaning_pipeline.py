"""
Cleaning noisy labels inside a Pipeline, tuned by GridSearchCV
==============================================================

20% of the digits' training labels are flipped and no trusted labels are at hand.
:class:`~hydrattr.LabelNoiseCleaner` trains a small network once on all the rows and
reads each row's *training dynamics*: its margin (log-probability of the given label
minus the largest other) in the training forward pass of every step it entered. A net
learns a wrongly labelled row's true class long before it memorises the wrong label, so
such rows keep a low average margin; the cleaner estimates how many rows of each class
are wrong and drops that many lowest margins. Wrapped in
:class:`~hydrattr.CleanedClassifier`, cleaning happens inside ``fit``, so the whole thing
is an ordinary scikit-learn classifier: it sits at the end of a ``Pipeline`` and
``GridSearchCV`` chooses between the estimated count and fixed fractions.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from skorch import NeuralNetClassifier
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from torch import nn

from hydrattr import CleanedClassifier, LabelNoiseCleaner
from hydrattr.datasets import load_digits_split, make_label_noise
from hydrattr.models import MLP

data = load_digits_split(valid_size=0.2, random_state=0)
X, X_test, y_test = data.X_train, data.X_test, data.y_test
y_noisy, flipped = make_label_noise(data.y_train, 0.2, random_state=0)
print(f"{flipped.sum()} of {len(y_noisy)} training labels flipped")

# %%
# The pipeline
# ------------
# The cleaner's net uses ``train_split=None`` so that every row is trained on and
# scored. ``fraction=None`` (the default) removes the estimated number of wrong labels.
# The downstream classifier is a plain logistic regression.
net = NeuralNetClassifier(
    MLP, module__n_features=64, module__hidden=(32,), criterion=nn.CrossEntropyLoss,
    optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.9, max_epochs=20,
    batch_size=32, train_split=None, verbose=0)
cleaner = LabelNoiseCleaner(net, random_state=0)
pipe = Pipeline([
    ("float32", FunctionTransformer(lambda X: np.asarray(X, dtype=np.float32))),
    ("clf", CleanedClassifier(cleaner, LogisticRegression(max_iter=2000))),
])

# %%
# Choose how much to remove
# -------------------------
# Cross-validation scores use the (noisy) labels of the held-out folds, as they would
# in practice; the final comparison uses the clean test labels. ``None`` is the
# cleaner's own estimate. Scored on noisy folds, removing more always looks better
# (the removed rows' wrong labels also leave the folds' training part), so the search
# tends to pick the largest fraction; the estimated count needs no search.
grid = [0.0, 0.1, None, 0.3]
search = GridSearchCV(pipe, {"clf__cleaner__fraction": grid}, cv=3)
search.fit(X, y_noisy)
names = ["estimated" if f is None else f"{f:.1f}" for f in grid]
cv_scores = search.cv_results_["mean_test_score"]
print("cross-validated accuracy (noisy folds):",
      {n: round(float(s), 3) for n, s in zip(names, cv_scores)})
best = search.best_params_["clf__cleaner__fraction"]
print("best fraction:", "estimated" if best is None else best)

baseline = LogisticRegression(max_iter=2000).fit(X, y_noisy)
default = clone(pipe).fit(X, y_noisy)  # the estimated count, no search
print(f"clean test accuracy: no cleaning {baseline.score(X_test, y_test):.3f}, "
      f"default cleaner {default.score(X_test, y_test):.3f}, "
      f"tuned pipeline {search.score(X_test, y_test):.3f}")

# %%
# What was removed?
# -----------------
fitted_cleaner = search.best_estimator_.named_steps["clf"].cleaner_
removed = fitted_cleaner.removed_mask_
scored = ~np.isnan(fitted_cleaner.scores_)
print(f"removed {removed.sum()} rows, {flipped[removed].mean() if removed.any() else 0:.0%} "
      f"of them flipped "
      f"(base rate {flipped[scored].mean():.0%}); found "
      f"{flipped[removed].sum()} of the {flipped[scored].sum()} flipped scored rows")

# %%
# The decision row by row (``to_frame``), least useful first, with the truth beside it:
table = fitted_cleaner.to_frame()
table["flipped"] = flipped
print(table.sort_values("score").head(10))

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4))
ax0.plot(names, cv_scores, "o-")
ax0.set_xlabel("cleaner__fraction")
ax0.set_ylabel("CV accuracy (noisy labels)")
ax0.set_title("GridSearchCV")
s = fitted_cleaner.scores_
bins = np.linspace(np.nanpercentile(s, 1), np.nanpercentile(s, 99), 50)
ax1.hist(s[scored & ~flipped], bins=bins, alpha=0.6, label="clean label", color="tab:gray")
ax1.hist(s[scored & flipped], bins=bins, alpha=0.6, label="flipped label",
         color="tab:purple")
ax1.axvline(fitted_cleaner.threshold_, color="k", ls="--", lw=0.8, label="largest removed")
ax1.set_xlabel("mean training margin (low = likely wrong label)")
ax1.set_title("scores of the refitted cleaner")
ax1.legend(fontsize=8)
fig.tight_layout()
plt.show()
