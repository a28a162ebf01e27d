#!/usr/bin/env python
"""Speed, memory and FLOPs of HieraDet-S against birder's HieraDet-S, Swin-T and ResNet-50.

Cases are every combination of --models x --mode x --dtype x --sizes (x --with-cp). Each
case runs in its own Python process (unless --no-isolate), so the peak memory is the case's own:
on CPU the peak resident set size during the timed iterations (Linux VmHWM, reset before them),
on CUDA torch.cuda.max_memory_allocated. Both are also given as the rise above the memory
held when the timed iterations start ("delta": activations and temporaries of one step).

CPU memory and glibc: by default freed blocks stay in glibc's heap (and its mmap threshold grows
after frees), so the RSS peak partly measures fragmentation. --malloc exact runs the cases with
a fixed 64 KiB mmap threshold: each tensor is its own mapping, unmapped when freed, and the RSS
peak is the live-tensor peak. Page faults make that mode slower, so take times from a default run.

Modes:
  backbone        forward of the backbone alone, no autograd
  backbone-train  forward + backward of the backbone (loss: mean of squared outputs)
  detector-infer  Mask R-CNN + FPN inference (mode='predict'), no autograd; the R-CNN score
                  threshold is 0 so every model segments its 100 best detections
  detector-train  Mask R-CNN + FPN train step: forward, losses, backward, AdamW step

Models: hieradet_small / hieradet_d_small (this repo; windowed SAM2 layout / global layout),
birder_small / birder_d_small (birder's own HieraDet-S; backbone modes only; needs birder),
swin_t and r50 (MMDetection's SwinTransformer and ResNet-50, Mask R-CNN as in their configs).
HieraDet models get birder's weights when birder is importable (same seed as the birder rows),
so 'parity' is the max relative error of our outputs against birder's with the same weights;
bf16 rows also give the error against the same model in fp32 ('err_vs_fp32').

FLOPs come from torch.utils.flop_counter.FlopCounterMode over one step (matmuls, convolutions
and attention, forward and backward); custom ops (mmcv RoIAlign, NMS) are not counted.

Examples (the figures in the README):
  .venv/bin/python tools/benchmark.py --models hieradet_small birder_small --mode backbone \\
      --dtype fp32 bf16 --sizes 800x1344 --threads 2 --iters 10 --rounds 3 --out work_dirs/bench.json
  .venv/bin/python tools/benchmark.py --models hieradet_small --mode backbone-train --sizes 512x512 \\
      --batch 2 --with-cp both --threads 2 --iters 3 --malloc exact
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT_TAG = "BENCHMARK_RESULT "
SEED = 0

MODELS: dict[str, dict[str, Any]] = {
    "hieradet_small": dict(kind="ours", arch="small"),
    "hieradet_d_small": dict(kind="ours", arch="d_small"),
    "birder_small": dict(kind="birder", arch="small"),
    "birder_d_small": dict(kind="birder", arch="d_small"),
    "swin_t": dict(kind="mmdet", config="mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"),
    "r50": dict(kind="mmdet", config="mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"),
}
MODES = ("backbone", "backbone-train", "detector-infer", "detector-train")
DTYPES = ("fp32", "bf16")
HIERADET_DETECTOR_CONFIG = REPO / "configs" / "maskrcnn_hieradet_s.py"


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# glibc tunables read at process start: a fixed mmap threshold (which also stops glibc from raising
# it after frees) makes every tensor its own mapping, unmapped when freed.
EXACT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _hwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS so the baseline RSS is the live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a region: CUDA allocator stats, else Linux VmHWM (reset through
    /proc/self/clear_refs), else a sampling thread reading /proc/self/statm."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = ""
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.kind = "cuda max_memory_allocated"
            return self
        _malloc_trim()
        self.base = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.kind = "rss (VmHWM)"
        except OSError:
            self.kind = "rss (sampled every 2 ms)"
            self._sampled = self.base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self._sampled, _rss_bytes())
        else:
            self.peak = _hwm_bytes() or _rss_bytes()


# ----------------------------------------------------------------------------------------------
# FLOPs (FlopCounterMode does not know CPU flash attention; add it)
# ----------------------------------------------------------------------------------------------

def _attention_flops(q_shape, k_shape, v_shape) -> int:
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def _count_flops(step: Callable[[], Any]) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(query, key, value, *args, out=None, **kwargs):
            return _attention_flops(query.shape, key.shape, value.shape)

        def bwd(grad_out, query, key, value, *args, out=None, **kwargs):
            return 2 * _attention_flops(query.shape, key.shape, value.shape)  # dQ, dK, dV, dP: 2x forward

        fwd._get_raw = True
        bwd._get_raw = True
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
            extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    from hieradet_mmdet import fused_linear as hd

    previous = hd.set_fused_linear(False)  # oneDNN-fused linears are invisible to the counter
    try:
        counter = FlopCounterMode(display=False, custom_mapping=extra)
        with counter:
            step()
    finally:
        hd.set_fused_linear(previous)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def birder_available() -> tuple[bool, str]:
    try:
        import birder  # noqa: F401
        from birder.model_registry import registry  # noqa: F401
        return True, ""
    except Exception as err:  # ImportError or a broken install
        return False, f"birder not importable ({type(err).__name__}: {err})"


def make_birder(arch: str, size: tuple[int, int]):
    """birder's HieraDet with seeded, perturbed weights (biases / norms away from their init)."""
    import torch
    from birder.model_registry import registry

    torch.manual_seed(SEED)
    model = registry.net_factory(f"hieradet_{arch}", 10, size=size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def make_ours(arch: str, size: tuple[int, int], with_cp: bool = False):
    """Our trunk, with birder's weights of make_birder when birder is importable."""
    import torch
    from hieradet_mmdet.checkpoint import remap_birder_keys
    from hieradet_mmdet.hieradet import HieraDet

    torch.manual_seed(SEED)
    model = HieraDet(arch, with_cp=with_cp)
    ok, _ = birder_available()
    if ok:
        ref = make_birder(arch, size)
        state = remap_birder_keys(ref.state_dict(), model.arch["depths"])
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(("norm.", "head."))})
        del ref
    return model


