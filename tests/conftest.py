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


# --- Checkpoint files written by birder's own save functions (test_checkpoint / test_classifier) ---

CHECKPOINT_SIZE = 64  # the input size the classifier checkpoints are saved with (birder's signature)
CLASS_TO_IDX = {"Eurasian jay": 0, "Common chaffinch": 1, "Great tit": 2, "Eurasian wren": 3,
                "Hooded crow": 4, "White wagtail": 5, "Common kingfisher": 6}


def save_birder_checkpoints(model, network_name: str, directory, rgb_stats) -> dict:
    """Write ``model`` as birder does (``checkpoint_model`` .pt and ``save_st`` .safetensors)."""
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.net.base import get_signature

    signature = get_signature((1, 3, CHECKPOINT_SIZE, CHECKPOINT_SIZE), len(CLASS_TO_IDX))
    old_models_dir = settings.MODELS_DIR
    settings.MODELS_DIR = directory  # checkpoint_model always writes under birder's models dir
    try:
        fs_ops.checkpoint_model(network_name, 0, model, signature, CLASS_TO_IDX, rgb_stats,
                                None, None, None, None)
        pt = fs_ops.model_path(network_name, epoch=0)
    finally:
        settings.MODELS_DIR = old_models_dir
    safetensors = directory / f"{network_name}.safetensors"
    fs_ops.save_st(model, str(safetensors), model.task, CLASS_TO_IDX, signature, rgb_stats)
    return {"pt": pt, "safetensors": safetensors}


@pytest.fixture(scope="session")
def birder_pair():
    """One set of perturbed weights in both birder layouts: 'small' (SAM2 windows) and 'd_small'."""
    from birder.model_registry import registry

    d_small = make_birder_model("hieradet_d_small", len(CLASS_TO_IDX), CHECKPOINT_SIZE, seed=11)
    small = registry.net_factory("hieradet_small", len(CLASS_TO_IDX), size=(CHECKPOINT_SIZE,) * 2).eval()
    small.load_state_dict(d_small.state_dict())
    return {"small": small, "d_small": d_small}


@pytest.fixture(scope="session")
def birder_files(birder_pair, tmp_path_factory):
    """birder .pt and .safetensors of the birder_pair weights, named as birder names them."""
    from birder.data.transforms.classification import get_rgb_stats

    directory = tmp_path_factory.mktemp("birder_models")
    files = save_birder_checkpoints(birder_pair["d_small"], "hieradet_d_small_test", directory,
                                    get_rgb_stats("birder"))
    return dict(files, rgb_stats=get_rgb_stats("birder"), directory=directory)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """torch's hub cache in a temporary folder; afterwards exactly as before (``set_dir`` with
    the old ``get_dir()`` would pin the default path and hide TORCH_HOME from later tests)."""
    import torch

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
