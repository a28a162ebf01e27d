"""The torch calls whose spelling changed between the oldest torch this package is tested on (2.1,
docs/installation.md) and today's: one place, so the rest of the package calls one name."""

from __future__ import annotations

from typing import Optional

import torch


def cpu_autocast_dtype() -> Optional[torch.dtype]:
    """The dtype CPU autocast casts to where it is on, else None (``torch.is_autocast_enabled('cpu')``
    arrived in torch 2.4; before, ``torch.is_autocast_cpu_enabled()``)."""
    try:
        enabled = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_dtype("cpu") if enabled else None


def compiler_is_exporting() -> bool:
    """``torch.compiler.is_exporting()`` (torch >= 2.5; before, torch.export traced through dynamo,
    which :func:`compiler_is_compiling` reports)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def compiler_is_compiling() -> bool:
    """``torch.compiler.is_compiling()`` (torch >= 2.3; before, ``torch._dynamo.is_compiling()``)."""
    if hasattr(torch.compiler, "is_compiling"):
        return torch.compiler.is_compiling()
    from torch._dynamo import is_compiling

    return is_compiling()


class SeededGenerator(torch.Generator):
    """A CPU ``torch.Generator`` that ``copy.deepcopy`` copies with its state: MMEngine deep-copies
    dataloader configs, and torch 2.1's Generator cannot be copied (``cannot pickle 'torch._C.Generator'``)."""

    def __new__(cls, seed: int = 0) -> "SeededGenerator":
        generator = super().__new__(cls, "cpu")  # torch.Generator's one argument is the device
        generator.manual_seed(seed)
        return generator

    def __init__(self, seed: int = 0) -> None:  # all done in __new__
        pass

    def __deepcopy__(self, memo: dict) -> "SeededGenerator":
        copied = type(self)()
        copied.set_state(self.get_state())
        return copied


# What ONNX export and torch.export programs (hieradet_mmdet.export) use, with the torch that added it.
EXPORT_APIS = (("torch.library.custom_op", "2.4"), ("torch.onnx.export(dynamo=...)", "2.5"),
               ("torch.export.Dim.AUTO", "2.6"))


def _has(api: str) -> bool:
    if api == "torch.library.custom_op":
        return hasattr(torch.library, "custom_op")
    if api == "torch.onnx.export(dynamo=...)":
        import inspect

        return "dynamo" in inspect.signature(torch.onnx.export).parameters
    if api == "torch.export.Dim.AUTO":
        try:
            from torch.export import Dim
        except ImportError:
            return False
        return hasattr(Dim, "AUTO")
    raise ValueError(api)


def export_unsupported() -> Optional[str]:
    """One line saying what export needs where this torch lacks it, else None."""
    missing = [(api, version) for api, version in EXPORT_APIS if not _has(api)]
    if not missing:
        return None
    need = max(version for _, version in missing)
    return (f"ONNX and torch.export need torch >= {need} (this is torch {torch.__version__}, which lacks "
            f"{', '.join(api for api, _ in missing)}); everything else works here (docs/installation.md)")
