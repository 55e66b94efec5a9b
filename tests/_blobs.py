"""Test data and helpers shared by several test modules (imported as
``from _blobs import ...``)."""
import os

import numpy as np

HAS_PROC_MAPS = os.path.exists("/proc/self/maps")


def mapped_files(directory):
    """Files under ``directory`` that this process has memory-mapped (Linux
    ``/proc/self/maps``; a file without a name shows as ``... (deleted)``)."""
    with open("/proc/self/maps") as f:
        return [line.split(None, 5)[-1].strip() for line in f if str(directory) in line]

CENTERS = np.array([[1.5, 0, 0, 0], [-1, 1.5, 0, 0], [0, -1.5, 1, 0]])


def three_blobs(n, seed):
    """``n`` points of three overlapping Gaussian blobs in 4-D, labels 0..2."""
    rs = np.random.RandomState(seed)
    y = rs.randint(len(CENTERS), size=n)
    return CENTERS[y] + rs.randn(n, CENTERS.shape[1]), y
