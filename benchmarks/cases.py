"""Benchmark cases: the models, one timed step per mode, and running a case (or models paired)."""

from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from .reference import (LOW_PRECISION, SEED, autocast, birder_available, birder_features, make_birder,
                        norm_err, ours_from_birder, rel_err, sync)

from .flops import count_flops
from .memory import PeakMemory
from .timing import interleaved, time_steps, warm_up

REPO = Path(__file__).resolve().parents[1]

MODELS: dict[str, dict[str, Any]] = {
    "hieradet_small": dict(kind="ours", arch="small"),
    "hieradet_d_small": dict(kind="ours", arch="d_small"),
    # the same trunks forced onto the reference path (the fast path's numbers, computed as SAM2 does)
    "hieradet_small_reference": dict(kind="ours", arch="small", fast_path=False),
    "hieradet_d_small_reference": dict(kind="ours", arch="d_small", fast_path=False),
    "birder_small": dict(kind="birder", arch="small"),
    "birder_d_small": dict(kind="birder", arch="d_small"),
    "swin_t": dict(kind="mmdet"),
    "r50": dict(kind="mmdet"),
}
SWIN_T_MASK_RCNN = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"
# The detector modes' detectors: our configs for our models, MMDetection's for Swin-T and R-50.
# MMDetection has no Swin-T DINO: its R-50 DINO takes Swin-T's backbone (strides 8-32), as its
# Swin-L DINO config takes Swin-L's.
DETECTORS: dict[str, dict[str, str]] = {
    "mask_rcnn": dict(ours="maskrcnn_hieradet_s.py", swin_t=SWIN_T_MASK_RCNN,
                      r50="mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"),
    "dino": dict(ours="dino-4scale_hieradet-s_12e_coco.py", swin_t="mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py",
                 r50="mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py"),
    "mask2former": dict(ours="mask2former_hieradet-s_lsj-50e_coco.py",
                        swin_t="mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py",
                        r50="mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco.py"),
}
MODES = ("backbone", "backbone-train", "detector-infer", "detector-train")
DTYPES = ("fp32", "bf16")
CONFIGS = REPO / "configs"


def make_ours(arch: str, size: tuple[int, int], with_cp: bool = False, fast_path: Optional[bool] = None):
    """Our trunk, with the weights of make_birder's birder model when birder is importable."""
    import torch

    from hieradet_mmdet.models import HieraDet

    torch.manual_seed(SEED)
    if not birder_available()[0]:
        return HieraDet(arch, with_cp=with_cp, fast_path=fast_path)
    return ours_from_birder(make_birder(f"hieradet_{arch}", size=size), arch, with_cp=with_cp, fast_path=fast_path)


def _config_path(path: str) -> str:
    """'mmdet::x/y.py' -> the file in the installed MMDetection package."""
    if path.startswith("mmdet::"):
        import mmdet

        root = Path(mmdet.__file__).parent
        for base in (root / ".mim" / "configs", root.parent / "configs"):
            if (base / path[len("mmdet::"):]).exists():
                return str(base / path[len("mmdet::"):])
    return path


def detector_config(name: str, with_cp: bool = False, config: Optional[str] = None, detector: str = "mask_rcnn"):
    """The ``detector`` (of DETECTORS) config of a model of MODELS (ours: ``config`` if given, with
    the model's arch), without pretrained weights."""
    from mmengine.config import Config

    arch = MODELS[name].get("arch")
    if MODELS[name]["kind"] == "ours":
        cfg = Config.fromfile(str(Path(config) if config else CONFIGS / DETECTORS[detector]["ours"]))
        cfg.model.backbone.arch = arch
        if "fast_path" in MODELS[name]:
            cfg.model.backbone.fast_path = MODELS[name]["fast_path"]
    else:
        cfg = Config.fromfile(_config_path(DETECTORS[detector][name]))
        if detector == "dino" and name == "swin_t":
            swin = Config.fromfile(_config_path(SWIN_T_MASK_RCNN)).model.backbone
            cfg.model.backbone = dict(swin, out_indices=(1, 2, 3))
            cfg.model.neck.in_channels = [192, 384, 768]
    cfg.model.backbone.init_cfg = None  # random weights: no download, same cost
    cfg.model.backbone.with_cp = with_cp
    return cfg


