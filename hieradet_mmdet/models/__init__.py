"""The HieraDet model in plain PyTorch: the trunk, its fast path, and the classifier."""

from ..archs import ARCH_NAMES, ARCH_SETTINGS, resolve_arch
from .hieradet import HieraDet

__all__ = ["ARCH_NAMES", "ARCH_SETTINGS", "HieraDet", "resolve_arch"]
