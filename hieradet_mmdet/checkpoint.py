"""Reading HieraDet weights from the checkpoint forms users hold, into this package's key names."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

_BIRDER_BLOCK = re.compile(r"body\.stage(\d)\.(\d+)\.(.*)")


def remap_birder_keys(state: Mapping[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """birder names (stem.proj, pos_embed_win, body.stageS.J.*, mlp.0/3, features.0, classifier)
    -> ours (patch_embed, pos_embed_window, blocks.N.*, mlp.fc1/fc2, norm, head)."""
    starts = [sum(depths[:i]) for i in range(len(depths))]
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
