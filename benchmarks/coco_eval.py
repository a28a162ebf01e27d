"""Seconds of COCO bbox and segm evaluation, pycocotools against each faster backend, in one run.

On the generated COCO-val-sized set of :mod:`.coco_results` (written once under ``data_dir`` and
reused): per IoU type and backend, the seconds from the result list to the 12 stats (loadRes,
evaluate, accumulate, summarize; as ``FastCocoMetric`` spends them at every validation), the
seconds to index the ground truth (once per run in the metric), the speed-up over pycocotools
and the largest difference of the 12 stats from pycocotools'. Also the seconds our check of the
result file takes (``tools/coco_eval.py`` runs it; the metric does not need it).

    python tools/benchmark.py --coco-eval            # 5,000 images
    python tools/benchmark.py --coco-eval 500
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

from hieradet_mmdet.engine.coco_metric import (BACKENDS, check_results, evaluate, ground_truth, installed_backends,
                                               read_json, stats_of)

from .coco_results import describe, write_result_set

DATA_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "hieradet-mmdet-coco-eval")


def measure(num_images: int = 5000, backends: Optional[Sequence[str]] = None, seed: int = 0,
            data_dir: str = DATA_DIR, log: Callable[[str], None] = print) -> dict:
    """{'set': describe(...), 'rows': one row per (IoU type, backend)}; pycocotools runs first and
    is the reference, so it must be installed."""
    backends = [b for b in BACKENDS if b in (backends or installed_backends())]
    if "pycocotools" not in backends:
        raise ValueError("the comparison needs pycocotools, the reference")
    backends = ["pycocotools"] + [b for b in backends if b != "pycocotools"]
    start = time.perf_counter()
    gt_path, bbox_path, segm_path = write_result_set(data_dir, num_images, seed)
    log(f"result set: {os.path.dirname(gt_path)} ({time.perf_counter() - start:.1f} s to generate or find)")
    dataset = read_json(gt_path, "annotation")
    images = {img["id"]: img for img in dataset["images"]}
    categories = {c["id"] for c in dataset["categories"]}
    rows, summary = [], None
    for iou_type, path in (("bbox", bbox_path), ("segm", segm_path)):
        results = read_json(path, "result")
        if summary is None:
            summary = describe(dataset, results)
            log(f"set: {summary}")
        t = time.perf_counter()
        check_results(results, path, iou_type, images, categories)
        check_s = time.perf_counter() - t
        reference = None
        for backend in backends:
            t = time.perf_counter()
            gt = ground_truth(dataset, backend)
            gt_s = time.perf_counter() - t
            t = time.perf_counter()
            stats = stats_of(evaluate(gt, results, iou_type, backend))
            seconds = time.perf_counter() - t
            if reference is None:
                reference = dict(stats=stats, seconds=seconds)
            row = dict(iou_type=iou_type, backend=backend, seconds=round(seconds, 3), gt_index_s=round(gt_s, 3),
                       check_s=round(check_s, 3), speedup=round(reference["seconds"] / seconds, 2),
                       max_stat_diff=max(abs(a - b) for a, b in zip(stats, reference["stats"])), stats=stats)
            rows.append(row)
            log(f"{iou_type} {backend}: {seconds:.2f} s (x{row['speedup']:.1f}), "
                f"max stat difference {row['max_stat_diff']:.1e}")
            del gt
    return dict(set=summary, rows=rows)


def table(report: dict) -> str:
    lines = ["| IoU type | backend | seconds | speed-up | max stat diff | index GT (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['iou_type']} | {r['backend']} | {r['seconds']:.2f} | x{r['speedup']:.1f} | "
                     f"{r['max_stat_diff']:.1e} | {r['gt_index_s']:.2f} |")
    checks = {r["iou_type"]: r["check_s"] for r in report["rows"]}
    lines.append("checking the result file: " + ", ".join(f"{k} {v:.2f} s" for k, v in checks.items()))
    return "\n".join(lines)
