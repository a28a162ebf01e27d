"""The operations HieraDet's reference and fast paths share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling (floor mode) of a (B, H, W, C) map."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over (B, heads, N, d). Traced, it is written out as two matmuls: the
    TorchScript exporter and MMEngine's FLOP counter see matmuls, not a fused SDPA op."""
    if torch.jit.is_tracing():
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return weights.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, window, window, C), zero-padding H, W up to multiples of
    ``window``; also returns the padded size."""
    b, h, w, c = x.shape
    x = pad_bottom_right(x, (window - h % window) % window, (window - w % window) % window)
    hp, wp = x.shape[1], x.shape[2]
    nh, nw = hp // window, wp // window
    x = x.view(b, nh, window, nw, window, c).permute(0, 1, 3, 2, 4, 5)
    return reshaped_copy(x, (b * nh * nw, window, window, c)), (hp, wp)


def pad_bottom_right(x: torch.Tensor, pad_h, pad_w) -> torch.Tensor:
    """Zero rows below and zero columns right of a (B, H, W, C) map. Concatenated rather than
    ``F.pad``: the TorchScript exporter turns ``F.pad`` amounts into constants of the traced size,
    while the sizes of these zero blocks stay computed from the input's shape (0 rows is a no-op)."""
    b, h, _, c = x.shape
    x = torch.cat([x, x.new_zeros((b, h, pad_w, c))], dim=2)
    return torch.cat([x, x.new_zeros((b, pad_h, x.shape[2], c))], dim=1)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`window_partition`: (B * windows, window, window, C) -> (B, H, W, C)."""
    hp, wp = padded
    nh, nw, c = hp // window, wp // window, windows.shape[-1]
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return reshaped_copy(x, (b, hp, wp, c))[:, :size[0], :size[1]]


def reshaped_copy(x: torch.Tensor, shape) -> torch.Tensor:
    """``x.reshape(shape)`` for a permuted ``x``, always as a copy. ``reshape`` returns a view
    instead where the permuted axes have size 1 (one window across the map), a choice that
    torch.export can only keep as a guard on the input size; the copy is right at every size."""
    return x.clone(memory_format=torch.contiguous_format).view(shape)
