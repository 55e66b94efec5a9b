"""Small reference networks used by the demo, the tests and the benchmarks."""
from __future__ import annotations

from torch import nn

__all__ = ["LeNet5", "MLP", "LogisticRegression"]


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 inputs (ReLU, max pooling): 61,706 parameters.

    conv(1, 6, 5, padding=2) - relu - maxpool 2 - conv(6, 16, 5) - relu - maxpool 2 -
    fc(400, 120) - relu - fc(120, 84) - relu - fc(84, n_classes). Returns logits.
    """

    def __init__(self, n_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, n_classes),
        )

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A multilayer perceptron returning logits.

    Parameters
    ----------
    n_features, n_classes : int
    hidden : tuple of int
    activation : {"relu", "tanh"}
    dropout : float
    batchnorm : bool
    dtype : torch.dtype or None
    """

    def __init__(self, n_features=64, n_classes=10, hidden=(32,), activation="relu",
                 dropout=0.0, batchnorm=False, dtype=None):
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        layers, d = [nn.Flatten()], n_features
        for h in hidden:
            layers.append(nn.Linear(d, h, dtype=dtype))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h, dtype=dtype))
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, n_classes, dtype=dtype))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (one linear layer returning logits)."""

    def __init__(self, n_features=64, n_classes=10, dtype=None):
        super().__init__()
        self.linear = nn.Linear(n_features, n_classes, dtype=dtype)

    def forward(self, x):
        return self.linear(x.flatten(1))
