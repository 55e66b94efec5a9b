"""hydrattr: which training samples helped, and which hurt, this prediction?

Training-data attribution for skorch networks: HYDRA hypergradients (fast and exact),
influence functions and leave-one-out retraining, all returning the same matrix
``C[i, j] ~ loss_j(trained without i) - loss_j(trained with all)``.
"""
from .base import BaseAttributor
from .hydra import HydraAttributor
from .influence import InfluenceFunctionAttributor
from .loo import LeaveOneOutAttributor
from .distributed import parallel_attribute
from .ensemble import EnsembleAttributor
from . import datasets, metrics, models, similarity  # noqa: E402  (submodules)
from .cleaning import CleanedClassifier, LabelNoiseCleaner
from .detection import SignClusterDetector
from . import plotting  # noqa: E402  (submodule)

__version__ = "0.1.0"

__all__ = ["BaseAttributor", "EnsembleAttributor", "HydraAttributor", "InfluenceFunctionAttributor",
           "LeaveOneOutAttributor", "__version__",
           "parallel_attribute"]

__all__ += ["CleanedClassifier", "LabelNoiseCleaner", "SignClusterDetector"]
