#!/usr/bin/env python
"""HieraDet on a GPU: correctness against birder, speed and memory, in one run of a few minutes.

Run it through ``tools/device_check.sh`` (which installs what the machine lacks first), or:

    python tools/device_check.py --out DIR [--deadline EPOCH] [--mmcv-build DIR] [--dry-run]

Parts, in this order; each is skipped (saying so) when it no longer fits before ``--deadline``,
and the JSON + Markdown are rewritten after each, so a run cut short keeps what it measured:

  machine   the GPU, torch, CUDA, which packages are there, the TF32 settings
  peaks     bf16 and fp32 matmul TFLOP/s measured here: the ceilings for "achieved" below
  checks    on the device, HieraDet-S and birder with the same weights: outputs and gradients in
            fp32 against a float64 run (ours may be off by no more than 4x birder's own fp32
            error, plus 1e-6), ours against birder in float64 (1e-10); bf16 and fp16 autocast
            error against fp32, next to birder's; with_cp (stochastic depth on) gradients against
            the same step without it, within the device's own run-to-run difference; the fast
            path's plumbing (no oneDNN linears, index plans keyed by and living on the device)
  flops     FLOPs of every timed step, counted on PyTorch's meta device (no device time)
  timings   backbone forward and forward+backward at 1024x1024, batch 8, bf16 autocast and
            fp32 (PyTorch's default TF32 settings), 'small' and 'd_small': ours (fast path), ours
            with with_cp (forward+backward), birder, and ours' reference path, the models
            interleaved over two rounds; CUDA events around each step after warm-up, median;
            achieved TFLOP/s against the measured matmul peak; peak memory above the weights
  new_size  what the first step at a new input size costs (the per-size index plan)
  detector  Mask R-CNN + FPN train step (forward, losses, backward, AdamW) at 1024x1024, batch 8,
            whole detector under bf16 autocast: HieraDet-S against Swin-T; and two steps of
            what ``tools/train.py --amp`` picks here. Needs mmengine, mmdet and mmcv with ops
            (CUDA ops on a GPU: waits for the background build of --mmcv-build)

``--dry-run`` runs the same code on the CPU at tiny sizes, so that the test suite keeps it
working; its times and memory are not measurements. Exit status 1 if a check failed or a part
broke, else 0.
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from hieradet_mmdet.models import HieraDet  # noqa: E402
from hieradet_mmdet.weights.convert import CLASSIFIER_PREFIXES, birder_to_ours  # noqa: E402

ARCHS = ("small", "d_small")
SEED = 0
# An 8192^3 bf16 matmul measured on the H200 machines this check was written for; the run measures
# its own machine's peak too and uses that.
REFERENCE_BF16_TFLOPS = 790.0
GIB = 2 ** 30
PARTS = ("peaks", "checks", "flops", "timings", "new_size", "detector")  # after "machine", in this order


@dataclass(frozen=True)
class Profile:
    device: str
    check_shape: tuple       # (B, C, H, W) of the correctness checks
    bench_shape: tuple       # of the backbone timings
    warmup: int
    iters: int               # timed steps per model and round
    rounds: int              # models interleaved, round after round
    matmul_n: int
    det_batch: int
    det_size: tuple
    det_warmup: int
    det_iters: int
    part_s: dict             # rough seconds a part needs; a part is skipped when less is left
    archs: tuple = ARCHS
    dtypes: tuple = ("bf16", "fp32")  # of the timings
    plan_sizes: tuple = ((800, 1344), (1024, 1024))
    few_proposals: bool = False  # fewer RPN proposals and RoI samples (the dry run's detector step)
    narrow_detectors: bool = False  # narrow backbones and heads (the dry run: code paths, not measurements)


GPU = Profile("cuda", (2, 3, 512, 768), (8, 3, 1024, 1024), warmup=3, iters=10, rounds=2, matmul_n=8192,
              det_batch=8, det_size=(1024, 1024), det_warmup=2, det_iters=5,
              part_s=dict(checks=60, timing_block=25, new_size=10, detector=30))
# The dry run takes every code path the GPU run takes, once: one arch, one dtype, tiny sizes.
DRY_RUN = Profile("cpu", (1, 3, 64, 96), (1, 3, 64, 64), warmup=1, iters=1, rounds=2, matmul_n=128,
                  det_batch=1, det_size=(64, 96), det_warmup=1, det_iters=1,
                  part_s=dict(checks=1, timing_block=1, new_size=1, detector=1),
                  archs=("small",), dtypes=("fp32",), plan_sizes=((64, 64),), few_proposals=True,
                  narrow_detectors=True)


# ---- numbers ----------------------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@contextlib.contextmanager
def strict_fp32():
    """float32 matmuls and convolutions without TF32 (correctness checks compare true fp32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast(device: str, dtype: str):
    if dtype in ("fp32", "fp64"):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], n: int, device: str) -> list[float]:
    """Milliseconds of each of ``n`` calls: CUDA events around each on a GPU, else the host clock."""
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# ---- models -----------------------------------------------------------------------------------

