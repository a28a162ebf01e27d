"""Kept so that ``from hieradet_mmdet.hieradet import HieraDet`` still works: see :mod:`hieradet_mmdet.models`."""

from .models.hieradet import ARCH_KEYS, ARCH_NAMES, ARCH_SETTINGS, HieraDet, resolve_arch  # noqa: F401
