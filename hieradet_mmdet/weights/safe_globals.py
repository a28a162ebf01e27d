"""Let torch's safe (``weights_only``) loader read MMEngine's own checkpoints.

torch >= 2.6 refuses the numpy arrays and ``HistoryBuffer`` objects MMEngine 0.10 writes into
``meta['message_hub']``, which breaks ``--resume``, ``tools/test.py CKPT``, ``init_detector`` and
``DetInferencer``. Instead of loading unsafely we allowlist exactly those types.
``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``;
allowing the real ``getattr`` would let a hostile file reach any attribute, so that name is
bound to a function that returns only the statistics MMEngine defines and refuses anything else.
"""

from __future__ import annotations

import pickle

import numpy as np
import torch

from ..mmengine_adapter import HISTORY_BUFFER_STATISTICS, history_buffer_class

# HistoryBuffer's own statistics (registered by its _set_default_statistics) are listed in the
# adapter, not read from HistoryBuffer._statistics_methods: that table is empty until a buffer
# exists in the process, so reading it would make loading depend on import order.
HistoryBuffer = history_buffer_class()
_NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128")


def _history_buffer_statistic(owner, name):
    if owner is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"refusing getattr({getattr(owner, '__name__', type(owner).__name__)}, {name!r}) while loading a "
        f"checkpoint: only MMEngine's HistoryBuffer statistics ({', '.join(HISTORY_BUFFER_STATISTICS)}) may be "
        "looked up")


def mmengine_safe_globals() -> list:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    items: list = [HistoryBuffer, np.ndarray, np.dtype, (_history_buffer_statistic, "builtins.getattr")]
    for module in ("numpy.core", "numpy._core"):  # files written under numpy 1 and numpy 2
        items += [(core.multiarray._reconstruct, f"{module}.multiarray._reconstruct"),
                  (core.multiarray.scalar, f"{module}.multiarray.scalar")]
    items += [type(np.dtype(name)) for name in _NUMPY_DTYPES]
    return items


def register_safe_globals() -> None:
    torch.serialization.add_safe_globals(mmengine_safe_globals())
