"""The device check's Mask R-CNN part: waiting for the background mmcv build of
``tools/device_check.sh``, timed train steps of HieraDet-S and Swin-T under bf16 autocast, and two
steps with what ``tools/train.py --amp`` picks on the machine."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from hieradet_mmdet.reference import finite

from .cases import case_detector, detector_batch, detector_config, detector_step, narrow_detector_config
from .memory import GIB, PeakMemory
from .timing import time_steps, warm_up


def part_detector(ctx, mmcv_build: Optional[str]) -> dict:
    out: dict[str, Any] = {}
    if mmcv_build:
        out["mmcv_build"] = wait_for_mmcv(ctx, Path(mmcv_build))
        if out["mmcv_build"]["status"] != "ok":
            return dict(out, status=f"skipped: mmcv with CUDA ops not built ({out['mmcv_build']['status']})")
        sys.path.insert(0, str(Path(mmcv_build) / "src"))  # the in-place build of the sdist
    try:
        import mmcv
        import mmcv.ops
        import mmdet  # noqa: F401
        from mmengine.config import Config  # noqa: F401
    except Exception as err:  # ImportError, or mmcv's own version checks
        return dict(out, status=f"skipped: {type(err).__name__}: {err}")
    cuda_ops = mmcv.ops.get_compiling_cuda_version()
    out.update(mmcv=mmcv.__version__, mmcv_cuda_ops=cuda_ops)
    if ctx.device == "cuda" and cuda_ops == "not available":
        return dict(out, status="skipped: mmcv's ops were compiled without CUDA")
    ctx.need("detector")

    rows = []
    for name in ("hieradet_small", "swin_t"):
        if not ctx.fits("detector"):
            rows.append(dict(model=name, status="skipped: out of time"))
            continue
        rows.append(train_steps(ctx, name))
        ctx.free()
    out["rows"] = rows
    out["amp"] = amp_steps(ctx) if ctx.fits("detector") else {"status": "skipped: out of time"}
    ctx.free()
    out["status"] = "ok"
    return out


def wait_for_mmcv(ctx, build: Path) -> dict:
    """Wait for the background build (tools/device_check.sh) until the detector part would no
    longer fit; stop it then."""
    t0 = time.time()
    latest_need = ctx.profile.part_s["detector"] * 2.5  # two detectors and the --amp steps
    while not (build / "status").exists() and ctx.left() > latest_need:
        time.sleep(2)
    progress = build_progress(build / "build.log")
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


def build_progress(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    steps = re.findall(r"^\[(\d+)/(\d+)\]", text, flags=re.M)
    return f"{steps[-1][0]} of {steps[-1][1]} compiled" if steps else "nothing compiled yet"


def _detector(ctx, name: str):
    """(model in train mode on the device, its config, a batch): the profile's Mask R-CNN of
    ``name`` with random heads (fewer proposals, narrow: as the profile says)."""
    prof = ctx.profile
    cfg = detector_config(name)
    if prof.few_proposals:
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
        cfg.model.train_cfg.rcnn.sampler.num = 64
    if prof.narrow_detectors:
        narrow_detector_config(cfg)
    model = case_detector(name, heads="random", cfg=cfg).to(ctx.device).train()
    inputs, samples = detector_batch(model, prof.det_batch, prof.det_size, True, ctx.device)
    return model, cfg, inputs, samples


def train_steps(ctx, name: str) -> dict:
    """Forward, losses, backward and AdamW step under bf16 autocast over the whole detector, as
    AutocastOptimWrapper runs it (mmcv's RoIAlign has no bf16 kernel: it gets fp32 maps)."""
    prof, dev = ctx.profile, ctx.device
    model, _, inputs, samples = _detector(ctx, name)
    losses_seen: list[torch.Tensor] = []
    step = detector_step(model, inputs, samples, "bf16", training=True, losses=losses_seen)
    warm_up(step, prof.det_warmup, dev)
    ctx.free()
    mem = PeakMemory(dev) if dev == "cuda" else None  # the CPU dry run measures no memory
    with mem or contextlib.nullcontext():
        times = time_steps(step, prof.det_iters, dev)
    median = statistics.median(times)
    row = dict(model=name, status="ok", batch=prof.det_batch, size=list(prof.det_size), median_ms=median,
               times_ms=times, images_per_s=prof.det_batch / (median * 1e-3),
               peak_gib=mem.peak / GIB if mem else None,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               losses_finite=finite(losses_seen))
    del model, step, inputs, samples
    return row


def amp_steps(ctx) -> dict:
    """Two steps with what ``tools/train.py --amp`` picks on this machine (on a GPU MMEngine's
    AmpOptimWrapper: fp16 autocast over the whole model, dynamic loss scaling)."""
    from mmengine.optim import build_optim_wrapper

    from hieradet_mmdet.engine.amp import use_mixed_precision

    model, cfg, inputs, samples = _detector(ctx, "hieradet_small")
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
    if ctx.device == "cpu":  # what the CPU choice was made from (hieradet_mmdet.engine.amp)
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
