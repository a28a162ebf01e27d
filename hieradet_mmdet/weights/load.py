"""Loading a checkpoint's trunk into a HieraDet: strict, with errors that name keys and shapes."""

from __future__ import annotations

import logging
import re
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..archs import ARCH_SETTINGS
from .errors import CheckpointError
from .reader import LoadedCheckpoint, Source, read_checkpoint

logger = logging.getLogger(__name__)
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def load_backbone_weights(model: nn.Module, source: Source, *, progress: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint's trunk weights into a :class:`~hieradet_mmdet.models.HieraDet`.

    ``source``: a published weights name, an http(s) URL, a file path, or a LoadedCheckpoint.
    Classifier keys are ignored; a missing trunk key, a key the model does not have or a shape
    mismatch raises :class:`CheckpointError` listing them, and nothing is loaded. A global
    position embedding of another grid size is resized bicubically. Returns the checkpoint."""
    checkpoint = read_checkpoint(source, progress=progress)
    model.load_state_dict(fit_trunk_state(model, checkpoint), strict=True)
    logger.info("Loaded HieraDet trunk weights from %s (%s)", checkpoint.name, checkpoint.metadata.get("format"))
    return checkpoint


def fit_trunk_state(model: nn.Module, checkpoint: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's trunk weights, checked against ``model`` key by key and shape by shape."""
    expected = model.state_dict()
    state = checkpoint.trunk_state_dict
    fitted = {}
    for key, value in state.items():
        target = expected.get(key)
        if key == "pos_embed" and target is not None and value.ndim == 4 \
                and value.shape[:2] == target.shape[:2] and value.shape != target.shape:
            logger.info("Resizing pos_embed of %s from %s to %s", checkpoint.name,
                        tuple(value.shape[2:]), tuple(target.shape[2:]))
            value = resize_pos_embed(value, tuple(target.shape[2:]))
        fitted[key] = value
    problems = state_dict_mismatch(fitted, expected)
    if problems:
        raise CheckpointError(f"Cannot load HieraDet weights from {checkpoint.name}: the checkpoint is "
                              f"{describe_trunk(state)}, the model is {describe_trunk(expected)}. "
                              f"Nothing was loaded.\n{problems}")
    return fitted


def state_dict_mismatch(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                        limit: int = 20) -> Optional[str]:
    """What keeps ``got`` from loading strictly where ``want`` is expected, as a few readable
    lines (shape mismatches, missing keys, unexpected keys; a block's keys as ``blocks.N.*``
    when all of them are concerned); None if it loads."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [(k, tuple(got[k].shape), tuple(want[k].shape))
                  for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
    if not (missing or unexpected or mismatched):
        return None
    lines = []
    if mismatched:
        lines.append(f"Shape mismatch ({len(mismatched)} keys; checkpoint shape vs model shape):")
        lines += [f"    {k}: {a} vs {b}" for k, a, b in mismatched[:limit]]
        if len(mismatched) > limit:
            lines.append(f"    ... and {len(mismatched) - limit} more")
    if missing:
        lines.append(f"Missing from the checkpoint ({len(missing)} keys): {_preview(group_keys(missing, want), limit)}")
    if unexpected:
        lines.append(f"In the checkpoint but not in the model ({len(unexpected)} keys): "
                     f"{_preview(group_keys(unexpected, got), limit)}")
    return "\n".join(lines)


def group_keys(keys: Sequence[str], all_keys: Sequence[str]) -> list[str]:
    """``keys``, with ``prefix.*`` standing for the keys under a module prefix (a block, or a
    top-level module such as ``roi_head.``) when all of them, three or more, are listed."""
    listed = set(keys)
    out: list[str] = []
    for key in keys:
        group = next((p for p in _prefixes(key) if _all_listed(p, listed, all_keys)), None)
        name = group + "*" if group else key
        if name not in out:
            out.append(name)
    return out


def _all_listed(prefix: str, listed: set, all_keys: Sequence[str]) -> bool:
    under = [k for k in all_keys if k.startswith(prefix)]
    return len(under) >= 3 and all(k in listed for k in under)


def _prefixes(key: str) -> list[str]:
    """Module prefixes of a key, outermost first: 'a.b.c.w' -> ['a.', 'a.b.', 'a.b.c.']."""
    parts = key.split(".")[:-1]
    return [".".join(parts[:i]) + "." for i in range(1, len(parts) + 1)]


def trunk_dims(state: Mapping[str, torch.Tensor]) -> Optional[tuple[tuple[int, ...], int, tuple[int, ...]]]:
    """(depths, embed_dim, global_pos_size) of a trunk state dict in our names; None if incomplete.

    Stages are delimited by the blocks that carry a ``proj`` (the first block of stages 2-4)."""
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, state) if m}
    stage_starts = sorted(i for i in blocks if f"blocks.{i}.proj.weight" in state)
    if not blocks or len(stage_starts) != 3 or "pos_embed" not in state or state["pos_embed"].ndim != 4:
        return None
    bounds = [0, *stage_starts, max(blocks) + 1]
    depths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    return depths, int(state["pos_embed"].shape[1]), tuple(state["pos_embed"].shape[2:])


def trunk_size(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """'tiny', 'small', ... for a trunk state dict in our names (the layout is not visible)."""
    dims = trunk_dims(state)
    if dims is None:
        return None
    depths, embed_dim, pos_size = dims
    return next((name for name, cfg in ARCH_SETTINGS.items()
                 if (cfg["depths"], cfg["embed_dim"], cfg["global_pos_size"]) == (depths, embed_dim, pos_size)), None)


def describe_trunk(state: Mapping[str, torch.Tensor]) -> str:
    """e.g. "'small' (depths 1-2-11-2, embed_dim 96)", as far as the state dict shows."""
    dims = trunk_dims(state)
    if dims is None:
        return "an incomplete HieraDet"
    size = trunk_size(state)
    return (f"{repr(size) if size else 'an unknown HieraDet'} "
            f"(depths {'-'.join(map(str, dims[0]))}, embed_dim {dims[1]})")


def resize_pos_embed(pos_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, C, h, w) global position embedding bicubically, as birder and SAM2 do."""
    return F.interpolate(pos_embed.float(), size=size, mode="bicubic").to(pos_embed.dtype)


def _preview(keys: Sequence[str], limit: int) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
