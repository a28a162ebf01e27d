"""FiniteLossHook on a toy model: checks happen before any weight changes, in both modes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper

from hieradet_mmdet.engine.finite_loss import FiniteLossHook, NonFiniteLossError


class Toy(BaseModel):
    """loss = w * x, or sqrt(w - w): a finite loss (0) whose gradient is infinite."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, mode="loss", kind="finite"):
        if kind == "bad-gradient":
            return {"loss": torch.sqrt(self.w - self.w.detach()).sum()}
        return {"loss": (self.w * x).sum(), "loss_aux": x.abs().sum()}


def setup(on_nonfinite="stop", clip=True):
    model = Toy()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                           clip_grad=dict(max_norm=1.0) if clip else None)
    runner = SimpleNamespace(model=model, optim_wrapper=wrapper, iter=6, message_hub=MessageHub.get_current_instance())
    FiniteLossHook(on_nonfinite=on_nonfinite, max_skips=2).before_train(runner)
    return model, wrapper


def step(model, wrapper, x, kind="finite"):
    return model.train_step(dict(x=torch.tensor(x), kind=kind), wrapper)


def test_a_nan_loss_stops_before_backward_and_names_the_terms():
    model, wrapper = setup()
    step(model, wrapper, [1.0, 2.0, 3.0])
    before = model.w.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"training stopped at iteration 7: the loss is not finite "
                                                 r"\(loss=nan, loss_aux=nan\)"):
        step(model, wrapper, [float("nan"), 1.0, 1.0])
    assert torch.equal(model.w.detach(), before)


def test_a_non_finite_gradient_norm_stops_before_the_step():
    model, wrapper = setup()
    before = model.w.detach().clone()
    with pytest.raises(NonFiniteLossError, match="the gradient norm is (inf|nan)"):
        step(model, wrapper, [0.0, 0.0, 0.0], kind="bad-gradient")
    assert torch.equal(model.w.detach(), before)


def test_skip_mode_leaves_the_weights_and_stops_after_max_skips():
    model, wrapper = setup("skip")
    before = model.w.detach().clone()
    step(model, wrapper, [float("inf"), 0.0, 0.0])
    step(model, wrapper, [0.0, 0.0, 0.0], kind="bad-gradient")
    assert torch.equal(model.w.detach(), before)  # two skipped batches: no update
    with pytest.raises(NonFiniteLossError, match="2 batches in a row were skipped before"):
        step(model, wrapper, [float("nan"), 0.0, 0.0])
    model, wrapper = setup("skip")
    step(model, wrapper, [float("nan"), 0.0, 0.0])
    step(model, wrapper, [1.0, 1.0, 1.0])  # a good step resets the count and trains
    assert not torch.equal(model.w.detach(), before)
    step(model, wrapper, [float("nan"), 0.0, 0.0])
    step(model, wrapper, [float("nan"), 0.0, 0.0])


def test_on_nonfinite_is_checked():
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        FiniteLossHook(on_nonfinite="ignore")