def register_mmdet():
    """MMDetection's modules and ours in its registries, in MMDetection's scope."""
    from mmengine.registry import init_default_scope

    from hieradet_mmdet.detectors import DEFAULT_SCOPE, register_modules

    register_modules()
    init_default_scope(DEFAULT_SCOPE)


def build_backbone(name: str, size: tuple[int, int], with_cp: bool):
    """-> (module, forward function returning a tuple of feature maps)."""
    spec = MODELS[name]
    if spec["kind"] == "ours":
        model = make_ours(spec["arch"], size, with_cp, spec.get("fast_path"))
        return model, model
    if spec["kind"] == "birder":
        ok, why = birder_available()
        if not ok:
            raise Skip(why)
        if with_cp:
            raise Skip("birder's detection_features has no activation checkpointing")
        model = make_birder(f"hieradet_{spec['arch']}", size=size)
        return model, lambda x: birder_features(model, x)
    register_mmdet()
    import torch
    from mmdet.registry import MODELS as REGISTRY

    torch.manual_seed(SEED)
    model = REGISTRY.build(detector_config(name, with_cp).model.backbone)
    return model, model


def case_detector(name: str, with_cp: bool = False, heads: str = "neutral", config: Optional[str] = None,
                  cfg=None, detector: str = "mask_rcnn"):
    """A detector of MODELS with random weights (seeded): ``heads`` 'neutral' (neutral_heads) or
    'random'; ``cfg``: this config instead of detector_config's."""
    spec = MODELS[name]
    if spec["kind"] == "birder":
        raise Skip("birder's HieraDet has no MMDetection detector; see hieradet_small")
    register_mmdet()
    import torch
    from mmdet.registry import MODELS as REGISTRY

    torch.manual_seed(SEED)
    cfg = cfg if cfg is not None else detector_config(name, with_cp, config, detector)
    if heads == "random" and cfg.model.get("test_cfg", {}).get("rcnn") is not None:
        # Random weights give few or many detections above the usual 0.05 score threshold; keep
        # every one (up to max_per_img) so that the mask head does the same work in every model.
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    model = REGISTRY.build(cfg.model)
    if heads == "neutral":
        neutral_heads(model)
    return model


def detector_batch(model, batch: int, size: tuple[int, int], training: bool, device: str,
                   images: Optional[list[str]] = None):
    """A preprocessed batch: MMDetection's demo inputs (random pixels, 8 random boxes per image), or
    with ``images`` the first ``batch`` of those files resized to ``size``."""
    import torch
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(SEED)
    packed = demo_mm_inputs(batch_size=batch, image_shapes=[(3, *size)] * batch, num_items=[8] * batch,
                            num_classes=80, with_mask=True)
    for i, path in enumerate((images or [])[:batch]):
        import mmcv

        img = mmcv.imread(path)  # BGR, as MMDetection's loaders read it
        packed["inputs"][i] = torch.from_numpy(mmcv.imresize(img, size[::-1])).permute(2, 0, 1).contiguous()
    data = model.data_preprocessor(packed, training)
    return data["inputs"], data["data_samples"]


class Skip(Exception):
    """A case that cannot run here (missing package, unsupported combination)."""


def _rel_errors(outs, refs) -> dict[str, float]:
    pairs = list(zip(outs, refs))
    return {"max_rel": max((rel_err(a, b) for a, b in pairs), default=0.0),
            "norm_rel": max((norm_err(a, b) for a, b in pairs), default=0.0)}