class _Unavailable:
    """What a stand-in module hands out: fine as an annotation, an error when used."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("polars is not installed here (the device check stands in for it only so that "
                           "birder imports; nothing here makes birder's result tables)")


def _stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable

    module.__getattr__ = __getattr__
    return module


def birder_registry():
    """birder's model registry. birder imports polars for its result tables at import time; the
    GPU machine has no polars (a 54 MB wheel), so an absent polars is replaced by a stand-in."""
    try:
        import polars  # noqa: F401
    except ImportError:
        sys.modules["polars"] = _stand_in_module("polars")
    from birder.model_registry import registry

    return registry


def make_pair(arch: str, size: tuple, seed: int = SEED):
    """(ours, birder's) HieraDet with the same seeded, perturbed weights, on the CPU, in eval mode."""
    registry = birder_registry()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = registry.net_factory(f"hieradet_{arch}", 10, size=tuple(size))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    ours = HieraDet(arch)
    state = birder_to_ours(ref.state_dict())
    ours.load_state_dict({k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)})
    return ours.eval(), ref.eval()


def birder_forward(model):
    return lambda x: list(model.detection_features(x).values())


def ours_forward(model):
    return lambda x: list(model(x))


def params_by_our_names(ours, ref) -> tuple[dict, dict]:
    """Our parameters and birder's, both under our names, in the same order."""
    mine = dict(ours.named_parameters())
    theirs = birder_to_ours(dict(ref.named_parameters()))
    return mine, {k: theirs[k] for k in mine}


def outputs_and_grads(forward, params: dict, x: torch.Tensor, dtype: str = "fp32"):
    """Outputs, and the gradients (input and parameters) of a fixed sign-changing weighting of them."""
    x = x.clone().requires_grad_()
    with autocast(x.device.type, dtype):
        outs = forward(x)
    weights = [torch.linspace(-1, 1, o.numel(), dtype=torch.float32, device=o.device).view(o.shape).to(o.dtype)
               for o in outs]
    loss = sum((o * w).float().sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, [x, *params.values()])
    return [o.detach() for o in outs], dict(zip(["input", *params], grads))


# ---- parts ------------------------------------------------------------------------------------

def part_machine(ctx) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), host=platform.node(),
        python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
        cpu_count=os.cpu_count(), device=ctx.device,
        packages={name: pkg(name) for name in ("birder", "mmengine", "mmcv", "mmdet", "numpy", "setuptools")},
        tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32))
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = dict(name=props.name, capability=f"{props.major}.{props.minor}",
                           multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / GIB, 1))
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def part_peaks(ctx) -> dict:
    """Matmul throughput here: bf16, and fp32 without TF32 (10 timed products after 3)."""
    n, dev = ctx.profile.matmul_n, ctx.device
    out = {}
    gen = torch.Generator(device=dev).manual_seed(SEED)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        with strict_fp32():
            for _ in range(3):
                a @ b
            sync(dev)
            times = time_steps(lambda: a @ b, 10, dev)
        out[f"{name}_tflops"] = 2 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12
        del a, b
    out["matmul_n"] = n
    out["reference_bf16_tflops"] = REFERENCE_BF16_TFLOPS
    return out


def part_checks(ctx) -> dict:
    """Correctness on the device; every row has a bound and ok."""
    rows = []
    dev, shape = ctx.device, ctx.profile.check_shape
    for arch in ctx.profile.archs:
        ctx.need("checks")
        ours, ref = make_pair(arch, shape[2:])
        ours, ref = ours.to(dev), ref.to(dev)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dev)
        rows += _check_parity(arch, ours, ref, x)
        rows += _check_autocast(arch, ours, ref, x)
        rows += _check_with_cp(arch, ours, x)
        rows += _check_plumbing(arch, ours, x)
        del ours, ref
        ctx.free()
    return {"rows": rows, "all_ok": all(r["ok"] for r in rows)}


def _row(name, arch, value, bound, ok, **extra) -> dict:
    return dict(name=name, arch=arch, value=value, bound=bound, ok=bool(ok), **extra)


