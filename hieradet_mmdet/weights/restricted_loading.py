"""Weights-only loading where torch has no ``torch.serialization.add_safe_globals`` (torch < 2.4).

torch 2.1's weights-only loader takes a fixed allowlist and builds nothing but tensors and
parameters, so it refuses MMEngine's checkpoints (numpy arrays, ``HistoryBuffer`` objects), and its
``torch.load`` loads *unsafely* unless a caller passes ``weights_only=True``: MMEngine's
``CheckpointLoader`` does not. There, :func:`safe_load` reads with a restricted unpickler of ours:
Python's unpickler whose ``find_class`` returns only what torch's own weights-only loader allows
plus :func:`~.safe_globals.mmengine_safe_globals` (the standard way to restrict unpickling; see the
``pickle`` documentation, "Restricting Globals"), handed to ``torch.load`` as its ``pickle_module``
so torch still reads the storages. Anything else a file names is refused before it is imported.

:func:`install` makes that torch's ``torch.load`` default to it, as torch >= 2.6 defaults to
``weights_only=True``: an explicit ``weights_only=False`` is honoured unless
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is set (our tools set it, :func:`..engine.runner.enforce_safe_loading`).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import functools
import os
import pickle
import threading
import types

import torch

NEEDED = not hasattr(torch.serialization, "add_safe_globals")
_TRUE = ("1", "y", "yes", "true")
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_ENV_LOCK = threading.RLock()


def _key(item) -> tuple[str, object]:
    if isinstance(item, tuple):
        obj, name = item
        return name, obj
    return f"{item.__module__}.{item.__qualname__}", item


_REGISTERED: list = []  # what install() was given: MMEngine's types (.safe_globals)


@functools.lru_cache(maxsize=None)
def allowed_globals() -> dict:
    """'module.name' -> object: torch's own weights-only allowlist, then what :func:`install` registered."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    # Protocol 2 pickles (torch.save's) spell bytes, a numpy array's data, as _codecs.encode(text, 'latin1');
    # torch >= 2.4 allows it too.
    allowed["_codecs.encode"] = codecs.encode
    # MMEngine's checkpoints hold a collections.Counter (its message hub); torch >= 2.4 allows it too.
    allowed["collections.Counter"] = collections.Counter
    allowed.update(_key(item) for item in _REGISTERED)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Python's unpickler that imports nothing outside :func:`allowed_globals`."""

    def find_class(self, module: str, name: str):
        # Protocol 2 (torch.save's) pickles name Python 2's modules ('__builtin__.getattr'), which
        # Python's own find_class renames; this one must do the same.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module}.{name}"
        found = allowed_globals().get(key)
        if found is None:
            # Worded as torch's weights-only loader words it (hieradet_mmdet.weights.reader reads it).
            raise pickle.UnpicklingError(f"Weights only load failed. Unsupported global: GLOBAL {key} was not an "
                                         "allowed global by default.")
        return found


def _load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle_module: Unpickler and load (the latter for legacy, non-zip files).
restricted_pickle = types.ModuleType("hieradet_mmdet_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _load
restricted_pickle.UnpicklingError = pickle.UnpicklingError

_torch_load = torch.load


def safe_load(f, map_location=None, **kwargs):
    """``torch.load(f, weights_only=True)`` that also reads MMEngine's checkpoints, on any torch."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    if not NEEDED:
        return torch.load(f, map_location=map_location, weights_only=True, **kwargs)
    # torch < 2.4 reads TORCH_FORCE_WEIGHTS_ONLY_LOAD on every call and then refuses any pickle_module
    # (its own loader cannot read MMEngine's checkpoints); this load is restricted, so it steps aside.
    with _ENV_LOCK:
        forced = os.environ.pop(FORCE_ENV, None)
        try:
            return _torch_load(f, map_location=map_location, pickle_module=restricted_pickle, **kwargs)
        finally:
            if forced is not None:
                os.environ[FORCE_ENV] = forced


def _default_safe_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
    forced = os.environ.get(FORCE_ENV, "").lower() in _TRUE
    if weights_only is False and not forced:  # asked for explicitly, as torch >= 2.6 allows
        return _torch_load(f, map_location=map_location, pickle_module=pickle_module, **kwargs)
    return safe_load(f, map_location=map_location, **kwargs)


def install(safe_globals=()) -> None:
    """On a torch without ``add_safe_globals``: ``torch.load`` defaults to :func:`safe_load`, whose
    allowlist also takes ``safe_globals`` (objects, or (object, 'module.name') pairs)."""
    _REGISTERED.extend(item for item in safe_globals if item not in _REGISTERED)
    allowed_globals.cache_clear()
    if NEEDED and torch.load is not _default_safe_load:
        torch.load = torch.serialization.load = _default_safe_load