def detector_autocast(model, dtype: str):
    """A detector under autocast as ``tools/train.py --amp`` and ``tools/test.py --amp`` run it
    (hieradet_mmdet.engine.amp.autocast_detector); 'fp32': as it is."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    from hieradet_mmdet.engine.amp import autocast_detector

    return autocast_detector(model, LOW_PRECISION[dtype])


def backbone_step(forward: Callable, params, x, device: str, dtype: str, training: bool) -> Callable[[], Any]:
    """One step of a backbone: its forward without autograd, or in ``training`` forward and
    backward of the mean of its squared outputs (the gradients dropped after it)."""
    import torch

    if not training:
        def step():
            with torch.no_grad(), autocast(device, dtype):
                return forward(x)
        return step
    params = list(params)

    def step():
        with autocast(device, dtype):
            loss = sum(o.float().pow(2).mean() for o in forward(x))
        loss.backward()
        for p in params:
            p.grad = None
    return step


def detector_step(model, inputs, samples, dtype: str, training: bool, losses: Optional[list] = None):
    """One step of a detector: predict without autograd, or in ``training`` forward, losses,
    backward and an AdamW step (each loss appended to ``losses`` when given)."""
    import torch

    if not training:
        def step():
            with torch.no_grad(), detector_autocast(model, dtype):
                return model(inputs, samples, mode="predict")
        return step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with detector_autocast(model, dtype):
            loss, _ = model.parse_losses(model(inputs, samples, mode="loss"))
        loss.backward()
        optimizer.step()
        if losses is not None:
            losses.append(loss.detach())
    return step


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
            warm_up(holder["step"], case["warmup"], case["device"])
            return {"params_m": holder["params_m"]}

        results.append(_guarded(case, prep))
        prepared.append(holder if results[-1]["status"] == "ok" else None)
    live = [i for i, p in enumerate(prepared) if p is not None]
    for i in live:
        results[i].update(load_timed=[loadavg(), None], paired_with=[cases[j]["model"] for j in live],
                          mem_kind="not measured (paired)")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cases[0]["threads"])
    try:
        for i in live:  # forget the warm-up's backbone time
            if prepared[i]["backbone_ms"]:
                prepared[i]["backbone_ms"]()
        times = interleaved({i: prepared[i]["step"] for i in live}, 1, cases[0]["device"], rounds=cases[0]["iters"],
                            after_each=lambda i: _read_clock(prepared[i], results[i]))
    finally:
        torch.set_num_threads(threads)
    for i in live:
        results[i]["times_ms"] = [t for block in times[i] for t in block]
        results[i]["load_timed"][1] = loadavg()
        results[i] = _guarded(results[i], lambda i=i: _extras(cases[i], prepared[i]))
    return results


def _read_clock(prep: dict[str, Any], result: dict[str, Any]) -> None:
    """After a detector's step: the milliseconds it spent in its backbone."""
    if prep["backbone_ms"]:
        result.setdefault("backbone_ms", []).append(prep["backbone_ms"]())


def _prepare(case: dict[str, Any]) -> dict[str, Any]:
    """Build the model and input of a case: dict(model, forward, x, step, params_m)."""
    import torch

    device, dtype, mode, name = case["device"], case["dtype"], case["mode"], case["model"]
    size, batch = tuple(case["size"]), case["batch"]
    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("CUDA is not available")
    torch.set_num_threads(case["threads"])
    torch.manual_seed(SEED)

    x = forward = clock = None
    if mode.startswith("backbone"):
        training = mode == "backbone-train"
        model, forward = build_backbone(name, size, case["with_cp"])
        model.to(device)
        model.train(training)  # (MMDetection backbones' train() returns None)
        if not training:
            for p in model.parameters():
                p.requires_grad_(False)
        x = torch.randn(batch, 3, *size, device=device)
        step = backbone_step(forward, model.parameters(), x, device, dtype, training)
    else:
        training = mode == "detector-train"
        heads = "checkpoint" if case.get("checkpoint") else case.get("heads", "neutral")
        model = case_detector(name, case["with_cp"], heads, case.get("config"),
                              detector=case.get("detector", "mask_rcnn")).to(device)
        if case.get("checkpoint"):
            load_detector_checkpoint(model, case["checkpoint"])
        model.train(training)
        inputs, samples = detector_batch(model, batch, size, training, device, case.get("images"))
        clock = BackboneClock(model.backbone, device)
        step = detector_step(model, inputs, samples, dtype, training)
    return dict(model=model, forward=forward, x=x, step=step, inputs=None if x is not None else inputs,
                samples=None if x is not None else samples,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                backbone_ms=clock.take if clock is not None else None)


