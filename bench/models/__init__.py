"""Model registry; importing the package registers the built-in models."""

from bdbench.models.base import MODELS, ImageClassifier, create_model, list_models, register_model
from bdbench.models import cifar_cnn, fmnist_cnn, preact_resnet18, wrn16_1  # noqa: F401  (registration)

__all__ = ["MODELS", "ImageClassifier", "create_model", "list_models", "register_model"]