def _config_path(path: str) -> str:
    """'mmdet::x/y.py' -> the file in the installed MMDetection package."""
    if path.startswith("mmdet::"):
        import mmdet

        root = Path(mmdet.__file__).parent
        for base in (root / ".mim" / "configs", root.parent / "configs"):
            if (base / path[len("mmdet::"):]).exists():
                return str(base / path[len("mmdet::"):])
    return path


def _mmdet_config(name: str, arch: Optional[str], with_cp: bool):
    from mmengine.config import Config

    if MODELS[name]["kind"] == "ours":
        if HIERADET_DETECTOR_CONFIG.exists():
            cfg = Config.fromfile(str(HIERADET_DETECTOR_CONFIG))
        else:  # the R50 Mask R-CNN with the backbone swapped
            import hieradet_mmdet  # noqa: F401  (registers type='HieraDet')

            cfg = Config.fromfile(_config_path(MODELS["r50"]["config"]))
            cfg.model.backbone = dict(type="HieraDet", arch=arch, out_indices=(0, 1, 2, 3), drop_path_rate=0.2)
            cfg.model.neck.in_channels = [96, 192, 384, 768]
        cfg.model.backbone.arch = arch
    else:
        cfg = Config.fromfile(_config_path(MODELS[name]["config"]))
    cfg.model.backbone.init_cfg = None  # random weights: no download, same cost
    cfg.model.backbone.with_cp = with_cp
    # Random weights give few or many detections above the usual 0.05 score threshold; keep every
    # detection (up to max_per_img) so the mask head always does the same work in every model.
    if cfg.model.get("test_cfg", {}).get("rcnn") is not None:
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    return cfg


def _register_mmdet():
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    _mmcv_ops_in_fp32_under_autocast()
    try:
        import hieradet_mmdet  # noqa: F401
    except ImportError:
        pass


def _mmcv_ops_in_fp32_under_autocast() -> None:
    """mmcv's RoIAlign and NMS have no bfloat16 kernels; run them in fp32 under autocast, as
    torchvision's autocast rules for its own roi_align / nms do (inputs cast up, RoIAlign's
    result cast back to the features' dtype)."""
    import torch
    from mmcv.ops import RoIAlign

    if getattr(RoIAlign, "_fp32_under_autocast", False):
        return
    forward = RoIAlign.forward

    def fp32_forward(self, input, rois):
        device = input.device.type
        if torch.is_autocast_enabled(device) and (input.dtype != torch.float32 or rois.dtype != torch.float32):
            with torch.autocast(device, enabled=False):
                return forward(self, input.float(), rois.float()).to(input.dtype)
        return forward(self, input, rois)

    RoIAlign.forward = fp32_forward
    RoIAlign._fp32_under_autocast = True

    from mmcv.ops.nms import NMSop  # same for NMS (boxes and scores come out of bf16 heads)

    nms_forward = NMSop.forward

    def fp32_nms(ctx, bboxes, scores, *args):
        low = (torch.bfloat16, torch.float16)
        return nms_forward(ctx, bboxes.float() if bboxes.dtype in low else bboxes,
                           scores.float() if scores.dtype in low else scores, *args)

    NMSop.forward = staticmethod(fp32_nms)


