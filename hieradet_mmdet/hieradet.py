"""HieraDet trunk (the hierarchical ViT of SAM2's image encoder) in plain PyTorch.

Tokens stay channels-last (B, H, W, C) through the whole trunk. Each stage after the first
starts with a block that halves the resolution by max-pooling the queries ("q-pool") and
widens the channels; blocks attend either inside non-overlapping windows or globally.

Numerically this follows birder's ``birder.net.hieradet`` (the reference our tests compare
against), including its quirks: windows are zero-padded *after* norm1 and the padding takes
part in attention, and the first block of a stage uses the previous stage's window size.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Per-size architecture; window_spec and global_att_blocks are the layout (see LAYOUTS).
ARCH_SETTINGS: dict[str, dict] = {
    "tiny": dict(depths=(1, 2, 7, 2), embed_dim=96, num_heads=1, global_pos_size=(7, 7),
                 global_att_blocks=(5, 7, 9)),
    "small": dict(depths=(1, 2, 11, 2), embed_dim=96, num_heads=1, global_pos_size=(7, 7),
                  global_att_blocks=(7, 10, 13)),
    "base": dict(depths=(2, 3, 16, 3), embed_dim=96, num_heads=1, global_pos_size=(14, 14),
                 global_att_blocks=(12, 16, 20)),
    "base_plus": dict(depths=(2, 3, 16, 3), embed_dim=112, num_heads=2, global_pos_size=(14, 14),
                      global_att_blocks=(12, 16, 20)),
    "large": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, global_pos_size=(7, 7),
                  global_att_blocks=(23, 33, 43)),
}
# "small" is SAM2's high-resolution layout; "d_small" is the one the DINOv2 weights were
# trained with (global attention from stage 3 on). Same parameters, so both load one file.
LAYOUTS = {"": (8, 4, 14, 7), "d_": (8, 4, 0, 0)}
ARCH_KEYS = ("depths", "embed_dim", "num_heads", "global_pos_size", "global_att_blocks", "window_spec")
ARCH_NAMES = tuple(prefix + name for prefix in LAYOUTS for name in ARCH_SETTINGS)

WINDOW_POS_SIZE = 8  # the window position embedding is an 8x8 tile
PATCH_STRIDE = 4
Q_STRIDE = 2


def resolve_arch(arch: Union[str, Mapping], window_spec: Optional[Sequence[int]] = None,
                 global_att_blocks: Optional[Sequence[int]] = None) -> dict:
    """Turn ``arch`` (a name such as 'small' / 'd_small', or a dict) into a validated dict."""
    if isinstance(arch, str):
        prefix = "d_" if arch.startswith("d_") else ""
        size = arch[len(prefix):]
        if size not in ARCH_SETTINGS:
            raise ValueError(f"Unknown HieraDet arch {arch!r}; choose one of {', '.join(ARCH_NAMES)} "
                             f"or pass a dict with the keys {', '.join(ARCH_KEYS)}.")
        cfg = dict(ARCH_SETTINGS[size], window_spec=LAYOUTS[prefix])
    elif isinstance(arch, Mapping):
        missing = [k for k in ARCH_KEYS if k not in arch]
        unknown = [k for k in arch if k not in ARCH_KEYS]
        if missing or unknown:
            raise ValueError(f"HieraDet arch dict must have exactly the keys {', '.join(ARCH_KEYS)}; "
                             f"missing: {missing or 'none'}, unknown: {unknown or 'none'}.")
        cfg = dict(arch)
    else:
        raise TypeError(f"HieraDet arch must be a name or a dict, got {type(arch).__name__}")
    if window_spec is not None:
        cfg["window_spec"] = window_spec
    if global_att_blocks is not None:
        cfg["global_att_blocks"] = global_att_blocks

    cfg = {k: (tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)) for k, v in cfg.items()}
    depth = sum(cfg["depths"])
    if len(cfg["depths"]) != 4 or min(cfg["depths"]) < 1:
        raise ValueError(f"HieraDet depths must be four positive numbers, got {cfg['depths']}")
    if len(cfg["window_spec"]) != 4 or min(cfg["window_spec"]) < 0:
        raise ValueError(f"HieraDet window_spec must be four sizes >= 0 (0 = global), got {cfg['window_spec']}")
    if len(cfg["global_pos_size"]) != 2:
        raise ValueError(f"HieraDet global_pos_size must be (h, w), got {cfg['global_pos_size']}")
    bad = [b for b in cfg["global_att_blocks"] if not 0 <= b < depth]
    if bad:
        raise ValueError(f"HieraDet global_att_blocks {bad} are outside the {depth} blocks of this arch")
    return cfg


def block_window_sizes(depths: Sequence[int], window_spec: Sequence[int],
                       global_att_blocks: Sequence[int]) -> list[int]:
    """Window size of every block, 0 meaning global attention.

    The q-pool block that opens a stage attends at the previous stage's resolution, so it
    uses the previous stage's window (as SAM2 and birder do)."""
    sizes = []
    for stage, depth in enumerate(depths):
        for j in range(depth):
            sizes.append(window_spec[stage - 1] if (j == 0 and stage > 0) else window_spec[stage])
    return [0 if i in global_att_blocks else w for i, w in enumerate(sizes)]


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2/stride-2 max pooling of a channels-last map (floor mode), without layout copies."""
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, :h2 * 2, :w2 * 2].reshape(b, h2, 2, w2, 2, c).amax(dim=(2, 4))


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nH * nW, size, size, C), zero-padding H and W up to multiples of size."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % size, -w % size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // size, (w + pad_w) // size
    x = x.view(b, nh, size, nw, size, c).transpose(2, 3)
    return x.reshape(b * nh * nw, size, size, c)


def window_unpartition(windows: torch.Tensor, grid: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of window_partition for a (nH, nW) window grid, cropped to out_hw."""
    nh, nw = grid
    size, c = windows.shape[1], windows.shape[-1]
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, size, size, c).transpose(2, 3).reshape(b, nh * size, nw * size, c)
    h, w = out_hw
    if x.shape[1] != h or x.shape[2] != w:
        x = x[:, :h, :w]
    return x


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) map; optionally pools the queries 2x2."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x)
        if self.q_pool:
            q, kv = qkv.split([qkv.shape[-1] // 3, 2 * qkv.shape[-1] // 3], dim=-1)
            q = max_pool_2x2(q)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1).transpose(1, 2)
            k, v = kv.reshape(b, -1, 2, self.num_heads, q.shape[-1]).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(x)


class MultiScaleBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, window_size: int, q_pool: bool,
                 drop_path_rate: float = 0.0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.q_pool = q_pool
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.q_pool:
                shortcut = max_pool_2x2(shortcut)

        if self.window_size > 0:
            size = self.window_size
            grid = (-(-x.shape[1] // size), -(-x.shape[2] // size))
            x = self.attn(window_partition(x, size))
            x = window_unpartition(x, grid, shortcut.shape[1:3])
        else:
            x = self.attn(x)

        x = shortcut + drop_path(x, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class HieraDet(nn.Module):
    """HieraDet trunk returning one NCHW feature map per requested stage (strides 4, 8, 16, 32).

    Args:
        arch: 'tiny' | 'small' | 'base' | 'base_plus' | 'large' (SAM2's windowed layout), the
            same with a 'd_' prefix (global attention in stages 3-4, as the DINOv2 weights were
            trained), or a dict with the keys in ARCH_KEYS.
        window_spec / global_att_blocks: override the layout of a named arch.
        out_indices: stages to return (0-3; negatives count from the end).
        frozen_stages: -1 freezes nothing, 0 the patch embedding and position embeddings,
            k additionally the first k stages. Frozen parts stay in eval mode.
        drop_path_rate: stochastic depth, rising linearly over the blocks from 0.
        with_cp: recompute each block's activations in backward to save memory.
    """

    def __init__(self, arch: Union[str, Mapping] = "small", in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 drop_path_rate: float = 0.0, with_cp: bool = False,
                 window_spec: Optional[Sequence[int]] = None,
                 global_att_blocks: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.arch = resolve_arch(arch, window_spec, global_att_blocks)
        depths = self.arch["depths"]
        embed_dim, num_heads = self.arch["embed_dim"], self.arch["num_heads"]

        self.out_indices = tuple(sorted({i % 4 for i in out_indices}))
        if len(self.out_indices) != len(tuple(out_indices)) or any(not -4 <= i < 4 for i in out_indices):
            raise ValueError(f"out_indices must be distinct stages in [-4, 3], got {tuple(out_indices)}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=7, stride=PATCH_STRIDE, padding=3)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.arch["global_pos_size"]))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, WINDOW_POS_SIZE, WINDOW_POS_SIZE))

        windows = block_window_sizes(depths, self.arch["window_spec"], self.arch["global_att_blocks"])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks = nn.ModuleList()
        self.stage_ends = []
        self.channels = []
        dim = embed_dim
        for stage, depth in enumerate(depths):
            dim_out = embed_dim * 2 ** stage
            heads = num_heads * 2 ** stage
            for j in range(depth):
                i = len(self.blocks)
                self.blocks.append(MultiScaleBlock(dim, dim_out, heads, windows[i], q_pool=(stage > 0 and j == 0),
                                                   drop_path_rate=rates[i]))
                dim = dim_out
            self.stage_ends.append(len(self.blocks) - 1)
            self.channels.append(dim_out)
        self.out_channels = [self.channels[i] for i in self.out_indices]
        self.out_strides = [PATCH_STRIDE * Q_STRIDE ** i for i in self.out_indices]
        self._pos_cache: Optional[tuple] = None

        self.reset_parameters()
        self._freeze_stages()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_window, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_of_block(self, index: int) -> int:
        return next(s for s, end in enumerate(self.stage_ends) if index <= end)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C): the global embedding resized bicubically plus the 8x8 window embedding tiled.

        The tile is cropped, so any h, w works; where h, w are multiples of 8 this is exactly
        birder's and SAM2's embedding. Without gradients it is cached until the weights change."""
        key = (h, w, self.pos_embed.device, self.pos_embed.dtype,
               self.pos_embed._version, self.pos_embed_window._version,
               self.pos_embed.data_ptr(), self.pos_embed_window.data_ptr())
        use_cache = not (torch.is_grad_enabled() and self.pos_embed.requires_grad)
        if use_cache and self._pos_cache is not None and self._pos_cache[0] == key:
            return self._pos_cache[1]
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        win = self.pos_embed_window
        reps = (math.ceil(h / win.shape[2]), math.ceil(w / win.shape[3]))
        pos = pos + win.tile(1, 1, *reps)[:, :, :h, :w]
        pos = pos.permute(0, 2, 3, 1)
        if use_cache:
            self._pos_cache = (key, pos.detach())
        return pos

    def forward_tokens(self, x: torch.Tensor, stop_block: Optional[int] = None):
        """Yields (block index, channels-last tokens) after every block."""
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        use_cp = self.with_cp and torch.is_grad_enabled() and self.training
        for i, block in enumerate(self.blocks):
            if use_cp and any(p.requires_grad for p in block.parameters()):
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            yield i, x
            if stop_block is not None and i >= stop_block:
                return

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wanted = {self.stage_ends[s]: s for s in self.out_indices}
        outs = []
        for i, tokens in self.forward_tokens(x, stop_block=max(wanted)):
            if i in wanted:
                # An NCHW view of channels-last memory: convolutions take it as is, no copy.
                outs.append(tokens.permute(0, 3, 1, 2))
        return tuple(outs)

    def _freeze_stages(self) -> None:
        for module in self.frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if self.frozen_stages >= 0:
            self.pos_embed.requires_grad_(False)
            self.pos_embed_window.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        last = self.stage_ends[self.frozen_stages - 1] if self.frozen_stages > 0 else -1
        return [self.patch_embed] + [self.blocks[i] for i in range(last + 1)]

    def train(self, mode: bool = True) -> "HieraDet":
        super().train(mode)
        self._freeze_stages()
        return self
