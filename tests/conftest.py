"""Shared fixtures: birder reference models with perturbed (non-trivial) weights."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def make_birder_model(name: str = "hieradet_d_small", num_classes: int = 10, size: int = 256, seed: int = 0):
    """A birder HieraDet with random, perturbed weights (biases and norms away from their init)."""
    from birder.model_registry import registry

    torch.manual_seed(seed)
    model = registry.net_factory(name, num_classes, size=(size, size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="session")
def birder_small():
    return make_birder_model("hieradet_small")


@pytest.fixture(scope="session")
def birder_d_small():
    return make_birder_model("hieradet_d_small")