def build_backbone(name: str, size: tuple[int, int], with_cp: bool):
    """-> (module, forward function returning a tuple of feature maps)."""
    spec = MODELS[name]
    if spec["kind"] == "ours":
        model = make_ours(spec["arch"], size, with_cp)
        return model, model
    if spec["kind"] == "birder":
        ok, why = birder_available()
        if not ok:
            raise Skip(why)
        if with_cp:
            raise Skip("birder's detection_features has no activation checkpointing")
        model = make_birder(spec["arch"], size)
        return model, lambda x: tuple(model.detection_features(x).values())
    _register_mmdet()
    import torch
    from mmdet.registry import MODELS as REGISTRY

    torch.manual_seed(SEED)
    model = REGISTRY.build(_mmdet_config(name, None, with_cp).model.backbone)
    return model, model


def build_detector(name: str, with_cp: bool):
    spec = MODELS[name]
    if spec["kind"] == "birder":
        raise Skip("birder's HieraDet has no MMDetection detector; see hieradet_small")
    _register_mmdet()
    import torch
    from mmdet.registry import MODELS as REGISTRY

    torch.manual_seed(SEED)
    cfg = _mmdet_config(name, spec.get("arch"), with_cp)
    return REGISTRY.build(cfg.model)


def detector_batch(model, batch: int, size: tuple[int, int], training: bool, device: str):
    import torch
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(SEED)
    packed = demo_mm_inputs(batch_size=batch, image_shapes=[(3, *size)] * batch, num_items=[8] * batch,
                            num_classes=80, with_mask=True)
    data = model.data_preprocessor(packed, training)
    return data["inputs"], data["data_samples"]


class Skip(Exception):
    """A case that cannot run here (missing package, unsupported combination)."""


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------

