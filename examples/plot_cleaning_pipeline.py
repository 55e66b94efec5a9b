"""
Cleaning noisy labels inside a Pipeline, tuned by GridSearchCV
==============================================================

20% of the digits' training labels are flipped. :class:`~hydrattr.LabelNoiseCleaner`
trains a small network with HYDRA (fast mode) watching, scores every training sample
by its contribution to the loss on a small validation set with trusted labels, and
drops the most harmful ones. Wrapped in :class:`~hydrattr.CleanedClassifier`, cleaning happens inside
``fit``, so the whole thing is an ordinary scikit-learn classifier: it sits at the end
of a ``Pipeline`` and ``GridSearchCV`` tunes how much to remove.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from skorch import NeuralNetClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from torch import nn

from hydrattr import CleanedClassifier, HydraAttributor, LabelNoiseCleaner
from hydrattr.datasets import load_digits_split, make_label_noise
from hydrattr.models import MLP

data = load_digits_split(valid_size=0.2, random_state=0)
X, X_test, y_test = data.X_train, data.X_test, data.y_test
X_val, y_val = data.X_valid, data.y_valid  # small, trusted labels
y_noisy, flipped = make_label_noise(data.y_train, 0.2, random_state=0)
print(f"{flipped.sum()} of {len(y_noisy)} training labels flipped")

# %%
# The pipeline
# ------------
# The cleaner scores the rows it is given against the trusted validation set (without
# ``validation_data`` it would hold out 20% of its input, labels as noisy as the rest,
# which weakens the scores). The attributor's net uses ``train_split=None`` so that
# every row is trained on and scored. The downstream classifier is a plain logistic
# regression.
net = NeuralNetClassifier(
    MLP, module__n_features=64, module__hidden=(32,), criterion=nn.CrossEntropyLoss,
    optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.9, max_epochs=8,
    batch_size=32, train_split=None, verbose=0)
cleaner = LabelNoiseCleaner(HydraAttributor(net, mode="fast", random_state=0, verbose=0),
                            validation_data=(X_val, y_val), fraction=0.2, random_state=0)
pipe = Pipeline([
    ("float32", FunctionTransformer(lambda X: np.asarray(X, dtype=np.float32))),
    ("clf", CleanedClassifier(cleaner, LogisticRegression(max_iter=2000))),
])

# %%
# Tune the fraction removed
# -------------------------
# Cross-validation scores use the (noisy) labels of the held-out folds, as they would
# in practice; the final comparison uses the clean test labels.
search = GridSearchCV(pipe, {"clf__cleaner__fraction": [0.0, 0.1, 0.2]}, cv=3)
search.fit(X, y_noisy)
fractions = search.cv_results_["param_clf__cleaner__fraction"].data.astype(float)
cv_scores = search.cv_results_["mean_test_score"]
print("cross-validated accuracy (noisy folds):",
      {float(f): round(float(s), 3) for f, s in zip(fractions, cv_scores)})
print("best fraction:", search.best_params_["clf__cleaner__fraction"])

baseline = LogisticRegression(max_iter=2000).fit(X, y_noisy)
print(f"clean test accuracy: no cleaning {baseline.score(X_test, y_test):.3f}, "
      f"cleaned pipeline {search.score(X_test, y_test):.3f}")

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
ax0.plot(fractions, cv_scores, "o-")
ax0.set_xlabel("cleaner__fraction")
ax0.set_ylabel("CV accuracy (noisy labels)")
ax0.set_title("GridSearchCV")
s = fitted_cleaner.scores_
bins = np.linspace(np.nanpercentile(s, 1), np.nanpercentile(s, 99), 50)
ax1.hist(s[scored & ~flipped], bins=bins, alpha=0.6, label="clean label", color="tab:gray")
ax1.hist(s[scored & flipped], bins=bins, alpha=0.6, label="flipped label",
         color="tab:purple")
ax1.axvline(fitted_cleaner.threshold_, color="k", ls="--", lw=0.8, label="removed below")
ax1.set_xlabel("contribution to the validation loss (positive = helpful)")
ax1.set_title("scores of the refitted cleaner")
ax1.legend(fontsize=8)
fig.tight_layout()
plt.show()
