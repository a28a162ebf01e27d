"""HieraDet trunk (the hierarchical ViT of SAM2's image encoder) in plain PyTorch.

Each stage after the first starts with a block that halves the resolution by max-pooling the
queries ("q-pool") and widens the channels; blocks attend either inside non-overlapping windows
or globally. Inside the trunk the tokens are a flat (B, N, C) stream in whatever order the next
blocks need (see "Token order" below); the stage outputs are NCHW views of channels-last maps.

Numerically this follows birder's ``birder.net.hieradet`` (the reference our tests compare
against), including its quirks: windows are zero-padded *after* norm1 and the padding takes
part in attention, and the first block of a stage uses the previous stage's window size.

Speed (CPU, see docs/benchmark.md): no per-block window partition / unpartition / pad / crop
copies, q-pooling as a max over contiguous planes, and in inference oneDNN linears with the
bias, GELU and residual add fused in (fp32, and bf16 under autocast).
"""

from __future__ import annotations

import math
import os
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


def _first_blocks(depths: Sequence[int]) -> set[int]:
    """Indices of the q-pool blocks (the first block of every stage after the first)."""
    return {sum(depths[:s]) for s in range(1, len(depths))}


# ---------------------------------------------------------------------------------------------
# Token order.
#
# The trunk keeps its tokens as a flat (B, N, C) stream in an order (a TokenLayout) chosen so that
# blocks need no per-block partition / unpartition copies:
#   * windowed attention only needs the tokens of a window to be adjacent; inside a window any
#     order works, as attention (without position bias) is permutation-equivariant;
#   * global attention takes any order of the tokens;
#   * q-pooling needs the four members of every 2x2 cell; we store them as four contiguous
#     "planes", so pooling is a max over four equal blocks, and its result is already in the
#     order the following blocks want (recursively, for several pooling levels);
#   * LayerNorm, the MLP and the residual adds are per token.
# So a run of blocks whose windows tile the map (and the q-pools between them) shares one layout.
# The stream itself is never padded: a block whose windows need padding gathers its normalised
# tokens into padded windows, zeroes the pad slots (exactly birder's zero padding after norm1),
# and gathers the attention output back, so its projection and MLP never see pad slots. A gather
# (index_select over whole rows) also re-lays the stream where the next block needs another
# layout, and produces the stage outputs.
# ---------------------------------------------------------------------------------------------


def _plane_order(h: int, w: int, levels: int) -> torch.Tensor:
    """Row-major positions of an h x w grid in "plane" order for ``levels`` rounds of 2x2 pooling:
    the four members (dy, dx) of every 2x2 cell go to four consecutive equal blocks, each block
    itself in plane order for the next level; cells a floor-mode pooling drops go last."""
    if levels == 0 or h < 2 or w < 2:
        return torch.arange(h * w)
    h2, w2 = h // 2, w // 2
    inner = _plane_order(h2, w2, levels - 1)
    r, c = inner // w2, inner % w2
    planes = [(2 * r + dy) * w + (2 * c + dx) for dy in (0, 1) for dx in (0, 1)]
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    tail = ((rows >= 2 * h2) | (cols >= 2 * w2)).flatten().nonzero().flatten()
    return torch.cat(planes + [tail])


