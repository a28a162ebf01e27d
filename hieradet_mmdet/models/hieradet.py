"""HieraDet: the hierarchical ViT trunk of SAM2's image encoder, in plain PyTorch.

Four stages of transformer blocks at strides 4, 8, 16 and 32. The first block of every stage
after the first max-pools its queries 2x2 ("q-pool") and widens the channels; blocks attend
inside non-overlapping windows (zero-padded where the map does not tile) or globally.

This file is the readable reference: it does what SAM2 and birder do, block by block on
(B, H, W, C) maps. Numerically it follows birder's ``birder.net.hieradet`` (our tests compare
against it), quirks included: windows are zero-padded *after* norm1 and the padding takes part
in attention, and the q-pool block of a stage attends in the previous stage's windows. It also
accepts sizes birder and SAM2 reject: the 8x8 window position embedding is tiled and cropped.

The same parameters run a faster path (:mod:`.fast_path`), chosen by ``forward`` for CPU inputs,
the device it has been measured on against this one (``fast_path=True`` / ``False`` force it on or
off: ``tools/benchmark.py`` measures both on another device and says which to use). This path runs
while the model is traced or exported, and while a hook is registered on one of its submodules (or
globally): the fast path calls no submodule, so there every hook sees its module run as usual.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..archs import NUM_STAGES, resolve_arch
from ..torch_compat import compiler_is_compiling, compiler_is_exporting
from .layers import attention, drop_path, pool_2x2, window_partition, window_unpartition
from .token_layout import PlanCache

WINDOW_POS_SIZE = 8  # the window position embedding is an 8x8 tile
PATCH_STRIDE = 4
PLAN_CACHE_SIZE = 16
MIN_INPUT_SIZE = 29  # the smallest side that leaves the stride-32 stage one token (stem 8 -> 4 -> 2 -> 1)
FAST_PATH_DEVICES = ("cpu",)  # where the fast path was measured faster than the reference path


def block_window_sizes(depths: Sequence[int], window_spec: Sequence[int],
                       global_att_blocks: Sequence[int]) -> list[int]:
    """Window size of every block, 0 meaning global attention. The q-pool block that opens a
    stage attends at the previous stage's resolution, so it uses that stage's window."""
    sizes = []
    for stage, depth in enumerate(depths):
        for j in range(depth):
            sizes.append(window_spec[stage - 1] if (j == 0 and stage > 0) else window_spec[stage])
    return [0 if i in global_att_blocks else w for i, w in enumerate(sizes)]


# ---- modules ----------------------------------------------------------------------------------

class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention over all tokens of a (B, H, W, C) map (B may count windows);
    with ``q_pool`` the queries are max-pooled 2x2, so the output is (B, H/2, W/2, dim_out)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        dim_out = self.proj.out_features
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, dim_out // self.num_heads).unbind(2)
        if self.q_pool:
            q = pool_2x2(q.reshape(b, h, w, dim_out))
            h, w = q.shape[1], q.shape[2]
            q = q.reshape(b, h * w, self.num_heads, dim_out // self.num_heads)
        x = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(b, h, w, dim_out))


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
        """(B, H, W, C) -> (B, H', W', C'), halved by a q-pool block."""
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.q_pool:
                shortcut = pool_2x2(shortcut)

        window = self.window_size
        if window > 0:
            x, padded = window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_pool:
                window, padded = window // 2, (padded[0] // 2, padded[1] // 2)
            x = window_unpartition(x, window, padded, (shortcut.shape[1], shortcut.shape[2]))

        x = shortcut + drop_path(x, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class HieraDet(nn.Module):
    """HieraDet trunk returning one NCHW feature map per requested stage (strides 4, 8, 16, 32).

    Args:
        arch: 'tiny' | 'small' | 'base' | 'base_plus' | 'large' (or 't', 's', 'b', 'b+', 'l'),
            SAM2's windowed layout; with a 'd_' prefix global attention in stages 3-4 (the layout
            the DINOv2 weights were trained with); or a dict with the keys in archs.ARCH_KEYS.
        window_spec / global_att_blocks: override the layout of a named arch.
        out_indices: stages to return (0-3; negatives count from the end), at least one.
        frozen_stages: -1 freezes nothing, 0 the patch and position embeddings, k additionally
            the first k stages. Frozen parts stay in eval mode.
        drop_path_rate: stochastic depth in [0, 1), rising linearly over the blocks from 0.
        with_cp: recompute each block's activations in backward to save memory.
        fast_path: run the path of :mod:`.fast_path` (same numbers, fewer copies): None on the
            devices where it has been measured against the reference path (FAST_PATH_DEVICES),
            True on any device, False never.
    """

    def __init__(self, arch: Union[str, Mapping] = "small", in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 drop_path_rate: float = 0.0, with_cp: bool = False,
                 window_spec: Optional[Sequence[int]] = None,
                 global_att_blocks: Optional[Sequence[int]] = None, fast_path: Optional[bool] = None) -> None:
        super().__init__()
        self.arch = resolve_arch(arch, window_spec, global_att_blocks)
        depths, embed_dim, num_heads = self.arch["depths"], self.arch["embed_dim"], self.arch["num_heads"]

        out_indices = tuple(out_indices)
        if not out_indices or any(not -NUM_STAGES <= i < NUM_STAGES for i in out_indices) \
                or len({i % NUM_STAGES for i in out_indices}) != len(out_indices):
            raise ValueError(f"out_indices must be one or more distinct stages in [-4, 3], got {out_indices}")
        if not -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1) (the last block drops its branch with this "
                             f"probability; 1 would drop it always), got {drop_path_rate}")
        self.out_indices = tuple(sorted(i % NUM_STAGES for i in out_indices))
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp
        self.fast_path = fast_path

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=7, stride=PATCH_STRIDE, padding=3)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.arch["global_pos_size"]))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, WINDOW_POS_SIZE, WINDOW_POS_SIZE))

        windows = block_window_sizes(depths, self.arch["window_spec"], self.arch["global_att_blocks"])
        stage_starts = [sum(depths[:s]) for s in range(1, NUM_STAGES)]
        odd = [i for i in stage_starts if windows[i] % 2]
        if odd:
            raise ValueError(f"HieraDet blocks {odd} pool their queries 2x2 inside windows of odd size "
                             f"{[windows[i] for i in odd]}; such windows do not tile after pooling. Use even "
                             "sizes (or 0, global) in window_spec for stages that a later stage follows.")
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks = nn.ModuleList()
        self.stage_ends, self.channels = [], []
        dim = embed_dim
        for stage, depth in enumerate(depths):
            dim_out, heads = embed_dim * 2 ** stage, num_heads * 2 ** stage
            for j in range(depth):
                i = len(self.blocks)
                self.blocks.append(MultiScaleBlock(dim, dim_out, heads, windows[i], q_pool=i in stage_starts,
                                                   drop_path_rate=rates[i]))
                dim = dim_out
            self.stage_ends.append(len(self.blocks) - 1)
            self.channels.append(dim_out)
        self.out_channels = [self.channels[i] for i in self.out_indices]
        self.out_strides = [PATCH_STRIDE * 2 ** i for i in self.out_indices]
        self.plans = PlanCache(PLAN_CACHE_SIZE)  # the fast path's per-input-size index plans

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

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C): the global embedding resized bicubically plus the 8x8 window embedding
        tiled and cropped, so any h, w works; at multiples of 8 it is birder's and SAM2's."""
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        # Tiling as indexing: row i takes tile row i % 8. Exporters keep h and w symbolic here,
        # where tile(ceil(h / 8)) and a crop would be frozen at the traced size.
        rows = torch.arange(h, device=pos.device) % WINDOW_POS_SIZE
        cols = torch.arange(w, device=pos.device) % WINDOW_POS_SIZE
        pos = pos + self.pos_embed_window[:, :, rows][:, :, :, cols]
        return pos.permute(0, 2, 3, 1)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"HieraDet takes (N, C, H, W) images, got a tensor of shape {tuple(x.shape)}")
        if not is_exporting() and min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"HieraDet needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (below "
                             f"that the stride-32 stage has no tokens), got {x.shape[-2]}x{x.shape[-1]}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.check_input(x)
        if self.takes_fast_path(x):
            from .fast_path import fast_forward

            return fast_forward(self, x)
        return self.forward_reference(x)

    def takes_fast_path(self, x: torch.Tensor) -> bool:
        wanted = x.device.type in FAST_PATH_DEVICES if self.fast_path is None else self.fast_path
        return wanted and not is_exporting() and not submodule_hooks(self)

    def forward_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """SAM2's / birder's computation, block by block on (B, H, W, C) maps."""
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        wanted = {self.stage_ends[s] for s in self.out_indices}
        use_cp = self.with_cp and self.training and torch.is_grad_enabled()
        outs = []
        for i, block in enumerate(self.blocks[:max(wanted) + 1]):
            x = checkpoint(block, x, use_reentrant=False) if use_cp and _trains(block) else block(x)
            if i in wanted:
                outs.append(x.permute(0, 3, 1, 2))
        return tuple(outs)

    def get_layer_depth(self, param_name: str, prefix: str = "") -> tuple[int, int]:
        """(layer depth, number of layers) of a parameter for layer-wise lr decay: the patch and
        position embeddings are layer 0, block i is layer i + 1, anything else (a neck, heads)
        the last layer, ``len(blocks) + 1``."""
        num_layers = len(self.blocks) + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):]
        if name in ("pos_embed", "pos_embed_window") or name.startswith("patch_embed."):
            return 0, num_layers
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1, num_layers
        return num_layers - 1, num_layers

    def frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        last = self.stage_ends[self.frozen_stages - 1] if self.frozen_stages > 0 else -1
        return [self.patch_embed, *self.blocks[:last + 1]]

    def _freeze_stages(self) -> None:
        for module in self.frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if self.frozen_stages >= 0:
            self.pos_embed.requires_grad_(False)
            self.pos_embed_window.requires_grad_(False)

    def train(self, mode: bool = True) -> "HieraDet":
        super().train(mode)
        self._freeze_stages()
        return self


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def submodule_hooks(model: nn.Module) -> bool:
    """Whether any module hook would see a submodule of ``model`` run: one registered on a
    submodule, or a global one (``torch.nn.modules.module.register_module_forward_hook`` & co.).
    Feature extractors, FLOP counters, observers and visualisers work this way."""
    from torch.nn.modules import module as nn_module

    if any(getattr(nn_module, "_global" + name, None) for name in _HOOKS):
        return True
    return any(getattr(m, name, None) for m in model.modules() if m is not model for name in _HOOKS)


def is_exporting() -> bool:
    """Whether the model is being traced, exported or compiled: then only the reference path runs
    (no caches, no oneDNN-only ops, no branches on tensor values)."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or compiler_is_exporting() or compiler_is_compiling())

