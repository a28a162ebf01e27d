"""Let torch's safe (``weights_only``) loader read MMEngine's own checkpoints.

torch >= 2.6 refuses the numpy arrays and ``HistoryBuffer`` objects MMEngine 0.10 writes into
``meta['message_hub']``, which breaks ``--resume``, ``tools/test.py CKPT``, ``init_detector`` and
``DetInferencer``. Instead of loading unsafely we allowlist exactly those types (on torch < 2.4,
which cannot extend its allowlist, through :mod:`.restricted_loading`).
``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``;
allowing the real ``getattr`` would let a hostile file reach any attribute, so that name is
bound to a function that returns only the statistics MMEngine defines and refuses anything else.
"""

from __future__ import annotations

import importlib
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
    # numpy 2's arrays live in numpy._core, numpy 1's in numpy.core (numpy 1.26 has an empty numpy._core)
    multiarray = importlib.import_module("numpy._core.multiarray" if np.lib.NumpyVersion(np.__version__) >= "2.0.0"
                                         else "numpy.core.multiarray")
    items: list = [HistoryBuffer, np.ndarray, np.dtype, (_history_buffer_statistic, "builtins.getattr")]
    for module in ("numpy.core", "numpy._core"):  # files written under numpy 1 and numpy 2
        items += [(multiarray._reconstruct, f"{module}.multiarray._reconstruct"),
                  (multiarray.scalar, f"{module}.multiarray.scalar")]
    items += [type(np.dtype(name)) for name in _NUMPY_DTYPES]
    return items


def register_safe_globals() -> None:
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(mmengine_safe_globals())
    else:  # torch < 2.4: our restricted unpickler with the same allowlist
        from .restricted_loading import install

        install(mmengine_safe_globals())
