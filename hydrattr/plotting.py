"""Plots of attribution matrices.

* :func:`interclass_contribution` and :func:`plot_interclass_contribution`: the HYDRA
  paper's inter-class contribution matrix (Chen et al., AAAI 2021, Eq. 23 and Figure 2).
  Training rows are grouped by class ``S_a``, test columns by class ``T_b``, and

  .. math:: \\mathcal{C}(S_a, T_b) = \\frac{1}{|S_a| |T_b|} \\sum_{k \\in S_a}
            \\sum_{k' \\in T_b} C[k, k'],

  then, "as normalization, we divide every matrix entry by sqrt(column sum x row sum)".
  Contributions can be negative, and so can a row or column sum; we divide by
  ``sqrt(|row sum| * |column sum|)`` (the magnitudes), which keeps each entry's sign.
* :func:`top_contributors` (a table) and :func:`plot_top_contributors` (images): the
  most helpful and most harmful training samples for one test point.

Every figure of hydrattr, its gallery and its documentation draws helpful (``C > 0``)
in ``HELPFUL`` (blue) and harmful (``C < 0``) in ``HARMFUL`` (red); colormaps
of contributions use ``CONTRIBUTION_CMAP`` centred on zero, which runs from red
(harmful) through white to blue (helpful).

matplotlib is imported lazily (only when plotting).
"""
from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

__all__ = ["HARMFUL", "HELPFUL", "CONTRIBUTION_CMAP", "interclass_contribution",
           "plot_interclass_contribution", "plot_top_contributors", "top_contributors"]

#: Colour of helpful training samples (positive contributions) in every figure.
HELPFUL = "tab:blue"
#: Colour of harmful training samples (negative contributions) in every figure.
HARMFUL = "tab:red"
#: Diverging colormap for contributions, centred on zero: red = harmful, blue = helpful.
CONTRIBUTION_CMAP = "RdBu"


def _check_C(C, n_train=None, n_test=None):
    C = np.asarray(C, dtype=np.float64)
    if C.ndim != 2:
        raise ValueError(f"C must be a 2-d array of shape (n_train, n_test), got shape {C.shape}.")
    if n_train is not None and C.shape[0] != n_train:
        raise ValueError(f"C has {C.shape[0]} rows but y_train has {n_train} labels.")
    if n_test is not None and C.shape[1] != n_test:
        raise ValueError(f"C has {C.shape[1]} columns but y_test has {n_test} labels.")
    return C


