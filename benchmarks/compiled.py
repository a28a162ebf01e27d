"""torch.compile against eager, side by side: what ``compile = True`` compiles (the backbone and
the neck, ``hieradet_mmdet.engine.compile``), on the backbone alone and inside the whole detector,
for inference and the train step, with graph breaks counted and compile time cold and warm.

    tools/benchmark.py --compile [--sizes 512x512] [--device cuda] [--threads 2] [--iters 5] [--dtype ...]

fp32, and bf16 autocast where ``--amp`` chooses it on the machine (``--dtype`` picks others).

Each (model, mode) runs in fresh processes with a fresh inductor cache directory: the first
process compiles cold, a second one with that cache warm (inductor's FX graph and kernel caches:
what a second training run on the same machine pays). Times are medians of the timed iterations
after the compile; eager and compiled steps of one process take turns (eager: the same modules with
their compiled forward switched off, so HieraDet runs its eager CPU fast path; and once more with
HieraDet on its reference path, the computation the compiled backbone traces: compiled against
that is what the compiler buys, the reference path against the fast path what the fast path does).

Graph breaks come from ``torch._dynamo.explain`` over the whole detector's loss (training) or
predict (inference) call, attributed to the part of the model whose code broke the graph:
backbone (this package's model), neck, heads (MMDetection's heads and what they call), other
(the detector's glue).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from .cases import REPO

RESULT_TAG = "COMPILE_RESULT "
CASES = ("backbone-infer", "backbone-train", "detector-infer", "detector-train")
PART_PATHS = (("backbone", ("hieradet_mmdet/models",)), ("neck", ("mmdet/models/necks",)),
              ("heads", ("mmdet/models/dense_heads", "mmdet/models/roi_heads", "mmdet/models/task_modules",
                         "mmdet/models/layers", "mmdet/models/losses", "mmdet/structures", "mmcv/")))


def part_of(stack) -> str:
    """The part of the detector whose code a graph break's user stack ends in."""
    for frame in reversed(list(stack)):
        path = frame.filename.replace(os.sep, "/")
        for part, prefixes in PART_PATHS:
            if any(prefix in path for prefix in prefixes):
                return part
    return "other"


def graph_breaks(fn, *args, training: bool = False) -> dict[str, Any]:
    """Graphs and graph breaks dynamo makes of ``fn(*args)`` (forward; with autograd when
    ``training``), the breaks per part and their reasons (16 at most, those in the heads last)."""
    import torch
    import torch._dynamo

    with torch.enable_grad() if training else torch.no_grad():
        out = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    per_part: dict[str, int] = {}
    reasons = set()
    for reason in out.break_reasons:
        part = part_of(reason.user_stack)
        per_part[part] = per_part.get(part, 0) + 1
        where = reason.user_stack[-1] if reason.user_stack else None
        reasons.add((part == "heads", f"{part}: {reason.reason.splitlines()[0][:120]}"
                     + (f" ({os.path.basename(where.filename)}:{where.lineno})" if where else "")))
    if out.graph_break_count > len(out.break_reasons):  # breaks explain counts without a recorded reason
        per_part["unattributed"] = out.graph_break_count - len(out.break_reasons)
    return dict(graphs=out.graph_count, graph_breaks=out.graph_break_count, per_part=per_part,
                reasons=[text for _, text in sorted(reasons)][:16])  # MMDetection's heads' last


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _setup(case: dict[str, Any]):
    """(module to compile in place, eager step, step to count breaks over with its args, training)."""
    import torch

    from .cases import SEED, case_detector, detector_autocast, detector_batch, make_ours
    from .reference import autocast

    device, size, dtype = case["device"], tuple(case["size"]), case.get("dtype", "fp32")
    kind, mode = case["case"].split("-")
    training = mode == "train"
    torch.manual_seed(SEED)
    if kind == "backbone":
        model = make_ours("small", size).to(device).train(training)
        x = torch.randn(1, 3, *size, device=device)

        def run():
            with autocast(device, dtype):
                return model(x)
        return model, [model], run, (run, ()), training
    model = case_detector("hieradet_small", heads="neutral").to(device).train(training)
    inputs, samples = detector_batch(model, 1, size, training, device)

    def run():  # the detector under autocast as ``--amp`` runs it
        with detector_autocast(model, dtype):
            if training:
                loss, _ = model.parse_losses(model(inputs, samples, mode="loss"))
                return loss
            return model(inputs, samples, mode="predict")
    return model, [model.backbone, model.neck], run, (run, ()), training


def _step(model, run, training: bool):
    import torch

    if not training:
        def step():
            with torch.no_grad():
                return run()
        return step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = run()
        loss = out if isinstance(out, torch.Tensor) else sum(o.float().pow(2).mean() for o in out)
        loss.backward()
        optimizer.step()
    return step


def run_one(case: dict[str, Any]) -> dict[str, Any]:
    """In this process: eager and compiled steps of one case, interleaved (see the module docstring),
    with dynamo's and inductor's settings as CompileHook sets them for a run (and put back after)."""
    from hieradet_mmdet.engine.compile import run_settings

    with contextlib.ExitStack() as settings:
        for config, name, value in run_settings(case["case"].endswith("-train"), case["device"]):
            settings.enter_context(config.patch({name: value}))
        return _run_one(case)