def load_detector_checkpoint(model, path: str) -> None:
    """A trained detector's weights (an MMEngine checkpoint of this config's model), strictly."""
    from hieradet_mmdet.weights.fit import load_whole_model

    load_whole_model(model, path, f"the benchmark's {type(model).__name__}")


def neutral_heads(model) -> None:
    """Heads that do the same work whatever the backbone: output layers zeroed
    (hieradet_mmdet.engine.head_outputs), so every proposal is an anchor with the same
    score and every RoI keeps its box, and the box classifiers (the layers of a head's first output
    with a background class: num_classes + 1 outputs) biased to one class, so that the proposals
    become up to max_per_img detections of it as with trained weights. With random weights the
    boxes would depend on the backbone, and RoIAlign's cost on their sizes (it samples every bin
    adaptively): up to 3x between backbones."""
    import torch

    from hieradet_mmdet.engine.head_outputs import discover_head_outputs

    found = discover_head_outputs(model)
    with torch.no_grad():
        for module in found.layers.values():
            for p in module.parameters():
                p.zero_()
        for head_name, outputs in found.per_head.items():
            classes = getattr(model.get_submodule(head_name), "num_classes", None)
            for index, layer_name in outputs:
                layer = found.layers[layer_name]
                if index == 0 and classes is not None and getattr(layer, "out_features", None) == classes + 1 \
                        and layer.bias is not None:
                    layer.bias[0] = 10.0


class BackboneClock:
    """Time spent in a detector's backbone during one step: its forward, and in training its
    backward (from the moment all its outputs have their gradients to the end of the step)."""

    def __init__(self, backbone, device: str) -> None:
        import torch

        self.device, self.spent, self.backward_start = device, 0.0, None
        self._start = 0.0

        def pre(module, args):
            sync(device)
            self._start = time.perf_counter()

        def post(module, args, outputs):
            sync(device)
            self.spent += time.perf_counter() - self._start
            grads = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
            if grads:
                torch.autograd.graph.register_multi_grad_hook(grads, self._backward_reached)

        backbone.register_forward_pre_hook(pre)
        backbone.register_forward_hook(post)

    def _backward_reached(self, grads) -> None:
        self.backward_start = time.perf_counter()

    def take(self) -> float:
        """Milliseconds in the backbone since the last call (call right after a step ends)."""
        spent = self.spent
        if self.backward_start is not None:
            spent += time.perf_counter() - self.backward_start
        self.spent, self.backward_start = 0.0, None
        return spent * 1e3


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    prep = _prepare(case)
    out: dict[str, Any] = {"params_m": prep["params_m"]}
    device, step = case["device"], prep["step"]
    if case["warmup"]:  # this process's first step at this size: the per-size index plan, first allocations
        out["first_step_ms"] = time_steps(step, 1, device)[0]
    warm_up(step, case["warmup"] - 1, device)
    if prep["backbone_ms"]:
        prep["backbone_ms"]()  # forget the warm-up's
    load_start = loadavg()
    with PeakMemory(device) as mem:
        times = time_steps(step, case["iters"], device, after_each=lambda: _read_clock(prep, out))
    out.update(times_ms=times, peak_mem_mb=mem.peak / 2**20,
               peak_delta_mb=(mem.peak - mem.base) / 2**20, mem_kind=mem.kind,
               load_timed=[load_start, loadavg()])  # 1/5/15-min load averages around the timed iterations
    out.update(_extras(case, prep))
    return out