def _check_parity(arch, ours, ref, x) -> list[dict]:
    """The truth is birder's model in float64. Ours in float64 must be it to float64 rounding;
    ours in fp32 may be off it by no more than a few times birder's own fp32 computation."""
    rows = []
    with strict_fp32():
        mine, theirs = params_by_our_names(ours, ref)
        outs, grads = outputs_and_grads(ours_forward(ours), mine, x)
        ref_outs, ref_grads = outputs_and_grads(birder_forward(ref), theirs, x)
    ours64, ref64 = copy.deepcopy(ours).double(), copy.deepcopy(ref).double()
    mine64, theirs64 = params_by_our_names(ours64, ref64)
    outs64, grads64 = outputs_and_grads(ours_forward(ours64), mine64, x.double())
    truth, truth_grads = outputs_and_grads(birder_forward(ref64), theirs64, x.double())
    del ours64, ref64

    err64 = max(rel_err(a, b) for a, b in zip(outs64, truth))
    rows.append(_row("float64 outputs, ours vs birder", arch, err64, 1e-10, err64 <= 1e-10))
    gerr64, gname64 = max((rel_err(grads64[k], truth_grads[k]), k) for k in truth_grads)
    rows.append(_row("float64 gradients, ours vs birder (worst)", arch, gerr64, 1e-9, gerr64 <= 1e-9, worst=gname64))

    direct = max(rel_err(a, b) for a, b in zip(outs, ref_outs))
    ours_e = max(rel_err(a, t) for a, t in zip(outs, truth))
    ref_e = max(rel_err(a, t) for a, t in zip(ref_outs, truth))
    bound = 4 * ref_e + 1e-6
    rows.append(_row("fp32 outputs vs birder's float64 (ours; bound 4x birder's fp32 + 1e-6)", arch, ours_e, bound,
                     ours_e <= bound and finite(outs), birder=ref_e, ours_vs_birder=direct))
    worst = None
    for name, exact in truth_grads.items():
        noise = rel_err(ref_grads[name], exact)
        err = rel_err(grads[name], exact)
        slack = (4 * noise + 1e-6) - err
        if worst is None or slack < worst[0]:
            worst = (slack, name, err, noise)
    _, name, err, noise = worst
    rows.append(_row("fp32 gradients vs birder's float64 (tightest; bound 4x birder's fp32 + 1e-6)", arch, err,
                     4 * noise + 1e-6, err <= 4 * noise + 1e-6 and finite(grads.values()), birder=noise, worst=name))
    return rows


def _check_autocast(arch, ours, ref, x) -> list[dict]:
    """Per stage: ours under autocast against ours in fp32, next to birder's same error, and the
    dtypes of the stage maps (where the residual stream turns low-precision) equal to birder's."""
    rows = []
    dev = x.device.type
    with torch.no_grad(), strict_fp32():
        exact = ours_forward(ours)(x)
        ref_exact = birder_forward(ref)(x)
        for dtype in ("bf16", "fp16"):
            with autocast(dev, dtype):
                low = ours_forward(ours)(x)
                ref_low = birder_forward(ref)(x)
            stages = []
            for a, b, c, d in zip(low, exact, ref_low, ref_exact):
                err, ref_err = norm_err(a, b), norm_err(c, d)
                stages.append((err / min(5e-2, max(1.5 * ref_err, ref_err + 2e-3)), err, ref_err))
            _, err, ref_err = max(stages)
            bound = min(5e-2, max(1.5 * ref_err, ref_err + 2e-3))
            dtypes = [str(o.dtype).replace("torch.", "") for o in low]
            ref_dtypes = [str(o.dtype).replace("torch.", "") for o in ref_low]
            rows.append(_row(f"{dtype} autocast outputs vs fp32 (tightest stage; bound max(1.5x, +2e-3) birder's, "
                             "<= 5e-2; stage dtypes as birder's)", arch, err, bound,
                             all(e <= min(5e-2, max(1.5 * r, r + 2e-3)) for _, e, r in stages) and finite(low)
                             and dtypes == ref_dtypes, birder=ref_err, dtypes=dtypes, birder_dtypes=ref_dtypes,
                             stage_errors=[e for _, e, _ in stages]))
    return rows


def _check_with_cp(arch, ours, x) -> list[dict]:
    """with_cp must give the gradients of the same step without it, stochastic depth included
    (checkpointing replays the random state). On a GPU two runs of the same step may differ in
    the last bits (atomics in some backward kernels): that difference, measured, is the bound."""
    rows = []
    dev = x.device.type
    model = copy.deepcopy(ours)
    for block in model.blocks:
        block.drop_path_rate = 0.1
    model.train()
    params = dict(model.named_parameters())
    for dtype in ("fp32", "bf16"):
        runs = []
        for with_cp in (False, False, True):
            model.with_cp = with_cp
            torch.manual_seed(SEED)
            with strict_fp32():
                runs.append(outputs_and_grads(ours_forward(model), params, x, dtype))
        (base, gbase), (again, gagain), (cp, gcp) = runs
        noise = max([rel_err(a, b) for a, b in zip(again, base)] + [rel_err(gagain[k], gbase[k]) for k in gbase])
        diff = max([rel_err(a, b) for a, b in zip(cp, base)] + [rel_err(gcp[k], gbase[k]) for k in gbase])
        bound = max(4 * noise, 1e-6)
        identical = all(torch.equal(a, b) for a, b in zip(cp, base)) and all(torch.equal(gcp[k], gbase[k]) for k in gbase)
        rows.append(_row(f"with_cp outputs and gradients vs without ({dtype}, drop_path on; bound 4x run-to-run)",
                         arch, diff, bound, (identical or diff <= bound) and finite(gcp.values()),
                         run_to_run=noise, bitwise_identical=identical))
    model.with_cp = False
    return rows


