"""HieraDet trunk (the hierarchical ViT of SAM2's image encoder) in plain PyTorch.

Each stage after the first starts with a block that halves the resolution by max-pooling the
queries ("q-pool") and widens the channels; blocks attend either inside non-overlapping windows
or globally. Inside the trunk the tokens are a flat (B, N, C) stream in whatever order the next
blocks need (:mod:`.token_layout`); the stage outputs are NCHW views of channels-last maps.

Numerically this follows birder's ``birder.net.hieradet`` (the reference our tests compare
against), including its quirks: windows are zero-padded *after* norm1 and the padding takes
part in attention, and the first block of a stage uses the previous stage's window size.

Speed (CPU, see the README's benchmarks): no per-block window partition / unpartition / pad /
crop copies, q-pooling as a max over contiguous planes, and in inference oneDNN linears with
the bias, GELU and residual add fused in (:mod:`.fused_linear`; they bypass forward hooks on
the ``nn.Linear`` modules, ``HIERADET_FUSED_LINEAR=0`` turns them off).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused_linear import fused_dtype, linear, linear_residual
from .token_layout import BlockStep, Gather, TokenLayout, build_plan, pool_planes, relay, zero_slots

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

PLAN_CACHE_SIZE = 16  # token-layout plans kept per model, one per input size
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


def _first_blocks(depths: Sequence[int]) -> set[int]:
    """Indices of the q-pool blocks (the first block of every stage after the first)."""
    return {sum(depths[:s]) for s in range(1, len(depths))}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention inside groups of tokens (windows, or all tokens); with ``q_pool``
    the queries are max-pooled 2x2 (the token order must be a TokenLayout with plane levels)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def attend(self, x: torch.Tensor, groups: int, pooled: int, fused: Optional[torch.dtype]) -> torch.Tensor:
        """(B, N, C) -> attention output before ``proj``: (B, groups * queries per group, dim_out)."""
        b, n, _ = x.shape
        qkv = linear(x, self.qkv, fused)
        head_dim = qkv.shape[-1] // (3 * self.num_heads)
        # q, k, v stay strided views of qkv: SDPA reads them in place.
        q, k, v = qkv.view(b * groups, n // groups, 3, self.num_heads, head_dim).unbind(2)
        if self.q_pool:
            q = pool_planes(q, groups, pooled)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x.transpose(1, 2).reshape(b, -1, self.num_heads * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global attention over a (B, H, W, C) map (q-pooling it 2x2 with ``q_pool``)."""
        b, h, w, _ = x.shape
        layout = TokenLayout(h, w, 0, 1 if self.q_pool else 0)
        tokens = x.reshape(b, h * w, -1)
        if self.q_pool:
            tokens = Gather.between(TokenLayout(h, w, 0, 0), layout).to(x.device)(tokens)
        out = self.proj(self.attend(tokens, 1, layout.pooled_per_group(), fused=None))
        if self.q_pool:
            h, w = h // 2, w // 2
        return out.view(b, h, w, -1)


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

    def forward(self, x: torch.Tensor, step: Optional["BlockStep"] = None) -> torch.Tensor:
        """x: a (B, N, C) token stream laid out as ``step`` says (see HieraDet._plan), or a
        (B, H, W, C) map (then converted here and back)."""
        if step is None:
            b, h, w, _ = x.shape
            step = BlockStep.single(self, h, w).to(x.device)
            x = self.forward(x.reshape(b, h * w, -1), step)
            return x.view(b, step.after.h, step.after.w, -1)

        fused = None if (self.training and self.drop_path_rate > 0) else fused_dtype(x)
        rate, training = self.drop_path_rate, self.training
        win = step.win
        attn_layout = win if win is not None else step.layout
        groups = attn_layout.groups if (self.window_size > 0 or win is not None) else 1
        pooled = attn_layout.pooled_per_group() if self.q_pool else 0

        xn = self.norm1(x)
        if win is not None:
            # Windows that need padding: gather the normalised tokens into padded windows and zero
            # the pad slots (birder zero-pads the normalised map); the pads are dropped again below.
            xn = zero_slots(relay(step.win_in, xn), win.pad_runs, win.pad_mask)
        shortcut = x
        if self.proj is not None:
            shortcut = linear(xn, self.proj, fused)
            if self.q_pool:
                b, n, c = shortcut.shape
                shortcut = pool_planes(shortcut.view(b * groups, n // groups, c), groups, pooled).view(b, -1, c)
        y = self.attn.attend(xn, groups, pooled, fused)
        if win is not None and not self.q_pool:
            y = relay(step.win_out, y)  # back to the stream before proj: no work on pads
        x = linear_residual(y, self.attn.proj, shortcut, fused, rate, training)
        if win is not None and self.q_pool:
            x = relay(step.win_out, x)  # the pooled windows, into the next stream layout
        h = linear(self.norm2(x), self.mlp.fc1, fused, gelu=True)
        return linear_residual(h, self.mlp.fc2, x, fused, rate, training)


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
        odd = [i for i, s in enumerate(windows) if i in _first_blocks(depths) and s % 2]
        if odd:
            raise ValueError(f"HieraDet blocks {odd} pool their queries 2x2 inside windows of odd size "
                             f"{[windows[i] for i in odd]}; such windows do not tile after pooling. Use even "
                             "sizes (or 0, global) in window_spec for stages that a later stage follows.")
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
        self._pos_layout_cache: Optional[tuple] = None
        self._plans: dict[tuple, list[BlockStep]] = {}

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

    def _plan(self, h: int, w: int, device: torch.device) -> list[BlockStep]:
        """Per block: the gather before it, its token layout, and the gather to (h, w) after it.

        Kept for the PLAN_CACHE_SIZE sizes used last: multi-scale training meets hundreds of
        padded sizes, and a plan holds ~2 MB of index tensors at 800x1344."""
        key = (h, w, str(device))
        plan = self._plans.pop(key, None)
        if plan is None:
            plan = [s.to(device) for s in build_plan(self.blocks, h, w)]
            while len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))  # the least recently used
        self._plans[key] = plan
        return plan

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[BlockStep]]:
        """Patch embedding plus position embedding, in the token layout of the first block."""
        conv = self.patch_embed
        # A channels-last weight makes the convolution write channels-last output (and run faster
        # on CPU), so the (B, H*W, C) tokens are a view of it.
        x = F.conv2d(x, conv.weight.contiguous(memory_format=torch.channels_last), conv.bias, conv.stride,
                     conv.padding)
        b, c, h, w = x.shape
        plan = self._plan(h, w, x.device)
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        pos = self.position_embedding(h, w).reshape(1, h * w, c)
        gather = plan[0].convert
        if gather is None:
            return tokens + pos, plan
        cached = self._pos_layout_cache
        if cached is not None and cached[0] is pos and cached[1] is gather:
            pos = cached[2]
        else:
            pos_layout = gather(pos)
            if not pos.requires_grad:
                self._pos_layout_cache = (pos, gather, pos_layout)
            pos = pos_layout
        tokens = gather(tokens)
        if tokens.dtype == torch.result_type(tokens, pos) and not (pos.requires_grad or tokens.requires_grad):
            return tokens.add_(pos), plan
        return tokens + pos, plan

    def _run(self, x: torch.Tensor, stop_block: Optional[int] = None):
        """Yields (block index, (B, N, C) stream, plan step) after every block."""
        x, plan = self._embed(x)
        use_cp = self.with_cp and torch.is_grad_enabled() and self.training
        for i, (block, step) in enumerate(zip(self.blocks, plan)):
            if i > 0 and step.convert is not None:
                x = step.convert(x)
            if use_cp and any(p.requires_grad for p in block.parameters()):
                x = checkpoint(block, x, step, use_reentrant=False)
            else:
                x = block(x, step)
            yield i, x, step
            if stop_block is not None and i >= stop_block:
                return

    @staticmethod
    def _to_map(x: torch.Tensor, step: BlockStep) -> torch.Tensor:
        """(B, N, C) stream after ``step`` -> (B, H, W, C) channels-last map (a view if row-major)."""
        if step.to_map is not None:
            x = step.to_map(x)
        return x.view(x.shape[0], step.after.h, step.after.w, x.shape[-1])

    def forward_tokens(self, x: torch.Tensor, stop_block: Optional[int] = None):
        """Yields (block index, channels-last (B, H, W, C) tokens) after every block."""
        for i, tokens, step in self._run(x, stop_block):
            yield i, self._to_map(tokens, step)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wanted = {self.stage_ends[s]: s for s in self.out_indices}
        outs = []
        for i, tokens, step in self._run(x, stop_block=max(wanted)):
            if i in wanted:
                # An NCHW view of channels-last memory: convolutions take it as is, no copy.
                outs.append(self._to_map(tokens, step).permute(0, 3, 1, 2))
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
