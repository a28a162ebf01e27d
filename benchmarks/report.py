"""Reports: tables as text or Markdown (one renderer for every benchmark here), the JSON files,
the benchmark's comparisons, and what the machine is."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from .cases import DTYPES
from .timing import time_steps


# ---- tables, numbers, files -------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """The lines of a Markdown table; the columns numbered in ``right`` aligned right."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return ["| " + " | ".join(str(c) for c in cells) + " |" for cells in (header, rule, *rows)]


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a plain-text table in aligned columns (the last one as long as it is)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]

    def line(cells):
        return "  ".join(str(c).ljust(widths[i]) if i < len(widths) else str(c) for i, c in enumerate(cells))

    return [line(header), line(["-" * w for w in widths] + ["-" * len(header[-1])]), *(line(row) for row in rows)]


def fmt(v) -> str:
    """A number for a table: four significant digits, or powers of ten when very large or small."""
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.4g}"
        return f"{v:.2e}"
    return str(v)


def write_json(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
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
    if all("backbone_ms" in r for r in ok):
        merged["backbone_ms"] = [t for r in ok for t in r["backbone_ms"]]
    merged["round_medians_ms"] = [statistics.median(r["times_ms"]) for r in ok]
    merged["load_timed"] = [r.get("load_timed") for r in ok]
    for key in ("peak_mem_mb", "peak_delta_mb"):
        if all(key in r for r in ok):
            merged[key] = statistics.median(r[key] for r in ok)
    merged["rounds_ok"] = len(ok)
    return merged


def summarize_times(result: dict[str, Any], linear_gflops: Optional[dict[str, float]] = None) -> None:
    """Medians, p90, images/s; for detectors the time in and outside the backbone; the achieved
    GFLOP/s and its share of what one linear layer reaches on this machine in the same dtype."""
    times = sorted(result.get("times_ms") or [])
    if not times:
        return
    result["median_ms"] = statistics.median(times)
    result["p90_ms"] = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    result["mean_ms"] = statistics.fmean(times)
    result["images_per_s"] = result["batch"] * 1e3 / result["median_ms"]
    if result.get("backbone_ms"):
        result["outside_ms"] = [t - b for t, b in zip(result["times_ms"], result["backbone_ms"])]
        result["backbone_median_ms"] = statistics.median(result["backbone_ms"])
        result["outside_median_ms"] = statistics.median(result["outside_ms"])
    if "gflops" in result:
        result["gflop_per_s"] = result["gflops"] / (result["median_ms"] / 1e3)
        peak = (linear_gflops or {}).get(result["dtype"])
        if peak:
            result["of_linear_peak"] = result["gflop_per_s"] / peak


def _find(results, **match) -> Optional[dict[str, Any]]:
    for r in results:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def comparisons(results: list[dict[str, Any]]) -> list[str]:
    """The ratios users ask about (ours vs birder, with_cp memory, HieraDet-S vs Swin-T), as far
    as the results contain both sides."""
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
                for mode in ("backbone", "backbone-train"):
                    fast = _find(results, model=f"hieradet_{arch}", mode=mode, dtype=dtype, size=s, with_cp=False)
                    slow = _find(results, model=f"hieradet_{arch}_reference", mode=mode, dtype=dtype, size=s,
                                 with_cp=False)
                    if fast and slow:
                        lines.append(_path_choice(f"{mode} {tag} {arch} {dtype}", fast, slow))
                if ours and "first_step_ms" in ours:
                    lines.append(f"backbone {tag} {arch} {dtype}: first step at this size {ours['first_step_ms']:.0f} ms "
                                 f"(its index plan, first allocations), then {ours['median_ms']:.0f} ms")
        for name in ("hieradet_small", "hieradet_d_small"):
            off = _find(results, model=name, mode="backbone-train", dtype="fp32", size=s, with_cp=False)
            on = _find(results, model=name, mode="backbone-train", dtype="fp32", size=s, with_cp=True)
            if off and on and "peak_delta_mb" in off and "peak_delta_mb" in on:
                lines.append(f"{name} backbone-train {tag} (malloc {on.get('malloc', 'glibc')}) with_cp peak delta "
                             f"{on['peak_delta_mb']:.0f} MB vs "
                             f"{off['peak_delta_mb']:.0f} MB -> {on['peak_delta_mb'] / off['peak_delta_mb']:.2f}x; "
                             f"time {on['median_ms'] / off['median_ms']:.2f}x")
            for mode in ("detector-infer", "detector-train"):
                for dtype in DTYPES:
                    ours = _find(results, model=name, mode=mode, dtype=dtype, size=s, with_cp=False)
                    swin = _find(results, model="swin_t", mode=mode, dtype=dtype, size=s, with_cp=False)
                    if ours and swin:
                        lines.append(f"{mode} {tag} {dtype}: {name} / swin_t: time {_ratio(ours, swin, 'times_ms')}"
                                     f", outside the backbone {_ratio(ours, swin, 'outside_ms')}")
                ours32 = _find(results, model=name, mode=mode, dtype="fp32", size=s, with_cp=False)
                ours16 = _find(results, model=name, mode=mode, dtype="bf16", size=s, with_cp=False)
                if ours32 and ours16:
                    lines.append(f"{mode} {tag} {name}: bf16 runs {ours32['median_ms'] / ours16['median_ms']:.2f}x "
                                 "as fast as fp32")
    return lines


def _path_choice(what: str, fast: dict[str, Any], reference: dict[str, Any]) -> str:
    """Which path of the trunk to run on the device the two rows were measured on."""
    from hieradet_mmdet.models.hieradet import FAST_PATH_DEVICES

    device = fast["device"]
    ratio = reference["median_ms"] / fast["median_ms"]
    use = "fast_path=True" if ratio > 1 else "fast_path=False"
    default = "fast" if device in FAST_PATH_DEVICES else "reference"
    return (f"{what}: reference path / fast path = {ratio:.3f}x -> on {device} use {use} "
            f"(the default here is the {default} path)")


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    """a / b of a per-iteration time: the median of the per-iteration ratios when the two ran paired
    (interleaved in one process, so load changes hit both alike), else the ratio of the medians."""
    if key not in a or key not in b:
        return "n/a"
    if a.get("paired_with") and len(a[key]) == len(b[key]):
        return f"{statistics.median(x / y for x, y in zip(a[key], b[key])):.2f}x (paired, {len(a[key])} pairs)"
    return f"{statistics.median(a[key]) / statistics.median(b[key]):.2f}x"


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
    agree = r.get("agreement_vs_fp32")
    if agree:
        ious = (f", box IoU >= {agree['min_box_iou']:.3f}" if agree["min_box_iou"] is not None else "") + \
            (f", mask IoU >= {agree['min_mask_iou']:.3f}" if agree["min_mask_iou"] is not None else "")
        parts.append(f"{agree['matched']}/{agree['fp32_detections']} fp32 detections >= {agree['score_thr']} "
                     f"found{ious}")
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


def print_table(results: list[dict[str, Any]], file=None, markdown: bool = False) -> None:
    """The benchmark's results, one row a case."""
    header = ["model", "mode", "dtype", "input", "cp", "median ms", "p90 ms", "img/s", "backbone ms", "outside ms",
              "peak MB", "delta MB", "GFLOPs", "GFLOP/s", "of linear", "load", "accuracy (max rel / norm rel)"]
    rows = []
    for r in results:
        size = f"{r['batch']}x{r['size'][0]}x{r['size'][1]}"
        mode = r["mode"] if not r["mode"].startswith("detector") else f"{r['mode']} {r.get('detector', 'mask_rcnn')}"
        first = [r["model"], mode, r["dtype"], size, "on" if r["with_cp"] else ""]
        if r.get("status") != "ok":
            rows.append(first + [""] * 11 + [f"{r.get('status')}: {r.get('reason', '')}"[:160]])
            continue
        rows.append(first + [f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['images_per_s']:.3f}",
                             f"{r['backbone_median_ms']:.1f}" if "backbone_median_ms" in r else "",
                             f"{r['outside_median_ms']:.1f}" if "outside_median_ms" in r else "",
                             f"{r['peak_mem_mb']:.0f}" if "peak_mem_mb" in r else "paired",
                             f"{r['peak_delta_mb']:.0f}" if "peak_delta_mb" in r else "",
                             f"{r['gflops']:.1f}" if "gflops" in r else "",
                             f"{r['gflop_per_s']:.0f}" if "gflop_per_s" in r else "",
                             f"{r['of_linear_peak']:.0%}" if "of_linear_peak" in r else "",
                             _fmt_load(r), _fmt_acc(r)])
    for line in (markdown_table if markdown else text_table)(header, rows):
        print(line, file=file)


