"""Pure-PyTorch anomaly-detection methods (no Ray, no files). Importing this package registers them."""

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, get, names, register

# Built-in methods register themselves on import.
from medood.methods import autoencoder  # noqa: E402,F401  isort: skip
from medood.methods import squid  # noqa: E402,F401  isort: skip
from medood.methods import mae_classifier  # noqa: E402,F401  isort: skip
from medood.methods import reference_floors  # noqa: E402,F401  isort: skip
from medood.methods import self_taught  # noqa: E402,F401  isort: skip
from medood.methods import joint_embedding  # noqa: E402,F401  isort: skip
from medood.methods import contrastive_mahalanobis  # noqa: E402,F401  isort: skip
from medood.methods import dino_negatives  # noqa: E402,F401  isort: skip

__all__ = ["AnomalyMethod", "BaseConfig", "Batch", "Scores", "Stage", "get", "names", "register"]
