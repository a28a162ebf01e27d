"""HieraDet's fast path: the reference computation of :mod:`.hieradet` without its copies.

The tokens stay one flat (B, N, C) stream in an order that suits the blocks ahead
(:mod:`.token_layout`): no per-block window partition / unpartition / pad / crop copies, q-pooling
as a max over contiguous planes, and in CPU inference oneDNN linears with the bias, GELU and
residual add fused in (:mod:`.fused_linear`). The per-size index plans live in the model's
:class:`~.token_layout.PlanCache`. Stage outputs are NCHW views of channels-last maps.
Same parameters, same numbers as the reference path (tests compare both with birder).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .fused_linear import fused_dtype, linear, linear_residual
from .token_layout import BlockStep, pool_planes, zero_slots


def fast_forward(model, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``model``'s stage outputs for images ``x``, as :meth:`HieraDet.forward_reference` gives them."""
    if x.shape[0] == 0:  # nothing to lay out; the reference path gives the empty maps
        return model.forward_reference(x)
    wanted = {model.stage_ends[s] for s in model.out_indices}
    tokens, plan = _embed(model, x)
    use_cp = model.with_cp and model.training and torch.is_grad_enabled()
    outs = []
    for i, (block, step) in enumerate(zip(model.blocks[:max(wanted) + 1], plan)):
        if i > 0 and step.relayout is not None:
            tokens = step.relayout(tokens)
        if use_cp and any(p.requires_grad for p in block.parameters()):
            tokens = checkpoint(run_block, block, tokens, step, use_reentrant=False)
        else:
            tokens = run_block(block, tokens, step)
        if i in wanted:
            outs.append(to_map(tokens, step).permute(0, 3, 1, 2))
    return tuple(outs)


def to_map(tokens: torch.Tensor, step: BlockStep) -> torch.Tensor:
    """The (B, N, C) stream a block left -> its (B, H, W, C) map (a view if already row-major)."""
    if step.to_rows is not None:
        tokens = step.to_rows(tokens)
    return tokens.view(tokens.shape[0], step.after.h, step.after.w, tokens.shape[-1])


def _embed(model, x: torch.Tensor) -> tuple[torch.Tensor, list[BlockStep]]:
    """Patch embedding plus position embedding, in the token layout of the first block."""
    conv = model.patch_embed
    # A channels-last weight makes the convolution write channels-last output (and run faster on
    # CPU), so the (B, H*W, C) tokens are a view of it.
    x = F.conv2d(x, conv.weight.contiguous(memory_format=torch.channels_last), conv.bias, conv.stride,
                 conv.padding)
    b, c, h, w = x.shape
    plan = model.plans.get(model.blocks, h, w, x.device)
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    pos = model.position_embedding(h, w).reshape(1, h * w, c)
    gather = plan[0].relayout
    if gather is not None:
        tokens, pos = gather(tokens), gather(pos)
    if tokens.dtype == torch.result_type(tokens, pos) and not (pos.requires_grad or tokens.requires_grad):
        return tokens.add_(pos), plan
    return tokens + pos, plan


def run_block(block, x: torch.Tensor, step: BlockStep) -> torch.Tensor:
    """:meth:`MultiScaleBlock.forward` on a (B, N, C) stream laid out as ``step`` says."""
    fused: Optional[torch.dtype] = None if (block.training and block.drop_path_rate > 0) else fused_dtype(x)
    rate, training = block.drop_path_rate, block.training
    windows = step.windows
    attn_layout = windows if windows is not None else step.layout
    groups = attn_layout.groups if (block.window_size > 0 or windows is not None) else 1
    pooled = attn_layout.pooled_per_group() if block.q_pool else 0

    xn = block.norm1(x)
    if windows is not None:
        # Windows that need padding: gather the normalised tokens into padded windows and zero the
        # pad slots (birder zero-pads the normalised map); the pads are dropped again below.
        if step.to_windows is not None:
            xn = step.to_windows(xn)
        xn = zero_slots(xn, windows.pad_runs, windows.pad_mask)
    shortcut = x
    if block.proj is not None:
        shortcut = linear(xn, block.proj, fused)
        if block.q_pool:
            b, n, c = shortcut.shape
            shortcut = pool_planes(shortcut.view(b * groups, n // groups, c), groups, pooled).view(b, -1, c)
    y = _attend(block.attn, xn, groups, pooled, fused)
    if windows is not None and not block.q_pool and step.from_windows is not None:
        y = step.from_windows(y)  # back to the stream before proj: no work on pads
    x = linear_residual(y, block.attn.proj, shortcut, fused, rate, training)
    if windows is not None and block.q_pool and step.from_windows is not None:
        x = step.from_windows(x)  # the pooled windows, into the next stream layout
    h = linear(block.norm2(x), block.mlp.fc1, fused, gelu=True)
    return linear_residual(h, block.mlp.fc2, x, fused, rate, training)


def _attend(attn, x: torch.Tensor, groups: int, pooled: int, fused: Optional[torch.dtype]) -> torch.Tensor:
    """Attention of (B, N, C) tokens inside ``groups`` equal groups, before ``proj``:
    -> (B, groups * queries per group, dim_out), queries pooled to ``pooled`` per group."""
    b, n, _ = x.shape
    qkv = linear(x, attn.qkv, fused)
    head_dim = qkv.shape[-1] // (3 * attn.num_heads)
    # q, k, v stay strided views of qkv: SDPA reads them in place.
    q, k, v = qkv.view(b * groups, n // groups, 3, attn.num_heads, head_dim).unbind(2)
    if attn.q_pool:
        q = pool_planes(q, groups, pooled)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return x.transpose(1, 2).reshape(b, -1, attn.num_heads * head_dim)