class TokenLayout:
    """How a (B, N, C) token stream stores an h x w map.

    ``window`` > 0: windows of window x window tokens on a (nh, nw) grid, one after the other,
    padded at the bottom / right; ``window`` == 0: one group holding all tokens, no padding.
    ``levels``: how many 2x2 q-poolings the order inside a group supports (see _plane_order)."""

    def __init__(self, h: int, w: int, window: int, levels: int, grid: Optional[tuple[int, int]] = None) -> None:
        self.h, self.w, self.window, self.levels = h, w, window, levels
        if window > 0:
            self.grid = grid or (-(-h // window), -(-w // window))
            nh, nw = self.grid
            inner = _plane_order(window, window, levels)
            rows = (torch.arange(nh) * window)[:, None, None] + (inner // window)[None, None, :]
            cols = (torch.arange(nw) * window)[None, :, None] + (inner % window)[None, None, :]
            rows, cols = rows.expand(nh, nw, -1).flatten(), cols.expand(nh, nw, -1).flatten()
            pad = (rows >= h) | (cols >= w)
            self.src = rows.clamp(max=h - 1) * w + cols.clamp(max=w - 1)
            self.groups = nh * nw
        else:
            self.grid = None
            self.src = _plane_order(h, w, levels)
            pad = torch.zeros(self.src.shape, dtype=torch.bool)
            self.groups = 1
        self.n = self.src.numel()
        self.has_pad = bool(pad.any())
        self.pad_mask = pad[:, None] if self.has_pad else None
        # The pad slots as runs of consecutive slots: zeroing a few slices is cheaper than a mask.
        edge = torch.zeros(1, dtype=torch.bool)
        starts = (pad & ~torch.cat([edge, pad[:-1]])).nonzero().flatten().tolist()
        stops = (pad & ~torch.cat([pad[1:], edge])).nonzero().flatten().add(1).tolist()
        self.pad_runs = list(zip(starts, stops))
        real = ~pad
        self.inv = torch.empty(h * w, dtype=torch.long)  # map position -> slot
        self.inv[self.src[real]] = torch.arange(self.n)[real]
        self.plain = not self.has_pad and torch.equal(self.src, torch.arange(h * w))

    def to(self, device: torch.device) -> "TokenLayout":
        """This layout with its index tensors on ``device`` (cached)."""
        device = torch.device(device)
        if self.src.device == device:
            return self
        cache = self.__dict__.setdefault("_on", {})
        if device not in cache:
            moved = object.__new__(TokenLayout)
            moved.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_on"})
            for name in ("src", "inv", "pad_mask"):
                if getattr(self, name) is not None:
                    setattr(moved, name, getattr(self, name).to(device))
            cache[device] = moved
        return cache[device]

    def pooled(self) -> "TokenLayout":
        """The layout a q-pool block writes: the max over the first level of planes."""
        if self.window:
            return TokenLayout(self.h // 2, self.w // 2, self.window // 2, self.levels - 1, self.grid)
        return TokenLayout(self.h // 2, self.w // 2, 0, self.levels - 1)

    def pooled_per_group(self) -> int:
        """Query tokens per group after a q-pool (each of the four planes holds that many)."""
        return (self.window // 2) ** 2 if self.window else (self.h // 2) * (self.w // 2)



def _zero_slots(x: torch.Tensor, runs: Sequence[tuple[int, int]], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero slots of a (B, N, C) stream in place: a few runs of slots as slices, else by mask
    (always under autograd, where every sliced write would cost a full copy of the gradient)."""
    if len(runs) <= 32 and not (torch.is_grad_enabled() and x.requires_grad):
        for start, stop in runs:
            x[:, start:stop] = 0.0
    elif mask is not None:
        x.masked_fill_(mask, 0.0)
    return x


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    if b > 1:
        index = (torch.arange(b, device=index.device) * n)[:, None].add(index[None]).flatten()
    out = x.new_empty(b, index.numel() // b, c)  # (not a view: the result may be written in place)
    torch.index_select(x.reshape(b * n, c), 0, index, out=out.view(-1, c))
    return out


class Gather:
    """Re-lays a (B, N, C) token stream from one TokenLayout into another as one row gather.

    Its gradient is again a gather (``back``) instead of index_select's scatter-add into zeros:
    each source slot takes the gradient of the one destination slot that holds its position.
    That is exact because the other copies (pad slots of the destination) are zeroed right after
    the forward gather, and source slots nobody reads (its pads) get zero (``zero_runs``)."""

    __slots__ = ("index", "back", "zero_runs", "zero_mask")

    def __init__(self, index, back, zero_runs=(), zero_mask=None) -> None:
        self.index, self.back, self.zero_runs, self.zero_mask = index, back, list(zero_runs), zero_mask

    @staticmethod
    def between(src: TokenLayout, dst: TokenLayout) -> Optional["Gather"]:
        """From a stream in ``src`` to ``dst`` (dst pads get copies of real tokens); None if equal."""
        index = src.inv[dst.src]
        if src.n == dst.n and not (src.has_pad or dst.has_pad) and torch.equal(index, torch.arange(dst.n)):
            return None
        return Gather(index, dst.inv[src.src], src.pad_runs, src.pad_mask)

    def to(self, device: torch.device) -> "Gather":
        move = lambda t: None if t is None else t.to(device)
        return Gather(move(self.index), move(self.back), self.zero_runs, move(self.zero_mask))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _GatherFunction.apply(x, self)
        return _gather_rows(x, self.index)


def _relay(gather: Optional[Gather], x: torch.Tensor) -> torch.Tensor:
    return x if gather is None else gather(x)


class _GatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gather: Gather) -> torch.Tensor:
        ctx.gather = gather
        return _gather_rows(x, gather.index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g = ctx.gather
        return _zero_slots(_gather_rows(grad.contiguous(), g.back), g.zero_runs, g.zero_mask), None


def _pool_planes(x: torch.Tensor, groups: int, m: int) -> torch.Tensor:
    """2x2 max pooling in plane order: the max over the first four blocks of m tokens of every group.
    x: (B * groups, tokens per group, ...) -> (B * groups, m, ...)."""
    planes = x[:, :4 * m].unflatten(1, (4, m))
    if torch.is_grad_enabled() and x.requires_grad:
        return planes.max(1).values  # its backward scatters into the max (as MaxPool2d), amax's splits ties
    return planes.amax(1)


# Inference-only fused CPU linears: oneDNN applies the bias, the GELU and the residual add inside
# the matmul (the kernels inductor uses), which saves the addmm bias copy and two passes over the
# activations. fp32, and bf16 under CPU autocast (where they run in bf16 as autocast would).
# Probed once per dtype; HIERADET_FUSED_LINEAR=0 turns them off.
_FUSED_STATE: dict[object, bool] = {}


def fused_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    if dtype not in _FUSED_STATE:
        ok = (_FUSED_STATE.get("enabled", True) and os.environ.get("HIERADET_FUSED_LINEAR", "1") != "0"
              and torch.backends.mkldnn.is_available())
        if ok:
            try:
                with torch.no_grad(), torch.autocast("cpu", enabled=False):
                    x, w, b, r = (torch.randn(*s).to(dtype) for s in ((5, 8), (6, 8), (6,), (5, 6)))
                    g = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
                    a = torch.ops.mkldnn._linear_pointwise.binary(x, r, w, b, "add")
                    ref = F.linear(x.float(), w.float(), b.float())
                    tol = 1e-5 if dtype == torch.float32 else 5e-2
                    ok = (g.dtype == a.dtype == dtype and torch.allclose(g.float(), F.gelu(ref), atol=tol)
                          and torch.allclose(a.float(), r.float() + ref, atol=tol))
            except Exception:  # an op missing or refusing in this build: use the plain path
                ok = False
        _FUSED_STATE[dtype] = bool(ok)
    return _FUSED_STATE[dtype]


def set_fused_linear(enabled: Optional[bool]) -> Optional[bool]:
    """Turn the fused inference linears off (False) or back to auto-detection (None / True);
    returns the previous setting. E.g. FLOP counters only see plain aten linears."""
    previous = _FUSED_STATE.get("enabled", True)
    _FUSED_STATE.clear()
    _FUSED_STATE["enabled"] = enabled is not False
    return previous


def _fused_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the fused linears run in for input ``x`` here, or None for the plain path
    (autograd, other devices, other autocast dtypes, no oneDNN)."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16:
            return None
    else:
        dtype = x.dtype
    return dtype if fused_linear_available(dtype) else None


def _linear(x: torch.Tensor, layer: nn.Linear, fused: Optional[torch.dtype], gelu: bool = False) -> torch.Tensor:
    if fused is not None:
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, x.shape[-1]).to(fused), layer.weight.to(fused), layer.bias.to(fused),
            "gelu" if gelu else "none", [], "none" if gelu else "")
        return y.view(*x.shape[:-1], -1)
    y = layer(x)
    return F.gelu(y) if gelu else y


def _linear_residual(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor, fused: Optional[torch.dtype],
                     rate: float = 0.0, training: bool = False) -> torch.Tensor:
    """residual + drop_path(layer(x)), in the dtype type promotion gives (as under autocast)."""
    if fused is not None and residual.dtype == fused:
        return torch.ops.mkldnn._linear_pointwise.binary(
            x.reshape(-1, x.shape[-1]).to(fused), residual.reshape(-1, residual.shape[-1]),
            layer.weight.to(fused), layer.bias.to(fused), "add").view(residual.shape)
    y = drop_path(_linear(x, layer, fused), rate, training)
    if not torch.is_grad_enabled() and y.dtype == torch.result_type(y, residual):
        return y.add_(residual)  # y is ours; saves an allocation
    return residual + y


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
        qkv = _linear(x, self.qkv, fused)
        head_dim = qkv.shape[-1] // (3 * self.num_heads)
        # q, k, v stay strided views of qkv: SDPA reads them in place.
        q, k, v = qkv.view(b * groups, n // groups, 3, self.num_heads, head_dim).unbind(2)
        if self.q_pool:
            q = _pool_planes(q, groups, pooled)
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

    def forward(self, x: torch.Tensor, step: Optional["_Step"] = None) -> torch.Tensor:
        """x: a (B, N, C) token stream laid out as ``step`` says (see HieraDet._plan), or a
        (B, H, W, C) map (then converted here and back)."""
        if step is None:
            b, h, w, _ = x.shape
            step = _Step.single(self, h, w).to(x.device)
            x = self.forward(x.reshape(b, h * w, -1), step)
            return x.view(b, step.after.h, step.after.w, -1)

        fused = None if (self.training and self.drop_path_rate > 0) else _fused_dtype(x)
        rate, training = self.drop_path_rate, self.training
        win = step.win
        attn_layout = win if win is not None else step.layout
        groups = attn_layout.groups if (self.window_size > 0 or win is not None) else 1
        pooled = attn_layout.pooled_per_group() if self.q_pool else 0

        xn = self.norm1(x)
        if win is not None:
            # Windows that need padding: gather the normalised tokens into padded windows and zero
            # the pad slots (birder zero-pads the normalised map); the pads are dropped again below.
            xn = _zero_slots(_relay(step.win_in, xn), win.pad_runs, win.pad_mask)
        shortcut = x
        if self.proj is not None:
            shortcut = _linear(xn, self.proj, fused)
            if self.q_pool:
                b, n, c = shortcut.shape
                shortcut = _pool_planes(shortcut.view(b * groups, n // groups, c), groups, pooled).view(b, -1, c)
        y = self.attn.attend(xn, groups, pooled, fused)
        if win is not None and not self.q_pool:
            y = _relay(step.win_out, y)  # back to the stream before proj: no work on pads
        x = _linear_residual(y, self.attn.proj, shortcut, fused, rate, training)
        if win is not None and self.q_pool:
            x = _relay(step.win_out, x)  # the pooled windows, into the next stream layout
        h = _linear(self.norm2(x), self.mlp.fc1, fused, gelu=True)
        return _linear_residual(h, self.mlp.fc2, x, fused, rate, training)


class _Step:
    """How one block runs: ``convert`` re-lays the stream into ``layout`` before it (None: it is
    already); ``win`` (padded windows) with the gathers ``win_in`` / ``win_out`` when its windows
    need padding (or for a lone block); ``after`` is the stream layout it leaves and ``to_map``
    the gather from that to the row-major map (None: already row-major)."""
    __slots__ = ("convert", "layout", "win", "win_in", "win_out", "after", "to_map")

    def __init__(self, convert, layout, after, win=None, win_in=None, win_out=None, to_map=False) -> None:
        self.convert, self.layout, self.after = convert, layout, after
        self.win, self.win_in, self.win_out = win, win_in, win_out
        self.to_map = Gather.between(after, TokenLayout(after.h, after.w, 0, 0)) if to_map is False else to_map

    def to(self, device: torch.device) -> "_Step":
        move = lambda t: None if t is None else t.to(device)
        return _Step(move(self.convert), self.layout.to(device), self.after.to(device),
                     None if self.win is None else self.win.to(device), move(self.win_in), move(self.win_out),
                     move(self.to_map))

    @staticmethod
    def padded(block: "MultiScaleBlock", layout: TokenLayout, after: Optional[TokenLayout] = None) -> "_Step":
        """A block attending in padded windows (or, global, in plane order) gathered from ``layout``."""
        h, w = layout.h, layout.w
        win = TokenLayout(h, w, block.window_size, int(block.q_pool))
        if block.q_pool:
            after = after or TokenLayout(h // 2, w // 2, 0, 0)
            return _Step(None, layout, after, win, Gather.between(layout, win), Gather.between(win.pooled(), after))
        return _Step(None, layout, layout, win, Gather.between(layout, win), Gather.between(win, layout))

    @staticmethod
    def single(block: "MultiScaleBlock", h: int, w: int) -> "_Step":
        """A lone block on a row-major (h, w) map."""
        plain = TokenLayout(h, w, 0, 0)
        if block.window_size == 0 and not block.q_pool:
            return _Step(None, plain, plain)
        return _Step.padded(block, plain)


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
        self._plans: dict[tuple, list[_Step]] = {}

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

    def _plan(self, h: int, w: int, device: torch.device) -> list[_Step]:
        """Per block: the gather before it, its token layout, and the gather to (h, w) after it."""
        key = (h, w, str(device))
        if key not in self._plans:
            self._plans[key] = [s.to(device) for s in self._build_plan(h, w)]
        return self._plans[key]

    def _build_plan(self, h: int, w: int) -> list[_Step]:
        """The token stream is never padded. A block whose windows tile its map runs directly on a
        stream laid out in those windows (with plane levels for the q-poolings ahead), so runs of
        such blocks need no copies; a block whose windows need padding gathers into padded
        windows and back; global blocks take any order (a global q-pool needs plane order)."""
        steps = []
        layout = TokenLayout(h, w, 0, 0)  # the row-major map the patch embedding gives
        for i, block in enumerate(self.blocks):
            s = block.window_size
            if s > 0 and (h % s or w % s):
                nxt = self._layout_for(i + 1, h // 2, w // 2) if block.q_pool and i + 1 < len(self.blocks) else None
                steps.append(_Step.padded(block, layout, nxt))
            else:
                convert = None
                fits = (layout.window == s and (not block.q_pool or layout.levels >= 1)) if s > 0 else \
                    (not block.q_pool or (layout.window == 0 and layout.levels >= 1))
                if not fits:
                    new = self._layout_for(i, h, w)
                    convert, layout = Gather.between(layout, new), new
                steps.append(_Step(convert, layout, layout.pooled() if block.q_pool else layout))
            layout = steps[-1].after
            if block.q_pool:
                h, w = h // 2, w // 2
        return steps

    def _layout_for(self, i: int, h: int, w: int) -> TokenLayout:
        """The stream layout block ``i`` wants on an h x w map (row-major if it takes any)."""
        block = self.blocks[i]
        s = block.window_size
        if (s > 0 and not (h % s or w % s)) or (s == 0 and block.q_pool):
            return TokenLayout(h, w, s, self._chain_levels(i, h, w))
        return TokenLayout(h, w, 0, 0)

    def _chain_levels(self, first: int, h: int, w: int) -> int:
        """How many q-poolings a layout made for block ``first`` can serve before a block needs a
        different layout: the plane levels to give it."""
        window, levels = self.blocks[first].window_size, 0
        for j in range(first, len(self.blocks)):
            block = self.blocks[j]
            s = block.window_size
            if j > first:
                if s > 0 and not (h % s or w % s):
                    ok = s == window and (not block.q_pool or window % 2 == 0)
                else:  # padded windows gather themselves; global blocks take any order
                    ok = not block.q_pool or (s == 0 and window == 0)
                if not ok:
                    break
            if block.q_pool:
                levels += 1
                window //= 2
                h, w = h // 2, w // 2
        return levels

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[_Step]]:
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
    def _to_map(x: torch.Tensor, step: _Step) -> torch.Tensor:
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