def _check_plumbing(arch, ours, x) -> list[dict]:
    """The fast path on this device: which linears it takes, where its index plans live."""
    from hieradet_mmdet.models.fused_linear import fused_dtype

    dev = x.device
    with torch.no_grad():
        ours(x)
        fused = fused_dtype(x)
    h, w = x.shape[2] // 4, x.shape[3] // 4
    key = (h, w, str(dev))
    rows = []
    if dev.type != "cpu":
        rows.append(_row("fast path takes plain linears (no oneDNN) on this device", arch, str(fused), "None",
                         fused is None))
    plan = ours.plans.get(ours.blocks, h, w, dev) if key in ours.plans else None
    devices = sorted({str(t.device) for t in plan_tensors(plan)}) if plan else []
    rows.append(_row("index plan cached under this device, its tensors on it", arch, devices, [str(dev)],
                     plan is not None and devices == [str(dev)], key=list(key)))
    return rows


def plan_tensors(plan):
    """Every index tensor of a plan (a list of BlockStep)."""
    seen = set()
    for step in plan:
        for part in (step.relayout, step.to_windows, step.from_windows, step.to_rows):
            if part is not None:
                yield from (t for t in (part.index, part.back, part.zero_mask) if t is not None)
        for layout in (step.layout, step.after, step.windows):
            if layout is not None and id(layout) not in seen:
                seen.add(id(layout))
                yield from (t for t in (layout.src, layout.inv, layout.pad_mask) if t is not None)


def part_flops(ctx) -> dict:
    """FLOPs of one step (a multiply-add is 2) of every timed model, counted on the meta device."""
    from benchmarks.flops import count_flops

    out = {}
    shape = ctx.profile.bench_shape
    for arch in ctx.profile.archs:
        ours, ref = make_pair(arch, shape[2:])
        for name, model, forward in (("ours", ours, ours_forward), ("birder", ref, birder_forward)):
            model = model.to("meta")
            fwd = forward(model)
            x = torch.empty(*shape, device="meta")

            def forward_only():
                with torch.no_grad():
                    fwd(x)

            def forward_backward():
                sum(o.float().pow(2).mean() for o in fwd(x)).backward()

            out[f"{arch}/{name}/forward"] = count_flops(forward_only)
            out[f"{arch}/{name}/forward+backward"] = count_flops(forward_backward)
    return out


def part_timings(ctx) -> dict:
    """Backbone steps of ours and birder's, interleaved round after round."""
    prof, dev = ctx.profile, ctx.device
    rows = []
    building = [ctx.building()]
    for arch in prof.archs:
        ours, ref = make_pair(arch, prof.bench_shape[2:])
        ours, ref = ours.to(dev), ref.to(dev)
        x = torch.randn(*prof.bench_shape, generator=torch.Generator().manual_seed(2)).to(dev)
        with torch.no_grad(), strict_fp32():  # at equal outputs: ours against birder's at this size
            diff = max(rel_err(a, b) for a, b in zip(ours_forward(ours)(x), birder_forward(ref)(x)))
        for dtype in prof.dtypes:
            for mode in ("forward", "forward+backward"):
                if not ctx.fits("timing_block"):
                    rows.append(dict(arch=arch, dtype=dtype, mode=mode, status="skipped: out of time"))
                    continue
                variants = _variants(ours, ref, mode)
                rows += _time_variants(ctx, arch, dtype, mode, variants, x, diff)
        del ours, ref, x
        ctx.free()
    building.append(ctx.building())
    return {"rows": rows, "mmcv_build_running": building}  # at the start and at the end


def _variants(ours, ref, mode):
    """name -> (prepare, forward, parameters). Birder's models come with stochastic depth, so they
    are timed in eval mode; ours has drop_path_rate 0, so train mode computes the same."""
    def ours_as(with_cp, fast_path):
        def prepare():
            ours.with_cp, ours.fast_path = with_cp, fast_path
            ours.train(mode != "forward")
        return prepare

    variants = {"ours": (ours_as(False, True), ours_forward(ours), list(ours.parameters())),
                "birder": (lambda: ref.eval(), birder_forward(ref), list(ref.parameters()))}
    if mode != "forward":
        variants["ours with_cp"] = (ours_as(True, True), ours_forward(ours), list(ours.parameters()))
    variants["ours reference path"] = (ours_as(False, False), ours_forward(ours), list(ours.parameters()))
    return variants


