"""Time exported models in onnxruntime against the eager PyTorch models, side by side in one run.

    python tools/onnx_benchmark.py [--threads 2] [--iters 5] [--sizes 512x512 800x1344] [--out FILE.json]

Rows: the HieraDet-S backbone (SAM2 windows, as in configs/) at each size, batch 1 — eager fast
path (what training and MMDetection run), eager reference path (what is exported) and the
onnxruntime file written by tools/export.py's exporter; and RetinaNet HieraDet-S
(configs/retinanet_hieradet_s.py, 800x1344 padded input, test score_thr 0 so that NMS has its
full 1000 candidates per level) — MMDetection's predict against the exported graph. Weights are
random (speed does not depend on them). The runtimes of a row group take turns in every
iteration, so a change of load during the run hits them alike. Prints a Markdown table and the
CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per row (after 2 warm-up ones)")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "800x1344"], help="backbone input sizes HxW")
    parser.add_argument("--detector-size", default="800x1344", help="RetinaNet padded input HxW ('' to skip)")
    parser.add_argument("--out", help="also write the rows as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows.extend(backbone_rows(tuple(int(v) for v in size.split("x")), args, tmp))
        if args.detector_size:
            rows.extend(retinanet_rows(tuple(int(v) for v in args.detector_size.split("x")), args, tmp))
    print(f"CPU: {cpu_name()}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; median of {args.iters} runs")
    print("| model | input | runtime | ms | vs eager |")
    print("| --- | --- | --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['input']} | {row['runtime']} | {row['ms']:.0f} | {row['vs_eager']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": args.threads, "rows": rows}, f, indent=2)
    return 0


def timed(runs: dict, iters: int) -> dict:
    """Median wall time in milliseconds of each named callable, after two warm-up calls each. The
    callables take turns within every iteration, so load that changes over time (other jobs on
    the machine) hits them alike."""
    for fn in runs.values():
        for _ in range(2):
            fn()
    times = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def backbone_rows(size, args, tmp):
    import torch

    from hieradet_mmdet.export.exporting import export_onnx, onnx_session
    from hieradet_mmdet.models import HieraDet

    model = HieraDet("small").eval()
    x = torch.randn(1, 3, *size)
    path = osp.join(tmp, f"backbone_{size[0]}x{size[1]}.onnx")
    export_onnx(model, (x,), path, ["input"], ["stage1", "stage2", "stage3", "stage4"],
                {"input": {0: "N", 2: "H", 3: "W"}})
    session = onnx_session(path, args.threads)
    feed = {"input": x.numpy()}
    with torch.no_grad():
        ms = timed({"eager": lambda: model(x), "reference": lambda: model.forward_reference(x),
                    "ort": lambda: session.run(None, feed)}, args.iters)
    eager, reference, ort = ms["eager"], ms["reference"], ms["ort"]
    label = f"{size[0]}x{size[1]}"
    return [dict(model="HieraDet-S backbone", input=label, runtime="PyTorch eager (fast path)", ms=eager, vs_eager=1.0),
            dict(model="HieraDet-S backbone", input=label, runtime="PyTorch eager (reference path, exported)",
                 ms=reference, vs_eager=reference / eager),
            dict(model="HieraDet-S backbone", input=label, runtime="onnxruntime", ms=ort, vs_eager=ort / eager)]


def retinanet_rows(size, args, tmp):
    import torch
    from mmengine.structures import InstanceData  # noqa: F401  (MMDetection's data samples need it)

    from hieradet_mmdet.export.config import build_detector, load_config
    from hieradet_mmdet.export.detector import exportable_detector, output_names
    from hieradet_mmdet.export.exporting import export_onnx, onnx_session
    from mmdet.structures import DetDataSample

    cfg = load_config(osp.join(REPO, "configs", "retinanet_hieradet_s.py"),
                      {"model.backbone.init_cfg": None, "model.test_cfg.score_thr": 0.0})
    model, _ = build_detector(cfg, None)
    x = torch.randn(1, 3, *size)
    img_shape = torch.tensor([list(size)])
    sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, scale_factor=(1.0, 1.0),
                                         batch_input_shape=size, pad_shape=size))
    graph = exportable_detector(model)
    path = osp.join(tmp, "retinanet.onnx")
    export_onnx(graph, (x, img_shape), path, ["input", "img_shape"], output_names(graph),
                {"input": {0: "N", 2: "H", 3: "W"}, "img_shape": {0: "N"}})
    session = onnx_session(path, args.threads)
    feed = {"input": x.numpy(), "img_shape": img_shape.numpy()}
    with torch.no_grad():
        ms = timed({"eager": lambda: model.predict(x, [sample], rescale=False),
                    "graph": lambda: graph(x, img_shape), "ort": lambda: session.run(None, feed)}, args.iters)
    eager, graph_eager, ort = ms["eager"], ms["graph"], ms["ort"]
    label = f"{size[0]}x{size[1]}"
    return [dict(model="RetinaNet HieraDet-S", input=label, runtime="MMDetection predict (eager)", ms=eager,
                 vs_eager=1.0),
            dict(model="RetinaNet HieraDet-S", input=label, runtime="exported graph in PyTorch (eager)",
                 ms=graph_eager, vs_eager=graph_eager / eager),
            dict(model="RetinaNet HieraDet-S", input=label, runtime="onnxruntime", ms=ort, vs_eager=ort / eager)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
                    extras = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
                    return f"{name} ({os.cpu_count()} cores; {', '.join(extras) or 'no AVX-512'})"
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
