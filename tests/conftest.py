"""Fixtures shared by the test files, and two rules for the whole run: every test starts from the
same random state whatever ran before it, and a skipped test fails the run."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import compat_references
from helpers import CHECKPOINT_SIZE, CLASS_TO_IDX, force_fused_linears, make_birder_model, save_birder_checkpoints

# One thread per pytest-xdist worker on a 2-core machine: the tests' models are small, and two
# workers with two threads each spend a quarter of the run waiting on each other.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _same_random_state_in_any_order():
    """Tests run in any order (pytest-randomly shuffles them): each starts from the same seeds."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(params=["fused", "plain"])
def linear_kernels(request, monkeypatch):
    """Runs a test with the fast path's fused linears and with its plain ones, on any CPU
    (helpers.force_fused_linears); gives (which, the dtypes the fused kernels ran in)."""
    return request.param, force_fused_linears(monkeypatch, request.param == "fused")


@pytest.fixture(scope="session")
def birder_small():
    return make_birder_model("hieradet_small")


@pytest.fixture(scope="session")
def birder_d_small():
    return make_birder_model("hieradet_d_small")


@pytest.fixture(scope="session")
def birder_pair():
    """One set of perturbed weights in both birder layouts: 'small' (SAM2 windows) and 'd_small'.
    Where birder cannot be installed: what the current stack recorded (tests/compat_references.py)."""
    if os.environ.get(compat_references.ENV):
        return compat_references.recorded_pair()
    from birder.model_registry import registry

    d_small = make_birder_model("hieradet_d_small", len(CLASS_TO_IDX), CHECKPOINT_SIZE, seed=11)
    small = registry.net_factory("hieradet_small", len(CLASS_TO_IDX), size=(CHECKPOINT_SIZE,) * 2).eval()
    small.load_state_dict(d_small.state_dict())
    return {"small": small, "d_small": d_small}


@pytest.fixture(scope="session")
def birder_files(birder_pair, tmp_path_factory):
    """birder .pt and .safetensors of the birder_pair weights, named as birder names them."""
    if os.environ.get(compat_references.ENV):
        return compat_references.recorded_files()
    from birder.data.transforms.classification import get_rgb_stats

    directory = tmp_path_factory.mktemp("birder_models")
    files = save_birder_checkpoints(birder_pair["d_small"], "hieradet_d_small_test", directory,
                                    get_rgb_stats("birder"))
    return dict(files, rgb_stats=get_rgb_stats("birder"), directory=directory)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """torch's hub cache in a temporary folder; afterwards exactly as before (``set_dir`` with
    the old ``get_dir()`` would pin the default path and hide TORCH_HOME from later tests)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def _skipped(config) -> int:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return len(reporter.stats.get("skipped", [])) if reporter else 0


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is not a passing one: the run fails if anything was skipped."""
    if _skipped(session.config) and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _skipped(config):
        terminalreporter.write_line(f"FAILED: {_skipped(config)} test(s) skipped; every test must run here.", red=True)
    seed = config.getoption("randomly_seed", default=None)
    if seed is not None and config.getoption("randomly_reorganize", default=True):
        terminalreporter.write_line(f"test order: random, repeat it with --randomly-seed={seed}")
