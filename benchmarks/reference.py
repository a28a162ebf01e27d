"""What every comparison in this project is made with: relative errors in float64, device
synchronisation, autocast by dtype name, true fp32; and birder, the reference implementation of
HieraDet, with seeded, perturbed weights, alone or paired with ours.

Used by the tests and the measuring tools here (the ``--checks`` included), not by the plugin: birder
is a test dependency, imported only when asked for. ``rel_err`` is the export checks' own
(hieradet_mmdet.export.compare), the one definition every comparison uses.
"""

from __future__ import annotations

import contextlib

import torch

from hieradet_mmdet.export.compare import as_float64, rel_err  # noqa: F401  (the export checks' own)

SEED = 0
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---- numbers ----------------------------------------------------------------------------------

def norm_err(a, b) -> float:
    """||a - b|| / ||b||, in float64; tensors or arrays."""
    a = as_float64(a)
    b = as_float64(b, a.device)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def noise_bound(noise: float, factor: float = 4.0, floor: float = 1e-6) -> float:
    """How far an fp32 result may be from the float64 truth when the fp32 reference is ``noise``
    from it: a bound made from the reference's own rounding on the machine at hand."""
    return factor * noise + floor


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype: str):
    """torch.autocast for 'bf16' / 'fp16'; nothing for 'fp32' / 'fp64'."""
    if dtype in ("fp32", "fp64"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=LOW_PRECISION[dtype])


@contextlib.contextmanager
def strict_fp32():
    """float32 matmuls and convolutions without TF32 (correctness checks compare true fp32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---- birder, the reference --------------------------------------------------------------------

def birder_registry():
    """birder's model registry (birder imports only when asked for)."""
    from birder.model_registry import registry

    return registry


def birder_available() -> tuple[bool, str]:
    """(True, '') or (False, why birder cannot be imported here)."""
    try:
        birder_registry()
        return True, ""
    except Exception as err:  # ImportError or a broken install
        return False, f"birder not importable ({type(err).__name__}: {err})"


def make_birder(name: str = "hieradet_d_small", num_classes: int = 10, size=256, seed: int = SEED):
    """A birder network (``name`` as birder's registry spells it) in eval mode, with random weights
    moved away from their init (biases and norms too): initialised under ``seed`` and perturbed
    from a generator of the same seed, leaving the global random state as it was. ``size``: an
    int or (height, width)."""
    registry = birder_registry()
    size = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = registry.net_factory(name, num_classes, size=size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def ours_from_birder(birder_model, arch, **kwargs):
    """Our trunk (``HieraDet(arch, **kwargs)``, eval mode) with a birder model's weights."""
    from hieradet_mmdet.models import HieraDet
    from hieradet_mmdet.weights.convert import CLASSIFIER_PREFIXES, birder_to_ours

    model = HieraDet(arch, **kwargs).eval()
    state = birder_to_ours(birder_model.state_dict())
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}, strict=True)
    return model


def make_pair(arch: str, size, seed: int = SEED, **kwargs):
    """(ours, birder's) HieraDet ``arch`` with the same weights (make_birder's), on the CPU, in eval mode."""
    ref = make_birder(f"hieradet_{arch}", size=size, seed=seed)
    return ours_from_birder(ref, arch, **kwargs), ref


def birder_features(model, x) -> list[torch.Tensor]:
    """A birder HieraDet's four stage maps, as ours returns them."""
    return list(model.detection_features(x).values())
