"""Key names: birder's, SAM2's and MMDetection's HieraDet weights in this package's names.

Ours: ``patch_embed``, ``pos_embed``, ``pos_embed_window``, ``blocks.N.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2, proj}`` and, for a classifier, ``norm`` and ``head``.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from .errors import CheckpointError

CLASSIFIER_PREFIXES = ("norm.", "head.")  # the classification head on top of the trunk
_BIRDER_BLOCK = re.compile(r"body\.stage(\d)\.(\d+)\.(.*)")
_SAM2_RENAMES = ((re.compile(r"^patch_embed\.proj\."), "patch_embed."),
                 (re.compile(r"\.mlp\.layers\.0\."), ".mlp.fc1."),
                 (re.compile(r"\.mlp\.layers\.1\."), ".mlp.fc2."))


def to_our_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Find the HieraDet trunk in a state dict of any supported naming and rename it to ours.

    The trunk is found by its ``pos_embed`` key next to blocks; its prefix (``image_encoder.trunk.``
    in SAM2, ``backbone.`` in MMDetection, ...) is stripped and everything outside it (necks,
    heads, SAM2's memory modules) is left out."""
    prefixes = [key[:-len("pos_embed")] for key in state if key == "pos_embed" or key.endswith(".pos_embed")]
    prefixes = [p for p in prefixes if any(k.startswith((p + "blocks.", p + "body.stage")) for k in state)]
    if not prefixes:
        keys = list(state)
        raise CheckpointError(f"no HieraDet trunk found (no 'pos_embed' next to 'blocks.*' or birder's "
                              f"'body.stage*'); keys: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}.")
    if len(prefixes) > 1:
        raise CheckpointError(f"several HieraDet trunks found, under the prefixes {prefixes}.")
    trunk = {k[len(prefixes[0]):]: v for k, v in state.items() if k.startswith(prefixes[0])}
    if "stem.proj.weight" in trunk or any(k.startswith("body.stage") for k in trunk):
        return birder_to_ours(trunk)
    return sam2_to_ours(trunk)  # also right for our own names (MMDetection checkpoints, state dicts)


def birder_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """birder's names (stem.proj, pos_embed_win, body.stageS.J.*, mlp.0/3, features.0,
    classifier) -> ours (patch_embed, pos_embed_window, blocks.N.*, mlp.fc1/fc2, norm, head)."""
    starts = _stage_starts(birder_depths(state))
    out = {}
    for key, value in state.items():
        new = key.replace("stem.proj.", "patch_embed.").replace("pos_embed_win", "pos_embed_window")
        new = new.replace("features.0.", "norm.").replace("classifier.", "head.")
        m = _BIRDER_BLOCK.match(new)
        if m:
            rest = m.group(3).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            new = f"blocks.{starts[int(m.group(1)) - 1] + int(m.group(2))}.{rest}"
        out[new] = value
    return out


def sam2_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM2's trunk names (patch_embed.proj, mlp.layers.0/1) -> ours; our own names pass unchanged."""
    out = {}
    for key, value in state.items():
        for pattern, new in _SAM2_RENAMES:
            key = pattern.sub(new, key)
        out[key] = value
    return out


def birder_depths(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Blocks per stage, read off birder's ``body.stageS.J.*`` keys."""
    depths = [0, 0, 0, 0]
    for key in state:
        m = _BIRDER_BLOCK.match(key)
        if m:
            stage = int(m.group(1)) - 1
            depths[stage] = max(depths[stage], int(m.group(2)) + 1)
    return depths


def _stage_starts(depths: Sequence[int]) -> list[int]:
    return [sum(depths[:i]) for i in range(len(depths))]
