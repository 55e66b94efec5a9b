"""Test data shared by several test modules (imported as ``from _blobs import ...``)."""
import numpy as np

CENTERS = np.array([[1.5, 0, 0, 0], [-1, 1.5, 0, 0], [0, -1.5, 1, 0]])


def three_blobs(n, seed):
    """``n`` points of three overlapping Gaussian blobs in 4-D, labels 0..2."""
    rs = np.random.RandomState(seed)
    y = rs.randint(len(CENTERS), size=n)
    return CENTERS[y] + rs.randn(n, CENTERS.shape[1]), y