# ---- the machine ------------------------------------------------------------------------------

def _cpuinfo(key: str) -> Optional[str]:
    """The first ``key`` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == key), None)
    except OSError:
        return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> Optional[list[str]]:
    """The CPU's instruction-set flags (None where /proc/cpuinfo cannot say)."""
    flags = _cpuinfo("flags")
    return flags.split() if flags is not None else None


def machine_info(device: str) -> dict[str, Any]:
    import datetime
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                cpu=cpu_name(), cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                mkldnn=torch.backends.mkldnn.is_available(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                packages={name: installed(name) for name in ("birder", "mmengine", "mmcv", "mmdet", "numpy")})
    flags = cpu_flags()
    if flags is not None:
        info["cpu_bf16_flags"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32))
    return info


def amp_choice(device: str) -> str:
    """What ``tools/train.py --amp`` does on this machine and why (bf16 rows of the table run bf16
    autocast whatever the choice, so that both can be compared)."""
    import torch

    from hieradet_mmdet.engine.amp import choose_mixed_precision

    return choose_mixed_precision("auto", device == "cuda" and torch.cuda.is_available())[1]


def gemm_gflops(device: str, threads: int, tokens: int = 8192, dim: int = 384, hidden: int = 1536,
                budget_s: float = 3.0) -> dict[str, float]:
    """Best throughput of one MLP-sized linear (tokens x dim -> hidden) in fp32 and bf16: the
    machine's practical limit for the cases' GFLOP/s, and whether bf16 can pay off at all here.
    Without AMX, AVX-512 BF16 dot products do no more multiply-adds per cycle than fp32 FMAs, and
    the conversions come on top; without any bf16 instructions (AVX2-only CPUs) bf16 products are
    emulated and run tens of times slower than fp32. Each dtype gets about ``budget_s``: up to 20
    runs, with fewer tokens where one run of ``tokens`` would not fit (emulated bf16). The best
    run, not the median: a 10 ms bf16 product is easily slowed by a neighbour on a shared machine,
    never sped up."""
    import torch

    device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows = min(tokens, 256)
        w = torch.randn(hidden, dim, device=device, dtype=dtype)
        probe = _timed_linear(torch.randn(rows, dim, device=device, dtype=dtype), w, device)
        # as many rows as let 20 runs fit into the budget (never more than asked for)
        rows = max(rows, min(tokens, int(rows * budget_s / 20 / max(probe, 1e-9))))
        x = torch.randn(rows, dim, device=device, dtype=dtype)
        times = [_timed_linear(x, w, device)]  # warm-up at this size
        spent = times[0]
        times = []
        while len(times) < 20 and (spent < budget_s or len(times) < 2):
            times.append(_timed_linear(x, w, device))
            spent += times[-1]
        out[name] = round(2 * rows * dim * hidden / min(times) / 1e9, 1)
    torch.set_num_threads(previous)
    return out


def _timed_linear(x, w, device: str) -> float:
    """Seconds of one product."""
    import torch.nn.functional as F

    return time_steps(lambda: F.linear(x, w), 1, device)[0] / 1e3
