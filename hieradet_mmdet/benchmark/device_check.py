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
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hieradet_mmdet.reference import SEED, make_pair, rel_err, strict_fp32

from .cases import REPO, backbone_step
from .detector_steps import part_detector
from .memory import GIB, PeakMemory
from .parity import birder_forward, ours_forward, part_checks
from .report import cpu_name, fmt, markdown_table, write_json
from .timing import interleaved, time_steps, warm_up

ARCHS = ("small", "d_small")
# An 8192^3 bf16 matmul measured on the H200 machines this check was written for; the run measures
# its own machine's peak too and uses that.
REFERENCE_BF16_TFLOPS = 790.0
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


# ---- parts (the checks: parity.py; the Mask R-CNN steps: detector_steps.py) -------------------

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
        info["cpu"] = cpu_name()
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
            warm_up(lambda: a @ b, 3, dev)
            times = time_steps(lambda: a @ b, 10, dev)
        out[f"{name}_tflops"] = 2 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12
        del a, b
    out["matmul_n"] = n
    out["reference_bf16_tflops"] = REFERENCE_BF16_TFLOPS
    return out


def part_flops(ctx) -> dict:
    """FLOPs of one step (a multiply-add is 2) of every timed model, counted on the meta device."""
    from .flops import count_flops

    out = {}
    shape = ctx.profile.bench_shape
    for arch in ctx.profile.archs:
        ours, ref = make_pair(arch, shape[2:])
        for name, model, forward in (("ours", ours, ours_forward), ("birder", ref, birder_forward)):
            model = model.to("meta")
            fwd = forward(model)
            x = torch.empty(*shape, device="meta")
            for mode in ("forward", "forward+backward"):
                out[f"{arch}/{name}/{mode}"] = count_flops(backbone_step(fwd, model.parameters(), x, "meta", "fp32",
                                                                         training=mode != "forward"))
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
    steps = {name: backbone_step(forward, params, x, dev, dtype, training=mode != "forward")
             for name, (_, forward, params) in variants.items()}
    memory: dict[str, PeakMemory] = {}

    @contextlib.contextmanager
    def first_round_memory(name, rnd):
        if rnd:
            yield
            return
        ctx.free()
        if dev != "cuda":
            yield
            return
        with PeakMemory(dev) as memory[name]:
            yield

    times = interleaved(steps, prof.iters, dev, rounds=prof.rounds, warmup=prof.warmup,
                        before=lambda name, rnd: variants[name][0](), around=first_round_memory)
    ours_ms = statistics.median(t for block in times["ours"] for t in block)
    rows = []
    for name, blocks in times.items():
        flat = [t for block in blocks for t in block]
        median = statistics.median(flat)
        round_medians = [statistics.median(block) for block in blocks]
        # the reference path computes what birder computes (pad tokens included); with_cp's
        # recomputation is extra work, not useful FLOPs, so its TFLOP/s are those of ours
        counted = "ours" if name.startswith("ours") and name != "ours reference path" else "birder"
        flops = ctx.flops.get(f"{arch}/{counted}/{mode}")
        spread = (max(round_medians) - min(round_medians)) / median if median else None
        mem = memory.get(name)
        rows.append(dict(arch=arch, dtype=dtype, mode=mode, model=name, status="ok", median_ms=median,
                         round_medians_ms=round_medians, spread=spread, iters=len(flat),
                         vs_ours=median / ours_ms, tflops=flops / (median * 1e-3) / 1e12 if flops else None,
                         peak_gib=mem.peak / GIB if mem else None,
                         peak_above_start_gib=(mem.peak - mem.base) / GIB if mem else None,
                         fp32_rel_diff_vs_birder=diff if name == "ours" else None))
    return rows


