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


def bn_dropout_net(momentum=0.9, **kw):
    """Float64 MLP classifier on :func:`three_blobs` with BatchNorm, dropout, weight decay
    and a StepLR schedule (SGD with ``momentum``; None leaves the optimizer's default,
    e.g. for ``optimizer=torch.optim.Adam``): batches of 20, 3 epochs, no train split."""
    import torch
    from skorch import NeuralNetClassifier
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import StepLR

    from hydrattr.models import MLP

    params = dict(module=MLP, module__n_features=4, module__n_classes=3, module__hidden=(8,),
                  module__activation="tanh", module__dropout=0.2, module__batchnorm=True,
                  module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                  optimizer=torch.optim.SGD, lr=0.1, optimizer__weight_decay=1e-3,
                  batch_size=20, max_epochs=3, train_split=None, verbose=0,
                  iterator_train__shuffle=True,
                  callbacks=[("lr", LRScheduler(StepLR, step_size=1, gamma=0.5))])
    if momentum is not None:
        params["optimizer__momentum"] = momentum
    params.update(kw)
    return NeuralNetClassifier(**params)


def groups_nesterov_plateau(max_epochs):
    """skorch net keyword arguments for a hard SGD setting: a second param group (the
    second layer, ``net.1.*``) at lr 0.2 without weight decay, Nesterov momentum, and
    ReduceLROnPlateau on a falling training loss in ``mode="max"`` (the rate halves
    after every epoch but the first)."""
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    return dict(optimizer__nesterov=True, optimizer__dampening=0.0, max_epochs=max_epochs,
                optimizer__param_groups=[("net.1.*", {"lr": 0.2, "weight_decay": 0.0})],
                callbacks=[("plateau", LRScheduler(ReduceLROnPlateau, monitor="train_loss",
                                                   mode="max", patience=0, factor=0.5))])
