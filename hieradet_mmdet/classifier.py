"""Kept so that ``from hieradet_mmdet.classifier import ...`` still works: see :mod:`hieradet_mmdet.models.classifier`."""

from .models.classifier import HieraDetClassifier, load_image, preprocess_image  # noqa: F401