def _extras(case: dict[str, Any], prep: dict[str, Any]) -> dict[str, Any]:
    """FLOPs, accuracy and the operator profile (untimed)."""
    out = {}
    if case["flops"]:
        out["gflops"] = count_flops(prep["step"]) / 1e9
    if case.get("profile"):
        out["profile"] = write_profile(case, prep["step"])
    if case["mode"] == "backbone" and case["accuracy"]:
        out.update(_accuracy(case, prep["model"], prep["forward"], prep["x"]))
    if case["mode"] == "detector-infer" and case["accuracy"] and case["dtype"] != "fp32":
        out["agreement_vs_fp32"] = detection_agreement(case, prep)
    return out


def write_profile(case: dict[str, Any], step: Callable[[], Any]) -> str:
    """One step under torch.profiler: the operator table (self time first) as a text file."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case["device"] == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(case["device"])
    directory = Path(case["profile"])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (f"{case['model']}_{case['mode']}_{case['dtype']}_{case['batch']}x{case['size'][0]}x"
                        f"{case['size'][1]}{'_cp' if case['with_cp'] else ''}.txt")
    sort = "self_cuda_time_total" if case["device"] == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    return str(path)


def _accuracy(case, model, forward, x) -> dict[str, Any]:
    """err_vs_fp32 for reduced-precision rows; parity vs birder (same weights, same dtype) for ours."""
    import torch

    info: dict[str, Any] = {}
    device, dtype = case["device"], case["dtype"]
    with torch.no_grad():
        with autocast(device, dtype):
            outs = forward(x)
        if dtype != "fp32":
            info["err_vs_fp32"] = _rel_errors(outs, forward(x))
        spec = MODELS[case["model"]]
        if spec["kind"] == "ours":
            ok, why = birder_available()
            if not ok:
                info["parity_vs_birder"] = why
            else:
                ref = make_birder(f"hieradet_{spec['arch']}", size=case["size"]).to(device).eval()
                with autocast(device, dtype):
                    refs = birder_features(ref, x)
                info["parity_vs_birder"] = _rel_errors(outs, refs)
    return info


def detection_agreement(case, prep, score_thr: float = 0.3) -> dict[str, Any]:
    """The case's detections against the same model's float32 ones: how many of the float32
    detections above ``score_thr`` have a reduced-precision one of the same class at IoU >= 0.5,
    and the lowest box IoU (and mask IoU) among those pairs."""
    import torch
    from mmdet.structures.bbox import bbox_overlaps

    with torch.no_grad():
        # MMDetection writes predictions into the data samples it is given and returns those: keep
        # a copy of the first results before the second call overwrites them.
        low = [s.pred_instances.clone() for s in prep["step"]()]
        ref = [s.pred_instances for s in prep["model"](prep["inputs"], prep["samples"], mode="predict")]
    matched = total = 0
    box_ious, mask_ious = [], []
    for a, b in zip(ref, low):
        a, b = a[a.scores >= score_thr], b[b.scores >= score_thr * 0.8]
        total += len(a)
        if not len(a) or not len(b):
            continue
        ious = bbox_overlaps(a.bboxes, b.bboxes)
        ious[a.labels[:, None] != b.labels[None, :]] = 0
        best, idx = ious.max(1)
        for i in (best >= 0.5).nonzero().flatten().tolist():
            matched += 1
            box_ious.append(float(best[i]))
            if "masks" in a:
                m1, m2 = a.masks[i].bool(), b.masks[int(idx[i])].bool()
                mask_ious.append(float((m1 & m2).sum() / (m1 | m2).sum().clamp_min(1)))
    return dict(score_thr=score_thr, fp32_detections=total, matched=matched,
                min_box_iou=min(box_ious, default=None), min_mask_iou=min(mask_ious, default=None))


def loadavg() -> Optional[list[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None