def _time_variants(ctx, arch, dtype, mode, variants, x, diff) -> list[dict]:
    prof, dev = ctx.profile, ctx.device
    results = {name: dict(times=[], round_medians=[]) for name in variants}
    for rnd in range(prof.rounds):
        for name, (prepare, forward, params) in variants.items():
            prepare()
            step = _step(forward, params, x, dtype, mode, dev)
            for _ in range(prof.warmup):
                step()
            sync(dev)
            if rnd == 0:
                ctx.free()
                base = torch.cuda.memory_allocated() if dev == "cuda" else 0
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            times = time_steps(step, prof.iters, dev)
            if rnd == 0 and dev == "cuda":
                results[name]["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
                results[name]["peak_above_start_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
            results[name]["times"] += times
            results[name]["round_medians"].append(statistics.median(times))
    ours_ms = statistics.median(results["ours"]["times"])
    rows = []
    for name, r in results.items():
        median = statistics.median(r["times"])
        # the reference path computes what birder computes (pad tokens included); with_cp's
        # recomputation is extra work, not useful FLOPs, so its TFLOP/s are those of ours
        counted = "ours" if name.startswith("ours") and name != "ours reference path" else "birder"
        flops = ctx.flops.get(f"{arch}/{counted}/{mode}")
        spread = (max(r["round_medians"]) - min(r["round_medians"])) / median if median else None
        rows.append(dict(arch=arch, dtype=dtype, mode=mode, model=name, status="ok", median_ms=median,
                         round_medians_ms=r["round_medians"], spread=spread, iters=len(r["times"]),
                         vs_ours=median / ours_ms, tflops=flops / (median * 1e-3) / 1e12 if flops else None,
                         peak_gib=r.get("peak_gib"), peak_above_start_gib=r.get("peak_above_start_gib"),
                         fp32_rel_diff_vs_birder=diff if name == "ours" else None))
    return rows


def _step(forward, params, x, dtype, mode, dev):
    if mode == "forward":
        def step():
            with torch.no_grad(), autocast(dev, dtype):
                forward(x)
        return step

    def step():
        with autocast(dev, dtype):
            loss = sum(o.float().pow(2).mean() for o in forward(x))
        loss.backward()
        for p in params:
            p.grad = None
    return step


def part_new_size(ctx) -> dict:
    """The per-size index plan: its build time on this CPU, and the first forward at a new size
    against the next ones (the multi-scale training case)."""
    from hieradet_mmdet.models.token_layout import build_plan

    prof, dev = ctx.profile, ctx.device
    b, c, h, w = prof.bench_shape
    model = HieraDet("small").to(dev).eval()
    out = {}
    for hw in prof.plan_sizes:
        t0 = time.perf_counter()
        build_plan(model.blocks, hw[0] // 4, hw[1] // 4)
        out[f"plan_build_ms_{hw[0]}x{hw[1]}"] = (time.perf_counter() - t0) * 1e3
    new_h, new_w = h - 32, w + 32  # a size this process has not seen
    x = torch.randn(b, c, new_h, new_w, device=dev)
    with torch.no_grad(), autocast(dev, "bf16"):
        first = time_steps(lambda: model(x), 1, dev)[0]
        later = statistics.median(time_steps(lambda: model(x), 5, dev))
    out.update(size=f"{new_h}x{new_w}", batch=b, first_forward_ms=first, next_forwards_ms=later,
               first_call_extra_ms=first - later, plans_cached=len(model.plans), plan_cache_size=model.plans.size)
    del model, x
    ctx.free()
    return out


def part_detector(ctx, mmcv_build: Optional[str]) -> dict:
    prof, dev = ctx.profile, ctx.device
    out: dict[str, Any] = {}
    if mmcv_build:
        out["mmcv_build"] = _wait_for_mmcv(ctx, Path(mmcv_build))
        if out["mmcv_build"]["status"] != "ok":
            return dict(out, status=f"skipped: mmcv with CUDA ops not built ({out['mmcv_build']['status']})")
        sys.path.insert(0, str(Path(mmcv_build) / "src"))
    try:
        import mmcv
        import mmcv.ops
        import mmdet  # noqa: F401
        from mmengine.config import Config  # noqa: F401
    except Exception as err:  # ImportError, or mmcv's own version checks
        return dict(out, status=f"skipped: {type(err).__name__}: {err}")
    cuda_ops = mmcv.ops.get_compiling_cuda_version()
    out.update(mmcv=mmcv.__version__, mmcv_cuda_ops=cuda_ops)
    if dev == "cuda" and cuda_ops == "not available":
        return dict(out, status="skipped: mmcv's ops were compiled without CUDA")
    ctx.need("detector")

    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    import hieradet_mmdet.engine  # noqa: F401  (registers the wrappers, after mmcv became importable)
    import hieradet_mmdet.models.backbone  # noqa: F401  (registers type='HieraDet')

    rows = []
    for name in ("hieradet_small", "swin_t"):
        if not ctx.fits("detector"):
            rows.append(dict(model=name, status="skipped: out of time"))
            continue
        rows.append(_detector_step(ctx, name))
        ctx.free()
    out["rows"] = rows
    out["amp"] = _amp_steps(ctx) if ctx.fits("detector") else {"status": "skipped: out of time"}
    ctx.free()
    out["status"] = "ok"
    return out


def _wait_for_mmcv(ctx, build: Path) -> dict:
    """Wait for the background build (tools/device_check.sh) until the detector part would no
    longer fit; stop it then."""
    t0 = time.time()
    latest_need = ctx.profile.part_s["detector"] * 2.5  # two detectors and the --amp steps
    while not (build / "status").exists() and ctx.left() > latest_need:
        time.sleep(2)
    progress = _build_progress(build / "build.log")
    if not (build / "status").exists():
        try:
            os.killpg(int((build / "pgid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        return dict(status=f"not finished in time ({progress})", waited_s=time.time() - t0, progress=progress)
    rc = (build / "status").read_text().strip()
    if rc != "0":
        tail = (build / "build.log").read_text(errors="replace")[-3000:] if (build / "build.log").exists() else ""
        return dict(status=f"build failed (exit {rc}; {progress})", waited_s=time.time() - t0, log_tail=tail)
    return dict(status="ok", waited_s=time.time() - t0, progress=progress)


def _build_progress(log: Path) -> str:
    import re

    text = log.read_text(errors="replace") if log.exists() else ""
    steps = re.findall(r"^\[(\d+)/(\d+)\]", text, flags=re.M)
    return f"{steps[-1][0]} of {steps[-1][1]} compiled" if steps else "nothing compiled yet"


def _detector_model(name: str, few_proposals: bool = False, narrow: bool = False):
    from mmengine.config import Config
    from mmdet.registry import MODELS

    if name == "hieradet_small":
        cfg = Config.fromfile(str(ROOT / "configs" / "maskrcnn_hieradet_s.py"))
    else:
        import mmdet

        cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / "swin" /
                                  "mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"))
    cfg.model.backbone.init_cfg = None  # random weights: no download, same cost
    if few_proposals:
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
        cfg.model.train_cfg.rcnn.sampler.num = 64
    if narrow:
        from benchmarks.cases import narrow_detector_config

        narrow_detector_config(cfg)
    torch.manual_seed(SEED)
    return MODELS.build(cfg.model), cfg


def _detector_batch(ctx, model):
    from mmdet.testing import demo_mm_inputs

    prof = ctx.profile
    packed = demo_mm_inputs(batch_size=prof.det_batch, image_shapes=[(3, *prof.det_size)] * prof.det_batch,
                            num_items=[8] * prof.det_batch, num_classes=80, with_mask=True)
    data = model.data_preprocessor(packed, True)
    return data["inputs"], data["data_samples"]


def _detector_step(ctx, name: str) -> dict:
    """Forward, losses, backward and AdamW step under bf16 autocast over the whole detector, as
    AutocastOptimWrapper runs it (mmcv's RoIAlign has no bf16 kernel: it gets fp32 maps)."""
    from hieradet_mmdet.engine.amp import autocast_detector

    prof, dev = ctx.profile, ctx.device
    model, _ = _detector_model(name, prof.few_proposals, prof.narrow_detectors)
    model = model.to(dev).train()
    inputs, samples = _detector_batch(ctx, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    losses_seen = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_detector(model, torch.bfloat16):
            loss, _ = model.parse_losses(model(inputs, samples, mode="loss"))
        loss.backward()
        optimizer.step()
        losses_seen.append(loss.detach())

    for _ in range(prof.det_warmup):
        step()
    sync(dev)
    ctx.free()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, prof.det_iters, dev)
    median = statistics.median(times)
    row = dict(model=name, status="ok", batch=prof.det_batch, size=list(prof.det_size), median_ms=median,
               times_ms=times, images_per_s=prof.det_batch / (median * 1e-3),
               peak_gib=torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else None,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               losses_finite=finite(losses_seen))
    del model, optimizer, inputs, samples
    return row


def _amp_steps(ctx) -> dict:
    """Two steps with what ``tools/train.py --amp`` picks on this machine (on a GPU MMEngine's
    AmpOptimWrapper: fp16 autocast over the whole model, dynamic loss scaling)."""
    from mmengine.optim import build_optim_wrapper

    from hieradet_mmdet.engine.amp import use_mixed_precision

    dev = ctx.device
    model, cfg = _detector_model("hieradet_small", ctx.profile.few_proposals, ctx.profile.narrow_detectors)
    model = model.to(dev).train()
    inputs, samples = _detector_batch(ctx, model)
    wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
    message = use_mixed_precision(wrapper_cfg, torch.cuda.is_available())
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    dtypes, losses = [], []
    hook = model.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype)))
    for _ in range(2):
        with wrapper.optim_context(model):
            loss, _ = model.parse_losses(model(inputs, samples, mode="loss"))
        wrapper.update_params(loss)
        losses.append(loss.detach())
    hook.remove()
    scaler = getattr(wrapper, "loss_scaler", None)
    if dev == "cpu":  # what the CPU choice was made from (hieradet_mmdet.engine.amp)
        from hieradet_mmdet.engine.amp import FAST_BF16, bf16_speedup

        speed = dict(bf16_speedup=bf16_speedup("cpu"), fast_bf16=FAST_BF16)
    else:
        speed = {}
    out = dict(status="ok", message=message, wrapper=type(wrapper).__name__, backbone_dtype=sorted(set(dtypes)),
               **speed,
               losses=[float(v) for v in losses], losses_finite=finite(losses),
               loss_scale=float(scaler.get_scale()) if scaler is not None else None)
    del model, wrapper, inputs, samples
    return out


# ---- running the parts, writing the report ---------------------------------------------------

class OutOfTime(Exception):
    pass


class Context:
    def __init__(self, profile: Profile, deadline: float, mmcv_build: Optional[str] = None) -> None:
        self.profile, self.device, self.deadline = profile, profile.device, deadline
        self.mmcv_build = Path(mmcv_build) if mmcv_build else None
        self.flops: dict[str, int] = {}

    def building(self) -> bool:
        """Whether the background mmcv build is compiling (on the CPU, niced) right now."""
        return self.mmcv_build is not None and not (self.mmcv_build / "status").exists()

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, part: str) -> bool:
        return self.left() >= self.profile.part_s[part]

    def need(self, part: str) -> None:
        if not self.fits(part):
            raise OutOfTime(f"out of time ({self.left():.0f} s left, {part} needs ~{self.profile.part_s[part]} s)")

    def free(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


class Report:
    def __init__(self, out_dir: Path, dry_run: bool) -> None:
        self.out_dir = out_dir
        self.data: dict[str, Any] = {"mode": "dry-run (CPU, tiny sizes: times are not measurements)" if dry_run
                                     else "gpu", "parts": {}}

    def run(self, name: str, fn: Callable[[], dict]) -> Optional[dict]:
        t0 = time.time()
        print(f"[device-check] {name} ...", flush=True)
        try:
            result, status = fn(), "ok"
            if isinstance(result, dict) and str(result.get("status", "")).startswith("skipped"):
                status = result["status"]
        except OutOfTime as why:
            result, status = None, f"skipped: {why}"
        except Exception as err:  # one broken part must not cost the others
            result, status = {"traceback": traceback.format_exc()[-4000:]}, f"error: {type(err).__name__}: {err}"
        self.data["parts"][name] = dict(status=status, seconds=round(time.time() - t0, 1), result=result)
        print(f"[device-check] {name}: {status} ({time.time() - t0:.0f} s)", flush=True)
        self.write()
        return result if status == "ok" else None

    def failed(self) -> list[str]:
        bad = [f"{n}: {p['status']}" for n, p in self.data["parts"].items() if p["status"].startswith("error")]
        checks = (self.data["parts"].get("checks") or {}).get("result") or {}
        bad += [f"check failed: {r['arch']} {r['name']} ({_fmt(r['value'])} > {_fmt(r['bound'])})"
                for r in checks.get("rows", []) if not r["ok"]]
        return bad

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "device_check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (self.out_dir / "device_check.md").write_text(markdown(self.data) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.4g}"
        return f"{v:.2e}"
    return str(v)


def _result(data, part) -> dict:
    return (data["parts"].get(part) or {}).get("result") or {}


def markdown(data: dict) -> str:
    m = _result(data, "machine")
    peaks = _result(data, "peaks")
    gpu = m.get("gpu") or {}
    lines = [f"# HieraDet device check: {gpu.get('name') or 'CPU dry run'}, {m.get('date', '?')}", ""]
    if data["mode"] != "gpu":
        lines += [f"**{data['mode']}**", ""]
    lines.append(f"torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), Python {m.get('python')}, "
                 f"{m.get('cpu_count')} CPU cores; TF32 matmul {m.get('tf32', {}).get('matmul')}, "
                 f"cuDNN {m.get('tf32', {}).get('cudnn')} (PyTorch defaults, used for the fp32 timings)")
    if peaks:
        lines.append(f"Matmul peak measured here ({peaks['matmul_n']}^3): bf16 {peaks['bf16_tflops']:.0f} TFLOP/s, "
                     f"fp32 without TF32 {peaks['fp32_tflops']:.1f} TFLOP/s")
    lines += ["", "## Checks", "", "| check | arch | value | bound | ok |", "| --- | --- | --- | --- | --- |"]
    for r in _result(data, "checks").get("rows", []):
        extra = f" (birder {_fmt(r['birder'])})" if "birder" in r else ""
        lines.append(f"| {r['name']} | {r['arch']} | {_fmt(r['value'])}{extra} | {_fmt(r['bound'])} | "
                     f"{'yes' if r['ok'] else '**NO**'} |")
    timings = [r for r in _result(data, "timings").get("rows", []) if r.get("status") == "ok"]
    if timings:
        peak = {"bf16": peaks.get("bf16_tflops"), "fp32": peaks.get("fp32_tflops")}
        first = timings[0]
        busy = any(_result(data, "timings").get("mmcv_build_running") or [])
        lines += ["", f"## Backbone steps (median ms of {first['iters']} steps over {len(first['round_medians_ms'])} "
                  "interleaved rounds)", ""]
        if busy:
            lines += ["The mmcv build was compiling on the CPU (niced) during these steps.", ""]
        lines += [
                  "| arch | dtype | step | model | ms | ms / ours | round spread | TFLOP/s | % of matmul peak | "
                  "peak GiB above weights |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in timings:
            pct = 100 * r["tflops"] / peak[r["dtype"]] if r.get("tflops") and peak.get(r["dtype"]) else None
            lines.append(f"| {r['arch']} | {r['dtype']} | {r['mode']} | {r['model']} | {r['median_ms']:.1f} | "
                         f"{r['vs_ours']:.3f} | {_pct(r['spread'])} | {_fmt(r['tflops']) if r['tflops'] else '-'} | "
                         f"{f'{pct:.1f}' if pct is not None else '-'} | "
                         f"{_fmt(r['peak_above_start_gib']) if r.get('peak_above_start_gib') is not None else '-'} |")
    lines += _summary_lines(data, timings)
    new = _result(data, "new_size")
    if new:
        lines += ["", "## A new input size", "",
                  f"Plan build on this CPU: " + ", ".join(f"{k[len('plan_build_ms_'):]} {v:.0f} ms" for k, v in new.items()
                                                          if k.startswith("plan_build_ms_")) +
                  f"; first bf16 forward at {new['size']} (batch {new['batch']}) {new['first_forward_ms']:.1f} ms, "
                  f"the next ones {new['next_forwards_ms']:.1f} ms (plan cache holds {new['plan_cache_size']} sizes)."]
    det = _result(data, "detector") or {}
    det_part = data["parts"].get("detector") or {}
    lines += ["", "## Mask R-CNN train step (whole detector under bf16 autocast, AdamW)", ""]
    if det.get("rows"):
        lines += ["| detector | batch x size | ms / step | images / s | peak GiB | losses finite |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in det["rows"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['model']} | {r['status']} | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['batch']} x {r['size'][0]}x{r['size'][1]} | {r['median_ms']:.0f} | "
                         f"{r['images_per_s']:.1f} | {_fmt(r['peak_gib']) if r['peak_gib'] else '-'} | "
                         f"{r['losses_finite']} |")
        amp = det.get("amp") or {}
        if amp.get("status") == "ok":
            lines += ["", f"`--amp` here: {amp['wrapper']} ({amp['message']}); backbone ran in {amp['backbone_dtype']}, "
                      f"losses {', '.join(f'{v:.3f}' for v in amp['losses'])}, loss scale {amp['loss_scale']}."]
    else:
        lines.append(f"Not run: {det_part.get('status', 'not reached')}")
    build = det.get("mmcv_build")
    if build:
        lines.append(f"mmcv CUDA build: {build['status']} (waited {build['waited_s']:.0f} s)")
    problems = [f"- {n}: {p['status']}" for n, p in data["parts"].items() if p["status"] != "ok"]
    if problems:
        lines += ["", "## Skipped or broken", ""] + problems
    return "\n".join(lines)


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "-"


def _summary_lines(data, timings) -> list[str]:
    if data["mode"] != "gpu" or not timings:
        return []
    lines = ["", "## Against birder, memory, throughput", ""]
    by = {(r["arch"], r["dtype"], r["mode"], r["model"]): r for r in timings}
    for (arch, dtype, mode, model), r in sorted(by.items()):
        if model != "birder" or (arch, dtype, mode, "ours") not in by:
            continue
        ours = by[(arch, dtype, mode, "ours")]
        ratio = r["median_ms"] / ours["median_ms"]
        lines.append(f"- {arch} {dtype} {mode}: birder / ours = {ratio:.3f} "
                     f"({'ours not slower' if ratio >= 1 else 'ours SLOWER'}; round spread {_pct(ours['spread'])})")
    for (arch, dtype, mode, model), r in sorted(by.items()):
        if model == "ours with_cp" and (arch, dtype, mode, "ours") in by:
            plain = by[(arch, dtype, mode, "ours")]
            if r.get("peak_above_start_gib") and plain.get("peak_above_start_gib"):
                ratio = r["peak_above_start_gib"] / plain["peak_above_start_gib"]
                lines.append(f"- {arch} {dtype} with_cp peak memory: {ratio:.2f}x of without "
                             f"({'<= 0.5' if ratio <= 0.5 else '> 0.5'}), time {r['vs_ours']:.2f}x")
    best = max((r for r in timings if r["model"] == "ours" and r.get("tflops")), key=lambda r: r["tflops"], default=None)
    if best:
        lines.append(f"- backbone achieved up to {best['tflops']:.0f} TFLOP/s ({best['arch']} {best['dtype']} "
                     f"{best['mode']})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "work_dirs" / "device_check")
    parser.add_argument("--deadline", type=float, help="Unix time by which to finish (default: 7 min from now)")
    parser.add_argument("--mmcv-build", help="folder of tools/device_check.sh's background mmcv build")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise the code, measure nothing")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)}); machine always runs")
    args = parser.parse_args(argv)
    wanted = {p.strip() for p in args.parts.split(",") if p.strip()}
    if wanted - set(PARTS):
        parser.error(f"unknown parts {sorted(wanted - set(PARTS))}; choose from {', '.join(PARTS)}")

    profile = DRY_RUN if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # tiny sizes: threads would only contend
    ctx = Context(profile, args.deadline or time.time() + 420, args.mmcv_build)
    report = Report(args.out, args.dry_run)
    torch.manual_seed(SEED)

    parts = dict(peaks=lambda: part_peaks(ctx), checks=lambda: part_checks(ctx), flops=lambda: part_flops(ctx),
                 timings=lambda: part_timings(ctx), new_size=lambda: part_new_size(ctx),
                 detector=lambda: part_detector(ctx, args.mmcv_build))
    report.run("machine", lambda: part_machine(ctx))
    for name in PARTS:
        if name in wanted:
            result = report.run(name, parts[name])
            if name == "flops":
                ctx.flops = result or {}

    print("\n" + markdown(report.data) + "\n", flush=True)
    failed = report.failed()
    for line in failed:
        print(f"[device-check] {line}", file=sys.stderr)
    print(f"[device-check] wrote {args.out / 'device_check.json'} and {args.out / 'device_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
