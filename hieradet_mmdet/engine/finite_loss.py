"""Training stops (or skips the batch) the moment the loss or the gradient norm is not finite.

``custom_hooks = [dict(type='FiniteLossHook')]`` (in every config shipped here; our tools add it to
any config) checks each step's loss terms right after the forward pass, before the backward pass
and the optimizer step. A diverged run therefore ends with its weights and optimizer state as they
were after the last good step, writes no checkpoint of NaNs (none of the kept ones are rotated
away), and exits non-zero naming the iteration and the loss terms. With gradient clipping on,
a non-finite gradient norm is caught the same way, before the step (not under fp16 loss scaling,
where MMEngine's scaler skips such steps itself).

``dict(type='FiniteLossHook', on_nonfinite='skip')`` skips such batches instead (no update) and
stops only after ``max_skips`` of them in a row. In data-parallel runs all processes agree on
stopping or skipping.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from .. import mmengine_adapter as mmengine_api


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became infinite or NaN; training stopped before the step."""


class _SkipStep(Exception):
    pass


@HOOKS.register_module()
class FiniteLossHook(Hook):
    priority = "VERY_HIGH"

    def __init__(self, on_nonfinite: str = "stop", max_skips: int = 10) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"FiniteLossHook on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.max_skips = int(max_skips)
        self.skipped_in_a_row = 0
        self._skip_this_step = False

    def before_train(self, runner) -> None:
        model = getattr(runner.model, "module", runner.model)
        wrapper = runner.optim_wrapper
        if not isinstance(wrapper, OptimWrapper):
            print_log("FiniteLossHook checks the loss only: the gradient norm check needs a single OptimWrapper",
                      logger="current", level=30)
        self._runner = runner
        if mmengine_api.is_overridden(model, "parse_losses"):  # this runner's objects are checked already
            return
        # Only this run's model and wrapper change (mmengine_adapter.override).
        parse_losses = mmengine_api.override(model, "parse_losses", lambda losses: self._checked(*parse_losses(losses)))
        if isinstance(wrapper, OptimWrapper):
            update_params = mmengine_api.override(
                wrapper, "update_params", lambda loss, **kwargs: self._update(update_params, wrapper, loss, **kwargs))
            if wrapper.clip_grad_kwargs and not isinstance(wrapper, AmpOptimWrapper):
                mmengine_api.wrap_gradient_clipping(wrapper, self._clipped)

    # -- the checks --

    def _checked(self, loss: torch.Tensor, log_vars: dict):
        bad = not bool(torch.isfinite(loss.detach()).all())
        if _agree(bad, loss.device):
            terms = ", ".join(f"{k}={_value(v)}" for k, v in log_vars.items())
            self._nonfinite(f"the loss is not finite ({terms})")
        return loss, log_vars

    def _clipped(self, clip) -> None:
        clip()
        norm = mmengine_api.last_gradient_norm(self._runner.message_hub)
        if not math.isfinite(norm):  # the same on every process: gradients are all-reduced
            self._nonfinite(f"the gradient norm is {norm}")
            raise _SkipStep  # (in 'stop' mode _nonfinite has raised already)

    def _nonfinite(self, what: str) -> None:
        iteration = self._runner.iter + 1
        if self.on_nonfinite == "skip" and self.skipped_in_a_row < self.max_skips:
            self.skipped_in_a_row += 1
            self._skip_this_step = True
            print_log(f"iteration {iteration}: {what}; skipping this batch (FiniteLossHook on_nonfinite='skip', "
                      f"{self.skipped_in_a_row} in a row)", logger="current", level=30)
            return
        hint = ("" if self.on_nonfinite == "stop" else
                f" ({self.skipped_in_a_row} batches in a row were skipped before, the most max_skips allows)")
        raise NonFiniteLossError(
            f"training stopped at iteration {iteration}: {what}{hint}. No weight was changed by this step and no "
            f"checkpoint of it was written; the checkpoints saved so far are intact. Lower the learning rate, "
            f"warm up longer or clip gradients, then continue with --resume.")

    def _update(self, update_params, wrapper, loss, **kwargs) -> None:
        try:
            if self._skip_this_step:  # decided after the forward pass, before any backward
                _backward_zeros(wrapper)
            else:
                update_params(loss, **kwargs)  # raises _SkipStep when the gradient norm check skips
                self.skipped_in_a_row = 0
        except _SkipStep:
            wrapper.zero_grad()
        finally:
            self._skip_this_step = False


def _backward_zeros(wrapper) -> None:
    """Skip a batch: data-parallel processes still run a backward pass together (one of zeros,
    so their gradient all-reduce completes), and nothing is stepped."""
    wrapper.zero_grad()
    if dist.is_available() and dist.is_initialized():
        params = [p for g in wrapper.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if params:
            sum((p * 0).sum() for p in params).backward()
            wrapper.zero_grad()


def _agree(bad: bool, device: torch.device) -> bool:
    """Whether any process saw a non-finite value (every process must stop or skip together)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return bad


def _value(v) -> str:
    return f"{float(v):.4g}" if isinstance(v, (int, float, torch.Tensor)) else str(v)

