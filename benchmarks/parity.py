"""The benchmark's correctness checks (``--checks``): HieraDet-S against birder with the same
weights on the device at hand, in float64 and fp32, under bf16 / fp16 autocast, with activation
checkpointing, and the fast path's plumbing there. Every check gives a row with its value, bound and ok."""

from __future__ import annotations

import copy

import torch

from .reference import (SEED, autocast, birder_features, finite, make_pair, noise_bound, norm_err,
                        rel_err, strict_fp32)
from hieradet_mmdet.weights.convert import birder_to_ours


def birder_forward(model):
    return lambda x: birder_features(model, x)


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


def run_checks(archs, device: str, shape: tuple) -> list[dict]:
    """Every check on ``device`` for each of ``archs``, with inputs of ``shape`` (B, C, H, W)."""
    import gc

    rows = []
    for arch in archs:
        ours, ref = make_pair(arch, shape[2:])
        ours, ref = ours.to(device), ref.to(device)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device)
        rows += check_parity(arch, ours, ref, x)
        rows += check_autocast(arch, ours, ref, x)
        rows += check_with_cp(arch, ours, x)
        rows += check_plumbing(arch, ours, x)
        del ours, ref, x
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def checks_table(rows: list[dict]) -> list[str]:
    """The checks as table cells: check, arch, value (birder's beside it), bound, ok."""
    from .report import fmt

    return [[r["name"], r["arch"], fmt(r["value"]) + (f" (birder {fmt(r['birder'])})" if "birder" in r else ""),
             fmt(r["bound"]), "yes" if r["ok"] else "NO"] for r in rows]


def _row(name, arch, value, bound, ok, **extra) -> dict:
    return dict(name=name, arch=arch, value=value, bound=bound, ok=bool(ok), **extra)


def check_parity(arch, ours, ref, x) -> list[dict]:
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
    bound = noise_bound(ref_e)
    rows.append(_row("fp32 outputs vs birder's float64 (ours; bound 4x birder's fp32 + 1e-6)", arch, ours_e, bound,
                     ours_e <= bound and finite(outs), birder=ref_e, ours_vs_birder=direct))
    worst = None
    for name, exact in truth_grads.items():
        noise = rel_err(ref_grads[name], exact)
        err = rel_err(grads[name], exact)
        slack = noise_bound(noise) - err
        if worst is None or slack < worst[0]:
            worst = (slack, name, err, noise)
    _, name, err, noise = worst
    rows.append(_row("fp32 gradients vs birder's float64 (tightest; bound 4x birder's fp32 + 1e-6)", arch, err,
                     noise_bound(noise), err <= noise_bound(noise) and finite(grads.values()), birder=noise,
                     worst=name))
    return rows


def _autocast_bound(birder_err: float) -> float:
    """How far ours under autocast may be from fp32 when birder's is ``birder_err`` from it."""
    return min(5e-2, max(1.5 * birder_err, birder_err + 2e-3))


def check_autocast(arch, ours, ref, x) -> list[dict]:
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
                stages.append((err / _autocast_bound(ref_err), err, ref_err))
            _, err, ref_err = max(stages)
            bound = _autocast_bound(ref_err)
            dtypes = [str(o.dtype).replace("torch.", "") for o in low]
            ref_dtypes = [str(o.dtype).replace("torch.", "") for o in ref_low]
            rows.append(_row(f"{dtype} autocast outputs vs fp32 (tightest stage; bound max(1.5x, +2e-3) birder's, "
                             "<= 5e-2; stage dtypes as birder's)", arch, err, bound,
                             all(e <= _autocast_bound(r) for _, e, r in stages) and finite(low)
                             and dtypes == ref_dtypes, birder=ref_err, dtypes=dtypes, birder_dtypes=ref_dtypes,
                             stage_errors=[e for _, e, _ in stages]))
    return rows


def check_with_cp(arch, ours, x) -> list[dict]:
    """with_cp must give the gradients of the same step without it, stochastic depth included
    (checkpointing replays the random state). On a GPU two runs of the same step may differ in
    the last bits (atomics in some backward kernels): that difference, measured, is the bound."""
    rows = []
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


def check_plumbing(arch, ours, x) -> list[dict]:
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