def _rel_errors(outs, refs) -> dict[str, float]:
    max_rel, norm_rel = 0.0, 0.0
    for a, b in zip(outs, refs):
        a, b = a.float(), b.float()
        max_rel = max(max_rel, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
        norm_rel = max(norm_rel, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return {"max_rel": max_rel, "norm_rel": norm_rel}


def _autocast(device: str, dtype: str):
    import torch

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _guarded(case: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """dict(case, **fn()) with status 'ok', or the case with status 'skipped' / 'error'."""
    import torch

    result = dict(case)
    threads = torch.get_num_threads()
    try:
        result.update(fn())
        result["status"] = "ok"
    except Skip as why:
        result.update(status="skipped", reason=str(why))
    except Exception as err:  # report, don't abort the other cases
        result.update(status="error", reason=f"{type(err).__name__}: {err}".strip()[:500],
                      traceback=traceback.format_exc()[-2000:])
    finally:
        torch.set_num_threads(threads)
    return result


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process; returns its result (status 'ok', 'skipped' or 'error')."""
    return _guarded(case, lambda: _run_case(case))


def run_paired(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cases that differ only in the model, in one process with their timed iterations
    interleaved (A B C A B C ...), so that load changing over time hits all of them alike.
    Peak memory is not separable here; take it from unpaired runs."""
    prepared: list[Optional[dict[str, Any]]] = []
    results = []
    for case in cases:
        holder: dict[str, Any] = {}

        def prep(case=case, holder=holder):
            holder.update(_prepare(case))
            for _ in range(case["warmup"]):
                holder["step"]()
            _sync(case["device"])
            return {"params_m": holder["params_m"]}

        results.append(_guarded(case, prep))
        prepared.append(holder if results[-1]["status"] == "ok" else None)
    live = [i for i, p in enumerate(prepared) if p is not None]
    for i in live:
        results[i].update(times_ms=[], load_timed=[_loadavg(), None], paired_with=[cases[j]["model"] for j in live],
                          mem_kind="not measured (paired)")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cases[0]["threads"])
    try:
        for _ in range(cases[0]["iters"]):
            for i in live:
                start = time.perf_counter()
                prepared[i]["step"]()
                _sync(cases[i]["device"])
                results[i]["times_ms"].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(threads)
    for i in live:
        results[i]["load_timed"][1] = _loadavg()
        results[i] = _guarded(results[i], lambda i=i: _extras(cases[i], prepared[i]))
    return results


def _prepare(case: dict[str, Any]) -> dict[str, Any]:
    """Build the model and input of a case: dict(model, forward, x, step, params_m)."""
    import torch

    device, dtype, mode, name = case["device"], case["dtype"], case["mode"], case["model"]
    size, batch = tuple(case["size"]), case["batch"]
    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    torch.set_num_threads(case["threads"])
    torch.manual_seed(SEED)

    x = forward = None
    if mode.startswith("backbone"):
        training = mode == "backbone-train"
        model, forward = build_backbone(name, size, case["with_cp"])
        model.to(device)
        model.train(training)  # (MMDetection backbones' train() returns None)
        if not training:
            for p in model.parameters():
                p.requires_grad_(False)
        x = torch.randn(batch, 3, *size, device=device)

        if training:
            def step():
                with _autocast(device, dtype):
                    outs = forward(x)
                    loss = sum(o.float().pow(2).mean() for o in outs)
                loss.backward()
                for p in model.parameters():
                    p.grad = None
        else:
            def step():
                with torch.no_grad(), _autocast(device, dtype):
                    return forward(x)
    else:
        training = mode == "detector-train"
        model = build_detector(name, case["with_cp"]).to(device)
        model.train(training)
        inputs, samples = detector_batch(model, batch, size, training, device)
        if training:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

            def step():
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    losses = model(inputs, samples, mode="loss")
                    loss, _ = model.parse_losses(losses)
                loss.backward()
                optimizer.step()
        else:
            def step():
                with torch.no_grad(), _autocast(device, dtype):
                    return model(inputs, samples, mode="predict")
    return dict(model=model, forward=forward, x=x, step=step,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6)


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    prep = _prepare(case)
    out: dict[str, Any] = {"params_m": prep["params_m"]}
    device, step = case["device"], prep["step"]
    for _ in range(case["warmup"]):
        step()
    _sync(device)

    times = []
    load_start = _loadavg()
    with PeakMemory(device) as mem:
        for _ in range(case["iters"]):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    out.update(times_ms=[t * 1e3 for t in times], peak_mem_mb=mem.peak / 2**20,
               peak_delta_mb=(mem.peak - mem.base) / 2**20, mem_kind=mem.kind,
               load_timed=[load_start, _loadavg()])  # 1/5/15-min load averages around the timed iterations
    out.update(_extras(case, prep))
    return out


def _extras(case: dict[str, Any], prep: dict[str, Any]) -> dict[str, Any]:
    """FLOPs and accuracy (untimed)."""
    out = {}
    if case["flops"]:
        out["gflops"] = _count_flops(prep["step"]) / 1e9
    if case["mode"] == "backbone" and case["accuracy"]:
        out.update(_accuracy(case, prep["model"], prep["forward"], prep["x"]))
    return out


def _accuracy(case, model, forward, x) -> dict[str, Any]:
    """err_vs_fp32 for reduced-precision rows; parity vs birder (same weights, same dtype) for ours."""
    import torch

    info: dict[str, Any] = {}
    device, dtype = case["device"], case["dtype"]
    with torch.no_grad():
        with _autocast(device, dtype):
            outs = forward(x)
        if dtype != "fp32":
            info["err_vs_fp32"] = _rel_errors(outs, forward(x))
        spec = MODELS[case["model"]]
        if spec["kind"] == "ours":
            ok, why = birder_available()
            if not ok:
                info["parity_vs_birder"] = why
            else:
                ref = make_birder(spec["arch"], tuple(case["size"])).to(device).eval()
                with _autocast(device, dtype):
                    refs = tuple(ref.detection_features(x).values())
                info["parity_vs_birder"] = _rel_errors(outs, refs)
    return info


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 800x1344, got {text!r}") from None
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), metavar="MODEL",
                        default=["hieradet_small", "hieradet_d_small", "birder_small", "swin_t", "r50"],
                        help=f"any of {', '.join(MODELS)}")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["backbone"], metavar="MODE",
                        help=f"any of {', '.join(MODES)}")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["fp32"],
                        help="fp32, or bf16 autocast (weights stay fp32)")
    parser.add_argument("--sizes", nargs="+", type=_parse_size, default=[(800, 1344)], metavar="HxW")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--with-cp", choices=("off", "on", "both"), default="off",
                        help="activation checkpointing in the backbone (models that have it)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per case and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole list of cases this many times, interleaved (noisy machines)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip FLOP counting")
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                        help="skip parity vs birder and error vs fp32")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run cases in this process (faster; peak memory then less meaningful)")
    parser.add_argument("--malloc", choices=("glibc", "exact"), default="glibc",
                        help="CPU peak memory as the default glibc heap gives it (freed blocks stay resident, "
                             "so it depends on fragmentation), or 'exact': every allocation >= 64 KiB is its "
                             "own mapping, returned to the OS when freed, so the RSS peak is the live-tensor "
                             "peak (slower: time such runs separately)")
    parser.add_argument("--paired", action="store_true",
                        help="run the models of each mode/dtype/size in one process with their iterations "
                             "interleaved: fair time ratios on a machine whose load changes (no peak memory)")
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds per isolated case")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--from-json", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: print the table and target checks of earlier --out files")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one JSON case, print result
    parser.add_argument("--group", help=argparse.SUPPRESS)  # internal: run JSON cases paired
    return parser


