"""Inter-class contribution matrix (paper Eq. 23 + normalization) and image grids."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from hydrattr.plotting import (CONTRIBUTION_CMAP, HARMFUL, HELPFUL,  # noqa: E402
                               interclass_contribution, plot_interclass_contribution,
                               plot_top_contributors, top_contributors)

# 4 training rows (classes 0, 0, 1, 1) x 3 test points (classes 0, 1, 1)
C = np.array([[4.0, 1.0, 3.0],
              [2.0, -1.0, -1.0],
              [0.0, 2.0, 4.0],
              [-2.0, 4.0, 2.0]])
Y_TRAIN = np.array([0, 0, 1, 1])
Y_TEST = np.array([0, 1, 1])


def test_unnormalized_matrix_is_the_mean_over_class_pairs():
    # by hand: M00 = (4 + 2) / 2 = 3, M01 = (1 + 3 - 1 - 1) / 4 = 0.5,
    #          M10 = (0 - 2) / 2 = -1, M11 = (2 + 4 + 4 + 2) / 4 = 3
    M = interclass_contribution(C, Y_TRAIN, Y_TEST, normalize=False)
    assert isinstance(M, pd.DataFrame)
    assert M.index.name == "train class" and M.columns.name == "test class"
    np.testing.assert_allclose(M.to_numpy(), [[3.0, 0.5], [-1.0, 3.0]], rtol=0, atol=1e-15)


def test_normalized_matrix_by_hand():
    # row sums 3.5, 2; column sums 2, 3.5; entry / sqrt(|row sum| * |col sum|)
    expected = [[3 / np.sqrt(7), 0.5 / 3.5], [-1 / 2.0, 3 / np.sqrt(7)]]
    M = interclass_contribution(C, Y_TRAIN, Y_TEST)
    np.testing.assert_allclose(M.to_numpy(), expected, rtol=1e-14)  # exact arithmetic


def test_negative_sums_use_magnitudes_and_nan_rows_are_skipped():
    Cn = np.vstack([C, [np.nan, np.nan, np.nan]])
    M = interclass_contribution(-Cn, np.append(Y_TRAIN, 1), Y_TEST)
    # every sum flips sign, magnitudes unchanged: the normalized matrix flips sign
    np.testing.assert_allclose(M.to_numpy(), -interclass_contribution(C, Y_TRAIN, Y_TEST)
                               .to_numpy(), rtol=1e-14)


def test_absent_class_gives_nan_and_explicit_order():
    M = interclass_contribution(C, Y_TRAIN, Y_TEST, normalize=False, classes=[1, 0, 2])
    assert list(M.index) == [1, 0, 2]
    assert M.loc[1, 0] == -1.0 and M.loc[0, 1] == 0.5
    assert M.loc[2].isna().all() and M[2].isna().all()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="y_train"):
        interclass_contribution(C, Y_TRAIN[:3], Y_TEST)
    with pytest.raises(ValueError, match="2-d"):
        interclass_contribution(C[:, 0], Y_TRAIN, Y_TEST)


def test_heatmap_draws_the_returned_matrix():
    fig, ax0 = plt.subplots()
    M, ax = plot_interclass_contribution(C, Y_TRAIN, Y_TEST, ax=ax0, annot=True,
                                         class_names=["a", "b"])
    assert ax is ax0
    np.testing.assert_array_equal(ax.images[0].get_array(), M.to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi == -np.nanmax(np.abs(M.to_numpy()))  # centred on zero
    plt.close(fig)


def test_top_contributors_grid():
    rng = np.random.RandomState(0)
    X = rng.rand(6, 1, 4, 4)
    Cg = np.array([[0.5, 0], [-2.0, 0], [3.0, 0], [np.nan, 0], [-0.1, 0], [1.0, 0]])
    fig, axes, idx = plot_top_contributors(Cg, X, y_train=np.arange(6), test_index=0, n=2,
                                           X_test=X[:2], y_test=[7, 8])
    assert axes.shape == (2, 3)
    np.testing.assert_array_equal(idx["helpful"], [2, 5])
    np.testing.assert_array_equal(idx["harmful"], [1, 4])
    np.testing.assert_array_equal(axes[0, 1].images[0].get_array(), X[2, 0])
    assert "+3" in axes[0, 1].get_title() and "y=2" in axes[0, 1].get_title()
    assert "test y=7" in axes[0, 0].get_title()
    plt.close(fig)
    # flat square images are reshaped; n larger than the valid rows is clipped
    fig, axes, idx = plot_top_contributors(Cg, X.reshape(6, 16), n=10)
    assert axes.shape == (2, 5) and len(idx["helpful"]) == 5
    assert axes[1, 0].images[0].get_array().shape == (4, 4)
    plt.close(fig)
    with pytest.raises(ValueError, match="test_index"):
        plot_top_contributors(Cg, X, test_index=5)


def test_top_contributors_table_matches_the_grid():
    Cg = np.array([[0.5, 0], [-2.0, 0], [3.0, 0], [np.nan, 0], [-0.1, 0], [1.0, 0]])
    labels = np.array(list("abcdef"))
    t = top_contributors(Cg, test_index=0, n=2, y_train=labels)
    assert list(t.columns) == ["kind", "rank", "row", "contribution", "label"]
    assert list(t["kind"]) == ["helpful", "helpful", "harmful", "harmful"]
    assert list(t["rank"]) == [1, 2, 1, 2]
    assert list(t["row"]) == [2, 5, 1, 4]  # by hand: 3.0 > 1.0 and -2.0 < -0.1
    np.testing.assert_array_equal(t["contribution"], [3.0, 1.0, -2.0, -0.1])
    assert list(t["label"]) == ["c", "f", "b", "e"]
    # the rows the image grid shows
    fig, _, idx = plot_top_contributors(Cg, np.zeros((6, 4, 4)), test_index=0, n=2)
    plt.close(fig)
    np.testing.assert_array_equal(t["row"], np.concatenate([idx["helpful"], idx["harmful"]]))
    # NaN skipped, n clipped to the finite rows; no labels, no label column
    t = top_contributors(Cg, n=10)
    assert len(t) == 10 and 3 not in set(t["row"]) and "label" not in t
    with pytest.raises(ValueError, match="test_index"):
        top_contributors(Cg, test_index=2)
    with pytest.raises(ValueError, match="n must"):
        top_contributors(Cg, n=0)
    with pytest.raises(ValueError, match="y_train"):
        top_contributors(Cg, y_train=labels[:3])


def test_one_colour_convention_helpful_blue_harmful_red():
    from matplotlib.colors import to_rgb

    blue, red = np.array(to_rgb("tab:blue")), np.array(to_rgb("tab:red"))
    assert np.allclose(to_rgb(HELPFUL), blue) and np.allclose(to_rgb(HARMFUL), red)
    # the heatmap's colormap: the most helpful entry is blue, the most harmful red
    fig, ax0 = plt.subplots()
    _, ax = plot_interclass_contribution(C, Y_TRAIN, Y_TEST, ax=ax0, normalize=False)
    im = ax.images[0]
    assert im.get_cmap().name == CONTRIBUTION_CMAP
    r_hi, g_hi, b_hi, _ = im.cmap(im.norm(im.get_clim()[1]))
    r_lo, g_lo, b_lo, _ = im.cmap(im.norm(im.get_clim()[0]))
    assert b_hi > r_hi and r_lo > b_lo
    plt.close(fig)
    # the image grid labels its rows (and contributions) in the same colours
    Cg = np.array([[0.5], [-2.0], [3.0], [-0.1]])
    fig, axes, _ = plot_top_contributors(Cg, np.zeros((4, 4, 4)), n=2)
    assert np.allclose(to_rgb(axes[0, 0].yaxis.label.get_color()), blue)
    assert np.allclose(to_rgb(axes[1, 0].yaxis.label.get_color()), red)
    assert np.allclose(to_rgb(axes[0, 1].title.get_color()), blue)
    assert np.allclose(to_rgb(axes[1, 1].title.get_color()), red)
    plt.close(fig)
