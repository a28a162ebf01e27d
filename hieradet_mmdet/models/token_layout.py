"""Token order of the fast path's flat (B, N, C) token stream (:mod:`.fast_path`).

The fast path keeps the trunk's tokens as a flat (B, N, C) stream in an order (a TokenLayout) chosen so that
blocks need no per-block partition / unpartition copies:
  * windowed attention only needs the tokens of a window to be adjacent; inside a window any
    order works, as attention (without position bias) is permutation-equivariant;
  * global attention takes any order of the tokens;
  * q-pooling needs the four members of every 2x2 cell; we store them as four contiguous
    "planes", so pooling is a max over four equal blocks, and its result is already in the
    order the following blocks want (recursively, for several pooling levels);
  * LayerNorm, the MLP and the residual adds are per token.
So a run of blocks whose windows tile the map (and the q-pools between them) shares one layout.
The stream itself is never padded: a block whose windows need padding gathers its normalised
tokens into padded windows, zeroes the pad slots (exactly birder's zero padding after norm1),
and gathers the attention output back, so its projection and MLP never see pad slots. A gather
(index_select over whole rows) also re-lays the stream where the next block needs another
layout, and produces the stage outputs.

Blocks are described by their ``window_size`` (0: global) and ``q_pool``; the plan for an
input size (:func:`build_plan`) says, per block, how its stream is laid out and gathered.
Everything here is index bookkeeping, computed once per input size and kept in a
:class:`PlanCache`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch


def plane_order(h: int, w: int, levels: int) -> torch.Tensor:
    """Row-major positions of an h x w grid in "plane" order for ``levels`` rounds of 2x2 pooling:
    the four members (dy, dx) of every 2x2 cell go to four consecutive equal blocks, each block
    itself in plane order for the next level; cells a floor-mode pooling drops go last."""
    if levels == 0 or h < 2 or w < 2:
        return torch.arange(h * w)
    h2, w2 = h // 2, w // 2
    inner = plane_order(h2, w2, levels - 1)
    r, c = inner // w2, inner % w2
    planes = [(2 * r + dy) * w + (2 * c + dx) for dy in (0, 1) for dx in (0, 1)]
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    tail = ((rows >= 2 * h2) | (cols >= 2 * w2)).flatten().nonzero().flatten()
    return torch.cat(planes + [tail])


class TokenLayout:
    """How a (B, N, C) token stream stores an h x w map.

    ``window`` > 0: windows of window x window tokens on a (nh, nw) grid, one after the other,
    padded at the bottom / right; ``window`` == 0: one group holding all tokens, no padding.
    ``levels``: how many 2x2 q-poolings the order inside a group supports (see plane_order)."""

    def __init__(self, h: int, w: int, window: int, levels: int, grid: Optional[tuple[int, int]] = None) -> None:
        self.h, self.w, self.window, self.levels = h, w, window, levels
        if window > 0:
            self.grid = grid or (-(-h // window), -(-w // window))
            nh, nw = self.grid
            inner = plane_order(window, window, levels)
            rows = (torch.arange(nh) * window)[:, None, None] + (inner // window)[None, None, :]
            cols = (torch.arange(nw) * window)[None, :, None] + (inner % window)[None, None, :]
            rows, cols = rows.expand(nh, nw, -1).flatten(), cols.expand(nh, nw, -1).flatten()
            pad = (rows >= h) | (cols >= w)
            self.src = rows.clamp(max=h - 1) * w + cols.clamp(max=w - 1)
            self.groups = nh * nw
        else:
            self.grid = None
            self.src = plane_order(h, w, levels)
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


def zero_slots(x: torch.Tensor, runs: Sequence[tuple[int, int]], mask: Optional[torch.Tensor]) -> torch.Tensor:
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

    def to(self, device: torch.device) -> "Gather":
        move = lambda t: None if t is None else t.to(device)
        return Gather(move(self.index), move(self.back), self.zero_runs, move(self.zero_mask))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _GatherFunction.apply(x, self)
        return _gather_rows(x, self.index)


def gather_between(src: TokenLayout, dst: TokenLayout) -> Optional[Gather]:
    """The gather from a stream in ``src`` to one in ``dst`` (dst's pads get copies of real
    tokens); None if the two orders are the same."""
    index = src.inv[dst.src]
    if src.n == dst.n and not (src.has_pad or dst.has_pad) and torch.equal(index, torch.arange(dst.n)):
        return None
    return Gather(index, dst.inv[src.src], src.pad_runs, src.pad_mask)


class _GatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gather: Gather) -> torch.Tensor:
        ctx.gather = gather
        return _gather_rows(x, gather.index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g = ctx.gather
        return zero_slots(_gather_rows(grad.contiguous(), g.back), g.zero_runs, g.zero_mask), None


def pool_planes(x: torch.Tensor, groups: int, m: int) -> torch.Tensor:
    """2x2 max pooling in plane order: the max over the first four blocks of m tokens of every group.
    x: (B * groups, tokens per group, ...) -> (B * groups, m, ...)."""
    planes = x[:, :4 * m].unflatten(1, (4, m))
    if torch.is_grad_enabled() and x.requires_grad:
        return planes.max(1).values  # its backward scatters into the max (as MaxPool2d), amax's splits ties
    return planes.amax(1)


class BlockStep:
    """How one block runs: ``relayout`` gathers the stream into ``layout`` before it (None: it
    is laid out so already); when its windows need padding, ``windows`` is the padded-window
    layout it attends in, with the gathers ``to_windows`` / ``from_windows`` around attention;
    ``after`` is the stream layout it leaves, ``to_rows`` the gather from that to the row-major
    map (None: already row-major)."""
    __slots__ = ("relayout", "layout", "windows", "to_windows", "from_windows", "after", "to_rows")

    def __init__(self, relayout, layout, after, windows=None, to_windows=None, from_windows=None,
                 to_rows=False) -> None:
        self.relayout, self.layout, self.after = relayout, layout, after
        self.windows, self.to_windows, self.from_windows = windows, to_windows, from_windows
        self.to_rows = gather_between(after, TokenLayout(after.h, after.w, 0, 0)) if to_rows is False else to_rows

    def to(self, device: torch.device) -> "BlockStep":
        move = lambda t: None if t is None else t.to(device)
        return BlockStep(move(self.relayout), self.layout.to(device), self.after.to(device),
                         move(self.windows), move(self.to_windows), move(self.from_windows), move(self.to_rows))

    @staticmethod
    def padded(block, layout: TokenLayout, after: Optional[TokenLayout] = None) -> "BlockStep":
        """A block attending in padded windows gathered from a stream in ``layout``."""
        h, w = layout.h, layout.w
        windows = TokenLayout(h, w, block.window_size, int(block.q_pool))
        if block.q_pool:
            after = after or TokenLayout(h // 2, w // 2, 0, 0)
            return BlockStep(None, layout, after, windows, gather_between(layout, windows),
                             gather_between(windows.pooled(), after))
        return BlockStep(None, layout, layout, windows, gather_between(layout, windows), gather_between(windows, layout))


def build_plan(blocks: Sequence, h: int, w: int) -> list[BlockStep]:
    """The BlockStep of every block (anything with ``window_size`` and ``q_pool``) on an h x w map.

    The token stream is never padded. A block whose windows tile its map runs directly on a
    stream laid out in those windows (with plane levels for the q-poolings ahead), so runs of
    such blocks need no copies; a block whose windows need padding gathers into padded
    windows and back; global blocks take any order (a global q-pool needs plane order)."""
    steps = []
    layout = TokenLayout(h, w, 0, 0)  # the row-major map the patch embedding gives
    for i, block in enumerate(blocks):
        s = block.window_size
        if s > 0 and (h % s or w % s):
            nxt = _layout_for(blocks, i + 1, h // 2, w // 2) if block.q_pool and i + 1 < len(blocks) else None
            steps.append(BlockStep.padded(block, layout, nxt))
        else:
            relayout = None
            fits = (layout.window == s and (not block.q_pool or layout.levels >= 1)) if s > 0 else \
                (not block.q_pool or (layout.window == 0 and layout.levels >= 1))
            if not fits:
                new = _layout_for(blocks, i, h, w)
                relayout, layout = gather_between(layout, new), new
            steps.append(BlockStep(relayout, layout, layout.pooled() if block.q_pool else layout))
        layout = steps[-1].after
        if block.q_pool:
            h, w = h // 2, w // 2
    return steps


def _layout_for(blocks: Sequence, i: int, h: int, w: int) -> TokenLayout:
    """The stream layout block ``i`` wants on an h x w map (row-major if it takes any)."""
    block = blocks[i]
    s = block.window_size
    if (s > 0 and not (h % s or w % s)) or (s == 0 and block.q_pool):
        return TokenLayout(h, w, s, _chain_levels(blocks, i, h, w))
    return TokenLayout(h, w, 0, 0)


def _chain_levels(blocks: Sequence, first: int, h: int, w: int) -> int:
    """How many q-poolings a layout made for block ``first`` can serve before a block needs a
    different layout: the plane levels to give it."""
    window, levels = blocks[first].window_size, 0
    for j in range(first, len(blocks)):
        block = blocks[j]
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


class PlanCache:
    """The plans of the input sizes used last (least recently used dropped first): multi-scale
    training meets hundreds of padded sizes, and a plan holds ~2 MB of index tensors at 800x1344."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._plans: OrderedDict[tuple, list[BlockStep]] = OrderedDict()

    def get(self, blocks: Sequence, h: int, w: int, device: torch.device) -> list[BlockStep]:
        key = (h, w, str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = [step.to(device) for step in build_plan(blocks, h, w)]
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def __contains__(self, key: tuple) -> bool:
        return key in self._plans