def make_cases(args) -> list[dict[str, Any]]:
    cps = {"off": [False], "on": [True], "both": [False, True]}[args.with_cp]
    cases = []
    for size in args.sizes:
        for mode in args.mode:
            for name in args.models:
                for dtype in args.dtype:
                    for with_cp in cps:
                        cases.append(dict(model=name, mode=mode, dtype=dtype, size=list(size), batch=args.batch,
                                          with_cp=with_cp, device=args.device, threads=args.threads,
                                          iters=args.iters, warmup=args.warmup, flops=args.flops,
                                          accuracy=args.accuracy, malloc=args.malloc))
    return cases


def _run_isolated(cases: list[dict[str, Any]], paired: bool, timeout: float) -> list[dict[str, Any]]:
    """Run a case (or a paired group) in a fresh process; one result per case."""
    threads = str(cases[0]["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if cases[0].get("malloc") == "exact":
        env.update(EXACT_MALLOC_ENV)
    arg = ["--group", json.dumps(cases)] if paired else ["--case", json.dumps(cases[0])]
    cmd = [sys.executable, str(Path(__file__).resolve()), *arg]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return [dict(case, status="error", reason=f"timed out after {timeout:.0f} s") for case in cases]
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            return result if paired else [result]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    reason = f"case process exited with {proc.returncode}: " + " | ".join(tail)
    return [dict(case, status="error", reason=reason) for case in cases]


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result per case: latencies of all rounds pooled, memory as the median over rounds."""
    ok = [r for r in rounds if r.get("status") == "ok"]
    if not ok:
        return rounds[-1]
    merged = dict(ok[0])
    for r in ok[1:]:  # FLOPs and accuracy come from the first round
        merged.update({k: v for k, v in r.items() if k not in merged})
    merged["flops"], merged["accuracy"] = ok[0]["flops"], ok[0]["accuracy"]
    times = [t for r in ok for t in r["times_ms"]]
    merged["times_ms"] = times
    merged["round_medians_ms"] = [statistics.median(r["times_ms"]) for r in ok]
    merged["load_timed"] = [r.get("load_timed") for r in ok]
    for key in ("peak_mem_mb", "peak_delta_mb"):
        if all(key in r for r in ok):
            merged[key] = statistics.median(r[key] for r in ok)
    merged["rounds_ok"] = len(ok)
    return merged


def summarize_times(result: dict[str, Any]) -> None:
    times = sorted(result.get("times_ms") or [])
    if not times:
        return
    result["median_ms"] = statistics.median(times)
    result["p90_ms"] = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    result["mean_ms"] = statistics.fmean(times)
    result["images_per_s"] = result["batch"] * 1e3 / result["median_ms"]


def _find(results, **match) -> Optional[dict[str, Any]]:
    for r in results:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, as far as the results contain the cases they compare."""
    lines = []
    for size in sorted({tuple(r["size"]) for r in results}):
        s = list(size)
        tag = f"{size[0]}x{size[1]}"
        for arch in ("small", "d_small"):
            for dtype in DTYPES:
                ours = _find(results, model=f"hieradet_{arch}", mode="backbone", dtype=dtype, size=s, with_cp=False)
                ref = _find(results, model=f"birder_{arch}", mode="backbone", dtype=dtype, size=s, with_cp=False)
                ref32 = _find(results, model=f"birder_{arch}", mode="backbone", dtype="fp32", size=s, with_cp=False)
                if ours and ref:
                    lines.append(f"backbone {tag} {arch} {dtype}: ours {ours['median_ms']:.0f} ms vs birder "
                                 f"{ref['median_ms']:.0f} ms -> {ref['median_ms'] / ours['median_ms']:.3f}x")
                if dtype != "fp32" and ours and ref32:
                    lines.append(f"backbone {tag} {arch} ours {dtype} vs birder fp32: "
                                 f"{ref32['median_ms'] / ours['median_ms']:.3f}x")
        for name in ("hieradet_small", "hieradet_d_small"):
            off = _find(results, model=name, mode="backbone-train", dtype="fp32", size=s, with_cp=False)
            on = _find(results, model=name, mode="backbone-train", dtype="fp32", size=s, with_cp=True)
            if off and on and "peak_delta_mb" in off and "peak_delta_mb" in on:
                lines.append(f"{name} backbone-train {tag} (malloc {on.get('malloc', 'glibc')}) with_cp peak delta "
                             f"{on['peak_delta_mb']:.0f} MB vs "
                             f"{off['peak_delta_mb']:.0f} MB -> {on['peak_delta_mb'] / off['peak_delta_mb']:.2f}x; "
                             f"time {on['median_ms'] / off['median_ms']:.2f}x")
            for dtype in DTYPES:
                ours = _find(results, model=name, mode="detector-train", dtype=dtype, size=s, with_cp=False)
                swin = _find(results, model="swin_t", mode="detector-train", dtype=dtype, size=s, with_cp=False)
                if ours and swin:
                    lines.append(f"detector-train {tag} {dtype}: {name} / swin_t time = "
                                 f"{ours['median_ms'] / swin['median_ms']:.2f}x")
    return lines


def _fmt_acc(r: dict[str, Any]) -> str:
    parts = []
    parity = r.get("parity_vs_birder")
    if isinstance(parity, dict):
        parts.append(f"vs birder {parity['max_rel']:.1e}")
    elif parity:
        parts.append("no birder")
    err = r.get("err_vs_fp32")
    if err:
        parts.append(f"vs fp32 {err['max_rel']:.1e}/{err['norm_rel']:.1e}")
    return "; ".join(parts)


def _fmt_load(r: dict[str, Any]) -> str:
    """The 1-minute load average when the timed iterations started (range over rounds)."""
    rounds = r.get("load_timed") or []  # per round: [start, end], each the 1/5/15-min averages
    if rounds and rounds[0] and isinstance(rounds[0][0], (int, float)):
        rounds = [rounds]  # a single round's [start, end]
    starts = [l[0][0] for l in rounds if l and l[0]]
    if not starts:
        return ""
    lo, hi = min(starts), max(starts)
    return f"{lo:.1f}" if hi - lo < 0.05 else f"{lo:.1f}-{hi:.1f}"


def print_table(results: list[dict[str, Any]], file=sys.stdout, markdown: bool = False) -> None:
    header = ["model", "mode", "dtype", "input", "cp", "median ms", "p90 ms", "img/s", "peak MB", "delta MB",
              "GFLOPs", "load", "accuracy (max rel / norm rel)"]
    rows = []
    for r in results:
        size = f"{r['batch']}x{r['size'][0]}x{r['size'][1]}"
        first = [r["model"], r["mode"], r["dtype"], size, "on" if r["with_cp"] else ""]
        if r.get("status") != "ok":
            rows.append(first + [""] * 7 + [f"{r.get('status')}: {r.get('reason', '')}"[:160]])
            continue
        rows.append(first + [f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['images_per_s']:.3f}",
                             f"{r['peak_mem_mb']:.0f}" if "peak_mem_mb" in r else "paired",
                             f"{r['peak_delta_mb']:.0f}" if "peak_delta_mb" in r else "",
                             f"{r['gflops']:.1f}" if "gflops" in r else "", _fmt_load(r), _fmt_acc(r)])
    if markdown:
        print("| " + " | ".join(header) + " |", file=file)
        print("|" + "|".join(" --- " for _ in header) + "|", file=file)
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |", file=file)
        return
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header) - 1)]
    line = lambda cells: "  ".join(str(c).ljust(widths[i]) if i < len(widths) else str(c) for i, c in enumerate(cells))
    print(line(header), file=file)
    print(line(["-" * w for w in widths] + ["-" * len(header[-1])]), file=file)
    for row in rows:
        print(line(row), file=file)


