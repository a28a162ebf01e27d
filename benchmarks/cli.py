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
  detector-infer  --detector inference (mode='predict'), no autograd; Mask R-CNN's score
                  threshold is 0 so every model segments its 100 best detections
  detector-train  --detector train step: forward, losses, backward, AdamW step

Detectors (--detector): mask_rcnn (Mask R-CNN + FPN, the default), dino (DINO 4-scale) and
mask2former (Mask2Former, instance): configs/ for our models, MMDetection's configs for swin_t and
r50 (DINO with Swin-T: MMDetection's R-50 DINO with the Swin-T backbone, strides 8-32).

Models: hieradet_small / hieradet_d_small (this repo; windowed SAM2 layout / global layout),
hieradet_small_reference / hieradet_d_small_reference (the same, forced onto the reference path:
the table then says which path to run on --device), birder_small / birder_d_small (birder's own
HieraDet-S; backbone modes only; needs birder),
swin_t and r50 (MMDetection's SwinTransformer and ResNet-50, Mask R-CNN as in their configs).
HieraDet models get birder's weights when birder is importable (same seed as the birder rows),
so 'parity' is the max relative error of our outputs against birder's with the same weights;
bf16 rows also give the error against the same model in fp32 ('err_vs_fp32').

--checks first checks correctness on --device, for the archs of the HieraDet --models: ours
against birder with the same weights, outputs and gradients in float64 (1e-10 / 1e-9) and in fp32
against birder's float64 (within 4x birder's own fp32 error + 1e-6), bf16 and fp16 autocast
against fp32 next to birder's same error, with_cp gradients (stochastic depth on) against the same
step without it, and the fast path's plumbing there (benchmarks.parity); the exit
status is 1 when one fails. first_step_ms: a case's first step, in a process that has not seen
its size (the per-size index plan, first allocations).

FLOPs come from torch.utils.flop_counter.FlopCounterMode over one step (matmuls, convolutions
and attention, forward and backward; a multiply-add is two FLOPs); custom ops (mmcv RoIAlign,
NMS) are not counted.

Examples (the figures in docs/benchmarks.md):
  .venv/bin/python tools/benchmark.py --models hieradet_small birder_small --mode backbone \\
      --dtype fp32 bf16 --sizes 800x1344 --threads 2 --iters 10 --rounds 3 --out work_dirs/bench.json
  .venv/bin/python tools/benchmark.py --models hieradet_small --mode backbone-train --sizes 512x512 \\
      --batch 2 --with-cp both --threads 2 --iters 3 --malloc exact
On a GPU (docs/gpu.md): the checks, then times and memory of both paths, birder and with_cp:
  python tools/benchmark.py --device cuda --checks --models hieradet_small hieradet_small_reference \\
      birder_small --mode backbone backbone-train --dtype bf16 fp32 --sizes 1024x1024 --batch 8 \\
      --with-cp both --rounds 2 --out work_dirs/gpu.json
  python tools/benchmark.py --device cuda --models hieradet_small swin_t --mode detector-train \\
      --dtype bf16 --sizes 1024x1024 --batch 8 --out work_dirs/gpu_detector.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .cases import DETECTORS, DTYPES, MODELS, MODES, REPO, loadavg, run_case, run_paired
from .compiled import CASES as COMPILE_CASES
from .memory import EXACT_MALLOC_ENV
from .report import (amp_choice, comparisons, gemm_gflops, machine_info, markdown_table, merge_rounds, print_table,
                     summarize_times, text_table, write_json)

RESULT_TAG = "BENCHMARK_RESULT "


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
    parser.add_argument("--dtype", nargs="+", choices=DTYPES,
                        help="fp32 (the default), or bf16 autocast (weights stay fp32); --compile's default: fp32, "
                             "and bf16 where --amp chooses it here")
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
    parser.add_argument("--heads", choices=("neutral", "random"), default="neutral",
                        help="detector modes: 'neutral' zeroes the heads' output layers, so that every model's "
                             "heads get the same proposals and detections (the anchors) and do the same work; "
                             "'random' keeps the random initialisation, whose boxes depend on the backbone")
    parser.add_argument("--detector", choices=sorted(DETECTORS), default="mask_rcnn",
                        help="detector modes: the detector every model is put into (default mask_rcnn)")
    parser.add_argument("--config", help="detector modes, our models: this detector config instead of --detector's "
                                         "in configs/")
    parser.add_argument("--checkpoint", help="detector modes, our models: a trained checkpoint of --config's detector "
                                             "(bf16 rows then compare their detections with fp32's)")
    parser.add_argument("--images", nargs="+", metavar="IMAGE",
                        help="detector modes: these images (resized to --sizes) instead of random pixels")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also profile one step per case with torch.profiler and write its operator table here")
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds per isolated case")
    parser.add_argument("--resume-cost", nargs="+", type=int, metavar="K",
                        help="run nothing else: seconds from resuming at iteration K to the first new step, the "
                             "resumable training loop against MMEngine's replay of the trained batches "
                             "(benchmarks.resume_cost), e.g. --resume-cost 10 1000 100000")
    parser.add_argument("--coco-eval", nargs="?", type=int, const=5000, metavar="IMAGES",
                        help="run nothing else: seconds of COCO bbox and segm evaluation on a generated COCO-val-sized "
                             "result set of IMAGES images (default 5000), pycocotools against each faster backend, "
                             "with the largest difference of their 12 stats (benchmarks.coco_eval)")
    parser.add_argument("--coco-eval-data", type=Path, metavar="DIR",
                        help="--coco-eval: where the generated set is written once and reused "
                             "(default: $TMPDIR or /tmp, hieradet-mmdet-coco-eval/)")
    parser.add_argument("--compile", action="store_true",
                        help="run nothing else: torch.compile against eager as compile=True compiles (backbone and "
                             "neck), backbone alone and whole Mask R-CNN, inference and train step, compile time "
                             "cold and warm, graph breaks per part (benchmarks.compiled); the first "
                             "--sizes, --device, --threads, --iters, --warmup")
    parser.add_argument("--compile-cases", nargs="+", metavar="CASE", choices=COMPILE_CASES,
                        default=list(COMPILE_CASES),
                        help="with --compile: which of backbone-infer, backbone-train, detector-infer, detector-train")
    parser.add_argument("--compile-config", type=json.loads, default={}, metavar="JSON",
                        help="with --compile: a config's compile dict (torch.compile's keyword arguments), e.g. "
                             "'{\"options\": {\"layout_optimization\": true}}'")
    parser.add_argument("--checks", action="store_true",
                        help="first check correctness on --device (see above); exit status 1 if a check fails")
    parser.add_argument("--check-size", type=_parse_size, default=(512, 768), metavar="HxW",
                        help="--checks: input size (batch: --batch)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--from-json", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: print the table and comparisons of earlier --out files")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one JSON case, print result
    parser.add_argument("--group", help=argparse.SUPPRESS)  # internal: run JSON cases paired
    return parser


def make_cases(args) -> list[dict[str, Any]]:
    cps = {"off": [False], "on": [True], "both": [False, True]}[args.with_cp]
    cases = []
    for size in args.sizes:
        for mode in args.mode:
            for name in args.models:
                for dtype in args.dtype or ["fp32"]:
                    for with_cp in cps:
                        cases.append(dict(model=name, mode=mode, dtype=dtype, size=list(size), batch=args.batch,
                                          with_cp=with_cp, device=args.device, threads=args.threads,
                                          iters=args.iters, warmup=args.warmup, flops=args.flops,
                                          accuracy=args.accuracy, malloc=args.malloc, heads=args.heads,
                                          config=args.config, detector=args.detector,
                                          checkpoint=args.checkpoint, images=args.images,
                                          profile=str(args.profile) if args.profile else None))
    return cases


def run_isolated(cases: list[dict[str, Any]], paired: bool, timeout: float) -> list[dict[str, Any]]:
    """Run a case (or a paired group) in a fresh process; one result per case."""
    threads = str(cases[0]["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if cases[0].get("malloc") == "exact":
        env.update(EXACT_MALLOC_ENV)
    arg = ["--group", json.dumps(cases)] if paired else ["--case", json.dumps(cases[0])]
    cmd = [sys.executable, "-m", "benchmarks", *arg]
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


def run_checks(args) -> list[dict[str, Any]]:
    """--checks: the correctness checks on --device, printed as a table before anything is timed."""
    import torch

    from .parity import checks_table, run_checks as check

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    archs = sorted({MODELS[m]["arch"] for m in args.models if m.startswith("hieradet_")}) or ["small", "d_small"]
    rows = check(archs, args.device, (args.batch, 3, *args.check_size))
    print(f"checks on {args.device}, input {args.batch}x3x{args.check_size[0]}x{args.check_size[1]}:")
    for line in (markdown_table if args.markdown else text_table)(["check", "arch", "value", "bound", "ok"],
                                                                   checks_table(rows)):
        print(line)
    print(flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.case:
        print(RESULT_TAG + json.dumps(run_case(json.loads(args.case))), flush=True)
        return {}
    if args.group:
        print(RESULT_TAG + json.dumps(run_paired(json.loads(args.group))), flush=True)
        return {}
    if args.resume_cost:
        from . import resume_cost

        rows = resume_cost.measure(args.resume_cost)
        print(resume_cost.table(rows))
        if args.out:
            write_json(args.out, dict(command=" ".join(sys.argv), machine=machine_info("cpu"), resume_cost=rows))
        return dict(resume_cost=rows)
    if args.coco_eval:
        from . import coco_eval

        load_before = loadavg()
        report = coco_eval.measure(args.coco_eval, data_dir=str(args.coco_eval_data or coco_eval.DATA_DIR))
        report.update(load_before=load_before, load_after=loadavg())
        print(coco_eval.table(report))
        print(f"load average before/after: {load_before} / {report['load_after']}")
        if args.out:
            write_json(args.out, dict(command=" ".join(sys.argv), machine=machine_info("cpu"), coco_eval=report))
        return dict(coco_eval=report)
    if args.compile:
        from . import compiled

        rows = compiled.run_cases(args.compile_cases, args.sizes[0], args.device, args.threads, args.iters,
                                  args.warmup, args.compile_config, args.dtype or compiled.chosen_dtypes(args.device))
        machine = machine_info(args.device)
        machine["amp"] = amp_choice(args.device)
        print(compiled.table(rows))
        print(machine["amp"])
        print(f"\n{machine.get('gpu', machine['cpu'])}; threads {args.threads}; size {args.sizes[0][0]}x{args.sizes[0][1]}")
        for row in rows:
            for reason in (row.get("breaks") or {}).get("reasons", []):
                print(f"  {row['case']} break: {reason}")
        if args.out:
            write_json(args.out, dict(command=" ".join(sys.argv), machine=machine, compile=rows))
        return dict(compile=rows)
    if args.from_json:
        reports = [json.loads(path.read_text()) for path in args.from_json]
        results = [r for report in reports for r in report["results"]]
        print_table(results, markdown=args.markdown)
        for report in reports:
            print(f"\n{report['command']}\n  load before/after {report['load_before']} / {report['load_after']}, "
                  f"threads {report['threads']}, {report['machine']['cpu']}")
        for line in comparisons(results):
            print(line)
        return dict(results=results, comparisons=comparisons(results))
    cases = make_cases(args)
    if args.malloc == "exact" and not args.isolate:
        raise SystemExit("--malloc exact needs isolated cases (glibc reads it at process start); drop --no-isolate")
    checks = run_checks(args) if args.checks else None
    load_before = loadavg()
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
                results = run_isolated(group, args.paired, args.case_timeout)
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
    load_after = loadavg()
    machine = machine_info(args.device)
    gemm = machine["gemm_gflops"] = gemm_gflops(args.device, args.threads)
    machine["amp"] = amp_choice(args.device)
    results = [merge_rounds(r) for r in per_case]
    for r in results:
        summarize_times(r, gemm)
    report = dict(command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
                  else "tools/benchmark.py " + " ".join(shlex.quote(a) for a in argv),
                  machine=machine, threads=args.threads, device=args.device,
                  malloc=args.malloc, load_before=load_before, load_after=load_after, rounds=args.rounds,
                  results=results, comparisons=comparisons(results))
    if checks is not None:
        report["checks"] = checks
        report["checks_failed"] = sum(not r["ok"] for r in checks)
    print_table(results, markdown=args.markdown)
    print(f"\nload average before/after: {load_before} / {report['load_after']}; threads {args.threads}; "
          f"malloc {args.malloc}; {machine['cpu']}{'; ' + machine['gpu'] if 'gpu' in machine else ''}; "
          f"linear GFLOP/s fp32 {gemm['fp32']} / bf16 {gemm['bf16']}")
    print(machine["amp"])
    if checks is not None:
        print(f"checks on {args.device}: {len(checks) - report['checks_failed']} of {len(checks)} passed")
    for line in report["comparisons"]:
        print(line)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return report
