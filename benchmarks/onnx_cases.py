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
import os
import os.path as osp
import statistics
import sys
import tempfile

from .cases import REPO
from .report import cpu_flags, cpu_name, markdown_table, write_json
from .timing import interleaved, warm_up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per row (after 2 warm-up ones)")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "800x1344"], help="backbone input sizes HxW")
    parser.add_argument("--detector-size", default="800x1344", help="RetinaNet padded input HxW ('' to skip)")
    parser.add_argument("--out", help="also write the rows as JSON")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from hieradet_mmdet.torch_compat import export_unsupported

    if export_unsupported():
        print(f"error: {export_unsupported()}", file=sys.stderr)
        return 2
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows.extend(backbone_rows(tuple(int(v) for v in size.split("x")), args, tmp))
        if args.detector_size:
            rows.extend(retinanet_rows(tuple(int(v) for v in args.detector_size.split("x")), args, tmp))
    print(f"CPU: {cpu_description()}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; median of {args.iters} runs")
    for line in markdown_table(["model", "input", "runtime", "ms", "vs eager"],
                               [[r["model"], r["input"], r["runtime"], f"{r['ms']:.0f}", f"{r['vs_eager']:.2f}x"]
                                for r in rows], right=(3, 4)):
        print(line)
    if args.out:
        write_json(args.out, {"cpu": cpu_description(), "threads": args.threads, "rows": rows})
    return 0


def timed(runs: dict, iters: int) -> dict:
    """Median wall time in milliseconds of each named callable, after two warm-up calls each. The
    callables take turns within every iteration, so load that changes over time (other jobs on
    the machine) hits them alike."""
    for fn in runs.values():
        warm_up(fn, 2, "cpu")
    times = interleaved(runs, 1, "cpu", rounds=iters)
    return {name: statistics.median(t for block in blocks for t in block) for name, blocks in times.items()}


def _rows(model: str, label: str, ms: dict, runtimes: dict) -> list[dict]:
    """One row a runtime (name in ``ms`` -> how the table calls it), against the first one."""
    eager = ms[next(iter(runtimes))]
    return [dict(model=model, input=label, runtime=runtime, ms=ms[name], vs_eager=ms[name] / eager)
            for name, runtime in runtimes.items()]


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
    return _rows("HieraDet-S backbone", f"{size[0]}x{size[1]}", ms, {
        "eager": "PyTorch eager (fast path)", "reference": "PyTorch eager (reference path, exported)",
        "ort": "onnxruntime"})


def retinanet_rows(size, args, tmp):
    import torch
    from mmengine.structures import InstanceData  # noqa: F401  (MMDetection's data samples need it)

    from hieradet_mmdet.detectors import build_detector, load_config
    from hieradet_mmdet.export.detector import exportable_detector, output_names
    from hieradet_mmdet.export.exporting import export_onnx, onnx_session
    from mmdet.structures import DetDataSample

    cfg = load_config(osp.join(REPO, "configs", "retinanet_hieradet_s.py"),
                      {"model.backbone.init_cfg": None, "model.test_cfg.score_thr": 0.0})
    model = build_detector(cfg).eval()
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
    return _rows("RetinaNet HieraDet-S", f"{size[0]}x{size[1]}", ms, {
        "eager": "MMDetection predict (eager)", "graph": "exported graph in PyTorch (eager)", "ort": "onnxruntime"})


def cpu_description() -> str:
    """The CPU's name, cores and the vector extensions that matter here."""
    flags = cpu_flags() or []
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{cpu_name()} ({os.cpu_count()} cores; {', '.join(extras) or 'no AVX-512'})"