def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(cpu=cpu, cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                mkldnn=torch.backends.mkldnn.is_available(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
        info["cpu_bf16_flags"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def gemm_gflops(device: str, threads: int, tokens: int = 8192, dim: int = 384, hidden: int = 1536) -> dict[str, float]:
    """Throughput of one MLP-sized linear (tokens x dim -> hidden) in fp32 and bf16: whether bf16
    can pay off at all here. Without AMX, AVX-512 BF16 dot products do no more multiply-adds per
    cycle than fp32 FMAs, and the conversions come on top."""
    import torch
    import torch.nn.functional as F

    device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(tokens, dim, device=device, dtype=dtype)
        w = torch.randn(hidden, dim, device=device, dtype=dtype)
        times = []
        for i in range(8):
            _sync(device)
            start = time.perf_counter()
            F.linear(x, w)
            _sync(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
        out[name] = round(2 * tokens * dim * hidden / statistics.median(times) / 1e9, 1)
    torch.set_num_threads(previous)
    return out


def _loadavg() -> Optional[list[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.case:
        print(RESULT_TAG + json.dumps(run_case(json.loads(args.case))), flush=True)
        return {}
    if args.group:
        print(RESULT_TAG + json.dumps(run_paired(json.loads(args.group))), flush=True)
        return {}
    if args.from_json:
        reports = [json.loads(path.read_text()) for path in args.from_json]
        results = [r for report in reports for r in report["results"]]
        print_table(results, markdown=args.markdown)
        for report in reports:
            print(f"\n{report['command']}\n  load before/after {report['load_before']} / {report['load_after']}, "
                  f"threads {report['threads']}, {report['machine']['cpu']}")
        for line in targets(results):
            print("target check:", line)
        return dict(results=results, targets=targets(results))
    cases = make_cases(args)
    if args.malloc == "exact" and not args.isolate:
        raise SystemExit("--malloc exact needs isolated cases (glibc reads it at process start); drop --no-isolate")
    load_before = _loadavg()
    per_case: list[list[dict[str, Any]]] = [[] for _ in cases]
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):  # paired: the cases that differ only in the model run together
        key = tuple(json.dumps(v) for k, v in sorted(case.items()) if k != "model") if args.paired else (i,)
        groups.setdefault(key, []).append(i)
    for round_index in range(args.rounds):
        for members in groups.values():
            group = [cases[i] for i in members]
            if round_index:  # FLOPs and accuracy do not change between rounds
                group = [dict(case, flops=False, accuracy=False) for case in group]
            if args.isolate:
                results = _run_isolated(group, args.paired, args.case_timeout)
            else:
                results = run_paired(group) if args.paired else [run_case(group[0])]
            for i, case, result in zip(members, group, results):
                per_case[i].append(result)
                label = f"[round {round_index + 1}/{args.rounds}] {case['model']} {case['mode']} {case['dtype']}"
                status = result.get("status")
                if status == "ok":
                    label += f": median {statistics.median(result['times_ms']):.1f} ms"
                else:
                    label += f": {status} ({result.get('reason', '')[:120]})"
                print(label, file=sys.stderr, flush=True)
    results = [_merge_rounds(r) for r in per_case]
    for r in results:
        summarize_times(r)
    report = dict(command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
                  else "tools/benchmark.py " + " ".join(shlex.quote(a) for a in argv),
                  machine=machine_info(args.device), threads=args.threads, device=args.device,
                  malloc=args.malloc, load_before=load_before, load_after=_loadavg(), rounds=args.rounds,
                  results=results,
                  targets=targets(results))
    print_table(results, markdown=args.markdown)
    gemm = report["machine"]["gemm_gflops"] = gemm_gflops(args.device, args.threads)
    print(f"\nload average before/after: {load_before} / {report['load_after']}; threads {args.threads}; "
          f"malloc {args.malloc}; {report['machine']['cpu']}; linear GFLOP/s fp32 {gemm['fp32']} / bf16 {gemm['bf16']}")
    for line in report["targets"]:
        print("target check:", line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