def interclass_contribution(C, y_train, y_test, normalize=True, classes=None):
    """Average contribution of each training class to each test class (paper Eq. 23).

    Parameters
    ----------
    C : array-like of shape (n_train, n_test)
        Attribution matrix (``C[i, j]`` > 0: training sample ``i`` helped test point
        ``j``). NaN entries (e.g. untracked rows) are ignored in the averages.
    y_train : array-like of shape (n_train,)
    y_test : array-like of shape (n_test,)
    normalize : bool, default=True
        Divide entry ``(a, b)`` by ``sqrt(|row sum_a| * |column sum_b|)`` of the
        unnormalized matrix (the paper's normalization; magnitudes so that the square
        root is defined when a sum is negative). Entries whose row or column sum is
        zero become NaN.
    classes : array-like or None
        Class order of rows and columns (default: sorted union of the labels).

    Returns
    -------
    M : pandas.DataFrame of shape (n_classes, n_classes)
        Rows: training classes (index name "train class"); columns: test classes
        ("test class"). Classes absent from one side give NaN rows/columns.
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    C = _check_C(C, len(y_train), len(y_test))
    if classes is None:
        classes = np.unique(np.concatenate([y_train, y_test]))
    classes = np.asarray(classes)
    M = np.full((len(classes), len(classes)), np.nan)
    for a, ca in enumerate(classes):
        rows = y_train == ca
        if not rows.any():
            continue
        block_rows = C[rows]
        for b, cb in enumerate(classes):
            cols = y_test == cb
            if not cols.any():
                continue
            block = block_rows[:, cols]
            if np.isfinite(block).any():
                M[a, b] = np.nanmean(block)
    if normalize:
        r = np.nansum(M, axis=1)
        c = np.nansum(M, axis=0)
        denom = np.sqrt(np.abs(r)[:, None] * np.abs(c)[None, :])
        with np.errstate(divide="ignore", invalid="ignore"):
            M = np.where(denom > 0, M / denom, np.nan)
    index = pd.Index(classes, name="train class")
    columns = pd.Index(classes, name="test class")
    return pd.DataFrame(M, index=index, columns=columns)


def plot_interclass_contribution(C, y_train, y_test, normalize=True, classes=None,
                                 class_names=None, ax=None, cmap=CONTRIBUTION_CMAP,
                                 annot=False, colorbar=True):
    """Heatmap of :func:`interclass_contribution` (paper Figure 2).

    Parameters
    ----------
    C, y_train, y_test, normalize, classes
        See :func:`interclass_contribution`.
    class_names : sequence of str or None
        Tick labels (default: the class values).
    ax : matplotlib Axes or None
        Axes to draw on (a new figure when None).
    cmap : str, default=CONTRIBUTION_CMAP ("RdBu")
        Colormap, centred on zero (blue = helpful, red = harmful, as in every hydrattr
        figure).
    annot : bool, default=False
        Write each value in its cell.
    colorbar : bool, default=True

    Returns
    -------
    M : pandas.DataFrame
        The (normalized) matrix that is drawn.
    ax : matplotlib Axes
    """
    import matplotlib.pyplot as plt

    M = interclass_contribution(C, y_train, y_test, normalize=normalize, classes=classes)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.5))
    vals = M.to_numpy()
    vmax = np.nanmax(np.abs(vals)) if np.isfinite(vals).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(vals, cmap=cmap, vmin=-vmax, vmax=vmax)
    names = list(M.index) if class_names is None else list(class_names)
    if len(names) != len(M.index):
        raise ValueError(f"class_names must have {len(M.index)} entries, got {len(names)}.")
    ax.set_xticks(range(len(names)), [str(n) for n in names])
    ax.set_yticks(range(len(names)), [str(n) for n in names])
    ax.set_xlabel("test class")
    ax.set_ylabel("training class")
    ax.set_title("inter-class contribution" + (" (normalized)" if normalize else ""))
    if annot:
        for a in range(vals.shape[0]):
            for b in range(vals.shape[1]):
                if np.isfinite(vals[a, b]):
                    ax.text(b, a, f"{vals[a, b]:.2g}", ha="center", va="center", fontsize=7)
    if colorbar:
        ax.figure.colorbar(im, ax=ax)
    return M, ax


def _as_image(x, image_shape):
    x = np.asarray(x, dtype=np.float64)
    if image_shape is not None:
        return x.reshape(image_shape)
    if x.ndim == 3 and x.shape[0] in (1, 3):  # channels first
        return x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    if x.ndim == 1:
        side = int(round(np.sqrt(x.size)))
        if side * side == x.size:
            return x.reshape(side, side)
        raise ValueError(f"cannot show a flat sample of {x.size} values as an image; pass "
                         f"image_shape.")
    return x


def _top_rows(C, test_index, n):
    """Column ``test_index`` of ``C`` and its ``n`` largest / smallest finite entries'
    rows, most extreme first (ties by row)."""
    if not isinstance(test_index, numbers.Integral) or not -C.shape[1] <= test_index < C.shape[1]:
        raise ValueError(f"test_index must be an int in [0, {C.shape[1]}), got {test_index!r}.")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}.")
    col = C[:, test_index]
    valid = np.flatnonzero(np.isfinite(col))
    n = min(int(n), len(valid))
    helpful = valid[np.argsort(-col[valid], kind="stable")][:n]
    harmful = valid[np.argsort(col[valid], kind="stable")][:n]
    return col, helpful, harmful


def top_contributors(C, test_index=0, n=5, y_train=None):
    """The ``n`` most helpful and ``n`` most harmful training samples for one test point.

    Parameters
    ----------
    C : array-like of shape (n_train, n_test)
        Contributions (positive = helpful), e.g. from ``attributor.attribute``.
    test_index : int, default=0
        Column of ``C``.
    n : int, default=5
        Rows of each kind (fewer when ``C`` has fewer finite entries in the column).
    y_train : array-like of shape (n_train,) or None
        Adds a ``label`` column.

    Returns
    -------
    table : pandas.DataFrame
        Columns ``kind`` (``"helpful"``: the largest ``C[:, test_index]``, whose removal
        would raise the test loss most; ``"harmful"``: the smallest), ``rank`` (1 = most
        extreme), ``row`` (training row) and ``contribution``, plus ``label`` with
        ``y_train``: helpful rows first. NaN contributions are skipped. The same rows as
        :func:`plot_top_contributors` shows.
    """
    C = _check_C(C, n_train=None if y_train is None else len(y_train))
    col, helpful, harmful = _top_rows(C, test_index, n)
    rows = np.concatenate([helpful, harmful])
    table = pd.DataFrame({
        "kind": ["helpful"] * len(helpful) + ["harmful"] * len(harmful),
        "rank": np.concatenate([np.arange(1, len(helpful) + 1),
                                np.arange(1, len(harmful) + 1)]),
        "row": rows, "contribution": col[rows]})
    if y_train is not None:
        table["label"] = np.asarray(y_train)[rows]
    return table


def plot_top_contributors(C, X_train, y_train=None, test_index=0, n=5, X_test=None,
                          y_test=None, image_shape=None, axes=None, cmap="gray_r"):
    """The ``n`` most helpful and ``n`` most harmful training images for one test point.

    Row 0 shows the largest ``C[:, test_index]`` (helpful: removing them would raise
    the test loss), row 1 the smallest (harmful); the row labels and contributions are
    drawn in ``HELPFUL`` and ``HARMFUL``. With ``X_test`` the test image is
    drawn in an extra first column.

    Parameters
    ----------
    C : array-like of shape (n_train, n_test)
    X_train : array-like of shape (n_train, ...)
        Images: (n, H, W), (n, 1, H, W), (n, 3, H, W) or flat (n, H*W) with
        ``image_shape`` (square flat images are reshaped automatically).
    y_train : array-like of shape (n_train,) or None
        Shown in the titles.
    test_index : int, default=0
        Column of ``C``.
    n : int, default=5
    X_test, y_test : array-like or None
        To draw the test point itself.
    image_shape : tuple or None
    axes : array of matplotlib Axes of shape (2, n or n + 1) or None
    cmap : str, default="gray_r"

    Returns
    -------
    fig : matplotlib Figure
    axes : ndarray of Axes, shape (2, n) or (2, n + 1)
    indices : dict
        ``{"helpful": ndarray, "harmful": ndarray}`` training rows shown, most extreme
        first (NaN contributions are skipped).
    """
    import matplotlib.pyplot as plt

    C = _check_C(C, n_train=len(X_train))
    col, helpful, harmful = _top_rows(C, test_index, n)
    n = len(helpful)
    extra = X_test is not None
    ncols = n + int(extra)
    if axes is None:
        fig, axes = plt.subplots(2, ncols, figsize=(1.6 * ncols, 3.6), squeeze=False)
    else:
        axes = np.asarray(axes)
        if axes.shape != (2, ncols):
            raise ValueError(f"axes must have shape (2, {ncols}), got {axes.shape}.")
        fig = axes.flat[0].figure
    X_train = np.asarray(X_train)
    kinds = [(helpful, "helpful", HELPFUL), (harmful, "harmful", HARMFUL)]
    for r, (rows, label, color) in enumerate(kinds):
        for k in range(ncols):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if extra and k == 0:
                if r == 0:
                    ax.imshow(_as_image(np.asarray(X_test)[test_index], image_shape), cmap=cmap)
                    title = "test"
                    if y_test is not None:
                        title += f" y={np.asarray(y_test)[test_index]}"
                    ax.set_title(title, fontsize=8)
                else:
                    ax.axis("off")
                continue
            j = k - int(extra)
            if j >= len(rows):
                ax.axis("off")
                continue
            i = rows[j]
            ax.imshow(_as_image(X_train[i], image_shape), cmap=cmap)
            title = f"#{i}"
            if y_train is not None:
                title += f" y={np.asarray(y_train)[i]}"
            ax.set_title(f"{title}\n{col[i]:+.2g}", fontsize=8, color=color)
        axes[r, int(extra)].set_ylabel(label, color=color)
    return fig, axes, {"helpful": helpful, "harmful": harmful}
