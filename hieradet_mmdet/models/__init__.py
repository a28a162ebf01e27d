"""The HieraDet model in plain PyTorch: the trunk, its fast path, and the classifier."""

from .hieradet import ARCH_NAMES, ARCH_SETTINGS, HieraDet, resolve_arch

__all__ = ["ARCH_NAMES", "ARCH_SETTINGS", "HieraDet", "resolve_arch"]
