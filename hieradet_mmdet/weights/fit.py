"""Whether a checkpoint holds exactly the weights of a whole model (a detector), and loading it so.

MMEngine's own loading is not strict: it warns and leaves whatever it could not load at random
initial values. Checkpoints of data-parallel runs may carry DDP's ``module.`` prefix.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from torch import nn

from .errors import CheckpointError
from .load import state_dict_mismatch
from .reader import load_file

DATA_PARALLEL_PREFIX = "module."


def model_state_dict(content: Any) -> dict:
    """The state dict of a checkpoint's content (MMEngine's ``state_dict`` entry, or the content
    itself), without DDP's ``module.`` prefix."""
    state = content.get("state_dict", content) if isinstance(content, dict) else {}
    return {k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k: v for k, v in state.items()}


def checkpoint_mismatch(model: nn.Module, path: str) -> Optional[str]:
    """What keeps checkpoint ``path`` from loading into ``model`` strictly, grouped by module
    (missing, unexpected, shape mismatches), or None if every weight fits."""
    content, _ = load_file(os.path.expanduser(path), mmap=True)
    state = {k: v for k, v in model_state_dict(content).items() if hasattr(v, "shape")}
    model = getattr(model, "module", model)
    return state_dict_mismatch(state, model.state_dict())


def load_whole_model(model: nn.Module, path: str, what: str = "the model") -> dict:
    """Load every weight of checkpoint ``path`` into ``model``, or raise CheckpointError saying
    what does not fit ``what`` and load nothing; returns the checkpoint's ``meta`` ({} if none)."""
    mismatch = checkpoint_mismatch(model, path)
    if mismatch:
        raise CheckpointError(f"{path} does not fit {what}:\n{mismatch}")
    content, _ = load_file(os.path.expanduser(path))
    model.load_state_dict(model_state_dict(content), strict=True)
    return dict(content.get("meta") or {})