def _run_one(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from hieradet_mmdet.engine.compile import compile_options

    torch.set_num_threads(case["threads"])
    device = case["device"]
    model, parts, run, (count_fn, count_args), training = _setup(case)
    result: dict[str, Any] = dict(case)
    if case["count_breaks"]:
        result["breaks"] = graph_breaks(count_fn, *count_args, training=training)
    step = _step(model, run, training)
    for _ in range(case["warmup"]):
        step()
    _sync(device)
    eager_times, compiled_times = [], []

    def timed(times):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)

    for part in parts:  # as ``compile = True`` compiles them
        part.compile(**compile_options(dict(compile=dict(dict(backend="inductor"), **case["compile"]))))
    compiled = [part._compiled_call_impl for part in parts]
    t0 = time.perf_counter()
    step()
    _sync(device)
    result["compile_s"] = time.perf_counter() - t0
    step()  # a second call: guards and any recompilation for the train/eval or grad state
    hieradet = getattr(model, "backbone", model)
    fast_path = hieradet.fast_path
    reference_times: list[float] = []
    for _ in range(case["iters"]):  # eager, eager on the reference path and compiled take turns
        for part in parts:
            part._compiled_call_impl = None
        timed(eager_times)
        hieradet.fast_path = False
        timed(reference_times)
        hieradet.fast_path = fast_path
        for part, impl in zip(parts, compiled):
            part._compiled_call_impl = impl
        timed(compiled_times)
    result["eager_ms"] = statistics.median(eager_times)
    result["reference_ms"] = statistics.median(reference_times)
    result["compiled_ms"] = statistics.median(compiled_times)
    result["speedup"] = result["eager_ms"] / result["compiled_ms"]
    return result


def chosen_dtypes(device: str) -> list[str]:
    """fp32, and bf16 where ``--amp`` chooses bf16 autocast on this machine (a CPU with fast bf16)."""
    import torch

    from hieradet_mmdet.engine import amp

    chosen, _ = amp.choose_mixed_precision("auto", device == "cuda" and torch.cuda.is_available())
    return ["fp32", "bf16"] if chosen == torch.bfloat16 else ["fp32"]


def run_cases(cases: list[str], size, device: str, threads: int, iters: int, warmup: int,
              compile_config: Optional[dict] = None, dtypes: Sequence[str] = ("fp32",)) -> list[dict[str, Any]]:
    """Every case and dtype in two fresh processes sharing a new inductor cache: cold, then warm;
    ``compile_config``: a config's ``compile`` dict (default: inductor, as ``compile = True``)."""
    rows = []
    for name, dtype in itertools.product(cases, dtypes):
        with tempfile.TemporaryDirectory(prefix="hieradet-inductor-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS=str(threads))
            row: Optional[dict[str, Any]] = None
            for temperature in ("cold", "warm"):
                case = dict(case=name, size=list(size), device=device, threads=threads, iters=iters, warmup=warmup,
                            count_breaks=temperature == "cold", compile=compile_config or {}, dtype=dtype)
                cmd = [sys.executable, "-m", "benchmarks.compiled", json.dumps(case)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
                found = [json.loads(line[len(RESULT_TAG):]) for line in proc.stdout.splitlines()
                         if line.startswith(RESULT_TAG)]
                if not found:
                    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                    row = dict(case=name, dtype=dtype, status=f"error: {tail[:300]}")
                    break
                if temperature == "cold":
                    row = dict(found[0], status="ok", compile_cold_s=found[0]["compile_s"])
                else:
                    row["compile_warm_s"] = found[0]["compile_s"]
                    row["warm_eager_ms"], row["warm_compiled_ms"] = found[0]["eager_ms"], found[0]["compiled_ms"]
                    row["warm_reference_ms"] = found[0]["reference_ms"]
                breaks = found[0].get("breaks", {})
                print(f"{name} {dtype} {temperature}: compile {found[0]['compile_s']:.1f} s, eager {found[0]['eager_ms']:.1f} ms, "
                      f"compiled {found[0]['compiled_ms']:.1f} ms"
                      + (f", graph breaks {breaks['graph_breaks']} {breaks['per_part']}" if breaks else ""),
                      file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table (Markdown)."""
    lines = ["| case | eager ms | eager, reference path ms | compiled ms | speed-up | over the reference path | "
             "compile cold s | compile warm s | graphs | graph breaks (backbone / neck / heads / other / unattributed) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        name = r["case"] + ("" if r.get("dtype", "fp32") == "fp32" else f" {r['dtype']}")
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')} |")
            continue
        # both processes' timed iterations: the median of the two medians' pair
        eager = statistics.median([r["eager_ms"], r["warm_eager_ms"]])
        compiled = statistics.median([r["compiled_ms"], r["warm_compiled_ms"]])
        reference = statistics.median([r["reference_ms"], r["warm_reference_ms"]])
        b = r.get("breaks", {})
        parts = b.get("per_part", {})
        split = " / ".join(str(parts.get(p, 0)) for p in ("backbone", "neck", "heads", "other", "unattributed"))
        lines.append(f"| {name} | {eager:.1f} | {reference:.1f} | {compiled:.1f} | {eager / compiled:.2f}x | "
                     f"{reference / compiled:.2f}x | "
                     f"{r['compile_cold_s']:.1f} | {r['compile_warm_s']:.1f} | {b.get('graphs', '')} | "
                     f"{b.get('graph_breaks', '')} ({split}) |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(RESULT_TAG + json.dumps(run_one(json.loads(args[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