def part_new_size(ctx) -> dict:
    """The per-size index plan: its build time on this CPU, and the first forward at a new size
    against the next ones (the multi-scale training case)."""
    from hieradet_mmdet.models import HieraDet
    from hieradet_mmdet.models.token_layout import build_plan
    from hieradet_mmdet.reference import autocast

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
        bad += [f"check failed: {r['arch']} {r['name']} ({fmt(r['value'])} > {fmt(r['bound'])})"
                for r in checks.get("rows", []) if not r["ok"]]
        return bad

    def write(self) -> None:
        write_json(self.out_dir / "device_check.json", self.data)
        (self.out_dir / "device_check.md").write_text(markdown(self.data) + "\n")


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
    lines += ["", "## Checks", ""]
    lines += markdown_table(["check", "arch", "value", "bound", "ok"], [
        [r["name"], r["arch"], fmt(r["value"]) + (f" (birder {fmt(r['birder'])})" if "birder" in r else ""),
         fmt(r["bound"]), "yes" if r["ok"] else "**NO**"] for r in _result(data, "checks").get("rows", [])])
    timings = [r for r in _result(data, "timings").get("rows", []) if r.get("status") == "ok"]
    if timings:
        peak = {"bf16": peaks.get("bf16_tflops"), "fp32": peaks.get("fp32_tflops")}
        first = timings[0]
        busy = any(_result(data, "timings").get("mmcv_build_running") or [])
        lines += ["", f"## Backbone steps (median ms of {first['iters']} steps over {len(first['round_medians_ms'])} "
                  "interleaved rounds)", ""]
        if busy:
            lines += ["The mmcv build was compiling on the CPU (niced) during these steps.", ""]
        rows = []
        for r in timings:
            pct = 100 * r["tflops"] / peak[r["dtype"]] if r.get("tflops") and peak.get(r["dtype"]) else None
            rows.append([r["arch"], r["dtype"], r["mode"], r["model"], f"{r['median_ms']:.1f}", f"{r['vs_ours']:.3f}",
                         _pct(r["spread"]), fmt(r["tflops"]) if r["tflops"] else "-",
                         f"{pct:.1f}" if pct is not None else "-",
                         fmt(r["peak_above_start_gib"]) if r.get("peak_above_start_gib") is not None else "-"])
        lines += markdown_table(["arch", "dtype", "step", "model", "ms", "ms / ours", "round spread", "TFLOP/s",
                                 "% of matmul peak", "peak GiB above weights"], rows)
    lines += _summary_lines(data, timings)
    new = _result(data, "new_size")
    if new:
        lines += ["", "## A new input size", "",
                  "Plan build on this CPU: " + ", ".join(f"{k[len('plan_build_ms_'):]} {v:.0f} ms" for k, v in new.items()
                                                         if k.startswith("plan_build_ms_")) +
                  f"; first bf16 forward at {new['size']} (batch {new['batch']}) {new['first_forward_ms']:.1f} ms, "
                  f"the next ones {new['next_forwards_ms']:.1f} ms (plan cache holds {new['plan_cache_size']} sizes)."]
    det = _result(data, "detector") or {}
    det_part = data["parts"].get("detector") or {}
    lines += ["", "## Mask R-CNN train step (whole detector under bf16 autocast, AdamW)", ""]
    if det.get("rows"):
        lines += markdown_table(["detector", "batch x size", "ms / step", "images / s", "peak GiB", "losses finite"], [
            [r["model"], r["status"], "", "", "", ""] if r.get("status") != "ok" else
            [r["model"], f"{r['batch']} x {r['size'][0]}x{r['size'][1]}", f"{r['median_ms']:.0f}",
             f"{r['images_per_s']:.1f}", fmt(r["peak_gib"]) if r["peak_gib"] else "-", r["losses_finite"]]
            for r in det["rows"]])
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
        if model == "ours reference path" and (arch, dtype, mode, "ours") in by:
            ratio = r["median_ms"] / by[(arch, dtype, mode, "ours")]["median_ms"]
            use = "fast_path=True" if ratio > 1 else "the default (reference path)"
            lines.append(f"- {arch} {dtype} {mode}: reference path / fast path = {ratio:.3f}: use {use} here")
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


# ---- the command line (tools/device_check.py) --------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "work_dirs" / "device_check")
    parser.add_argument("--deadline", type=float, help="Unix time by which to finish (default: 7 min from now)")
    parser.add_argument("--mmcv-build", help="folder of tools/device_check.sh's background mmcv build")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise the code, measure nothing")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)}); machine always runs")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
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
