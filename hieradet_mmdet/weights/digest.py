"""A checkpoint's SHA-256 digest of its tensors, and checking a file against the digest written
with it (``meta['hieradet_digest']``, written by :class:`~hieradet_mmdet.engine.SafeCheckpointHook`)."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CheckpointError
from .reader import load_file

DIGEST_KEY = "hieradet_digest"


def tensor_digest(checkpoint: Any) -> str:
    """SHA-256 over every tensor and array of a checkpoint (name, dtype, shape, bytes), in a fixed
    order; the digest entry itself is left out."""
    digest = hashlib.sha256()
    for name, value in named_arrays(checkpoint):
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            dtype = str(value.dtype)
        else:
            data, dtype = np.ascontiguousarray(value).reshape(-1).view(np.uint8), str(value.dtype)
        digest.update(f"{name}|{dtype}|{tuple(value.shape)}|".encode())
        digest.update(memoryview(data))
    return digest.hexdigest()


def named_arrays(node: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """(path, tensor or array) of everything in nested dicts, lists and tuples, dict keys sorted;
    the digest entry is left out."""
    if isinstance(node, (torch.Tensor, np.ndarray)):
        yield name, node
    elif isinstance(node, dict):
        for key in sorted(node, key=str):
            if key != DIGEST_KEY:
                yield from named_arrays(node[key], f"{name}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from named_arrays(item, f"{name}[{i}]")


def verify_checkpoint(path: str) -> bool:
    """True if ``path`` reads and its tensors match the digest written with it; False for a
    checkpoint written without a digest (nothing to check). Raises CheckpointError (naming the
    file) if it is unreadable, truncated or corrupt."""
    content, _ = load_file(path, mmap=True)
    expected = content.get("meta", {}).get(DIGEST_KEY) if isinstance(content, dict) else None
    if expected is None:
        return False
    actual = tensor_digest(content)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match the SHA-256 digest written "
                              f"with it ({actual[:16]}... instead of {expected[:16]}...)")
    return True


def check_checkpoint(path: str) -> None:
    """Unpickle ``path`` weights-only, tensors memory-mapped, and check its digest if it has one;
    raises :class:`~hieradet_mmdet.weights.CheckpointError` naming the file if it is missing,
    unreadable, corrupt or needs anything the allowlist does not cover. URLs are left to the
    loader, which runs weights-only too."""
    if "://" not in path:
        verify_checkpoint(os.path.expanduser(path))
