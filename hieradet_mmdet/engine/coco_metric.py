"""COCO box and mask evaluation in a fraction of pycocotools' time, with pycocotools' numbers.

``type='FastCocoMetric'`` is MMDetection's ``CocoMetric`` (same arguments, same metric names and
values, ``classwise`` and ``proposal`` included) whose matching and accumulation run in hotcoco
(Rust) where it is installed, else in faster-coco-eval (C++), else in pycocotools; every one of
the 12 bbox and 12 segm stats equals pycocotools' (tests/engine/test_coco_metric.py; the
COCO-val-sized comparison and timings: ``tools/benchmark.py --coco-eval``). ``backend=`` forces
one. Our configs use it, through MMDetection's tools too; our tools put it in place of any
``CocoMetric``.

It also says what it is doing on a large set (a log line per stage with its seconds, and with
pycocotools every tenth of the images), refuses a malformed annotation file with one line naming
the file and its first bad entry before anything runs, and writes its result files
(``outfile_prefix``) whole or not at all.

:func:`evaluate_files` evaluates a result file written earlier (``tools/coco_eval.py``), checking
it the same way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import os.path as osp
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import numpy as np
from mmdet.datasets.api_wrappers import COCO as MMDetCOCO
from mmdet.evaluation import CocoMetric
from mmdet.registry import METRICS
from mmengine.fileio import get_local_path, load
from mmengine.logging import MMLogger

BACKENDS = ("hotcoco", "faster_coco_eval", "pycocotools")  # fastest first
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR@1", "AR@10", "AR@100", "AR_small", "AR_medium", "AR_large")  # with the default maxDets
# CocoMetric's names for the 12 stats (its maxDets are its proposal_nums, 100 / 300 / 1000)
MMDET_STAT_INDEX = {"mAP": 0, "mAP_50": 1, "mAP_75": 2, "mAP_s": 3, "mAP_m": 4, "mAP_l": 5,
                    "AR@100": 6, "AR@300": 7, "AR@1000": 8, "AR_s@1000": 9, "AR_m@1000": 10, "AR_l@1000": 11}
PROGRESS_STEPS = 10  # pycocotools: a log line every tenth of the images


class CocoFileError(ValueError):
    """An annotation or result file that cannot be evaluated; the message is one line naming the
    file and its first bad entry."""


def installed_backends() -> list[str]:
    out = []
    for name in BACKENDS:
        try:
            __import__(name)
        except ImportError:
            continue
        out.append(name)
    return out


def resolve_backend(name: str = "auto") -> str:
    """``'auto'``: the fastest installed; otherwise the one named, which must be installed."""
    if name == "auto":
        found = installed_backends()
        if not found:
            raise ImportError("COCO evaluation needs pycocotools (or hotcoco / faster-coco-eval)")
        return found[0]
    if name not in BACKENDS:
        raise ValueError(f"COCO evaluation backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    __import__(name)  # ImportError naming it when it is missing
    return name


# ---- reading and checking files ------------------------------------------------------------------

def read_json(path: str, what: str):
    """The JSON in ``path``; a CocoFileError naming it when it is missing, empty or not JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CocoFileError(f"cannot read {what} file {path}: {err.strerror or err}") from None
    if not data.strip():
        raise CocoFileError(f"cannot read {what} file {path}: the file is empty")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFileError(f"cannot read {what} file {path}: not valid JSON ({err})") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _box_problem(box) -> Optional[str]:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_number(v) for v in box):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {_short(box)}"
    if box[2] < 0 or box[3] < 0:
        return f"bbox has a negative width or height: {_short(box)}"
    return None


def _segmentation_problem(seg, image: Optional[dict]) -> Optional[str]:
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_number(v) for v in p)
                              for p in seg):
            return f"segmentation polygons must be lists of at least 3 x, y pairs, got {_short(seg)}"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_integer(v) for v in size)):
            return f"RLE segmentation needs size [height, width], got {_short(size)}"
        if not isinstance(counts, (str, list)):
            return f"RLE segmentation needs counts (a string or a list), got {_short(counts)}"
        if image is not None and list(size) != [image.get("height"), image.get("width")]:
            return (f"RLE size {size} is not the image's [height, width] "
                    f"[{image.get('height')}, {image.get('width')}]")
        return None
    return f"segmentation must be polygons or an RLE dict, got {_short(seg)}"


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_annotations(dataset, path: str) -> None:
    """Raise a CocoFileError naming ``path`` and the first entry pycocotools or the faster
    evaluators would fail on or misread."""
    where = f"annotation file {path}"
    if not isinstance(dataset, dict):
        raise CocoFileError(f"{where}: not COCO annotations (a JSON object with images, annotations and "
                            f"categories), got a {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise CocoFileError(f"{where}: '{key}' must be a list, got {_short(dataset.get(key))}")
    images = {}
    for i, img in enumerate(dataset["images"]):
        ok = isinstance(img, dict) and _integer(img.get("id")) and _integer(img.get("width")) \
            and _integer(img.get("height")) and img["width"] > 0 and img["height"] > 0
        if not ok:
            raise CocoFileError(f"{where}: images[{i}] needs an integer id and positive integer width and height, "
                                f"got {_short(img)}")
        images[img["id"]] = img
    categories = set()
    for i, cat in enumerate(dataset["categories"]):
        if not (isinstance(cat, dict) and _integer(cat.get("id"))):
            raise CocoFileError(f"{where}: categories[{i}] needs an integer id, got {_short(cat)}")
        categories.add(cat["id"])
    for i, ann in enumerate(dataset["annotations"]):
        problem = _annotation_problem(ann, images, categories)
        if problem:
            ident = f" (id {ann.get('id')})" if isinstance(ann, dict) and "id" in ann else ""
            raise CocoFileError(f"{where}: annotations[{i}]{ident}: {problem}")


def _annotation_problem(ann, images: dict, categories: set) -> Optional[str]:
    if not isinstance(ann, dict):
        return f"not an object: {_short(ann)}"
    if not _integer(ann.get("id")):
        return f"needs an integer id, got {_short(ann.get('id'))}"
    if ann.get("image_id") not in images:
        return f"image_id {_short(ann.get('image_id'))} is not in images"
    if ann.get("category_id") not in categories:
        return f"category_id {_short(ann.get('category_id'))} is not in categories"
    problem = _box_problem(ann.get("bbox"))
    if problem:
        return problem
    if not _number(ann.get("area")) or ann["area"] < 0:
        return f"area must be a number >= 0, got {_short(ann.get('area'))}"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd must be 0 or 1, got {_short(ann.get('iscrowd'))}"
    if "segmentation" in ann:
        return _segmentation_problem(ann["segmentation"], images[ann["image_id"]])
    return None


def check_results(results, path: str, iou_type: str, images: dict, categories: Optional[set]) -> None:
    """Raise a CocoFileError naming ``path`` and the first result that cannot be evaluated against
    the ground truth (``images``: id -> image entry; ``categories``: ids, None to accept any)."""
    where = f"result file {path}"
    if not isinstance(results, list):
        raise CocoFileError(f"{where}: COCO results must be a JSON list of detections, got a "
                            f"{type(results).__name__}")
    for i, res in enumerate(results):
        try:  # the common case in one cheap test; the slow one below says what is wrong
            fine = res["image_id"] in images and (categories is None or res["category_id"] in categories) \
                and _number(res["score"]) and (
                    _box_problem(res["bbox"]) is None if iou_type == "bbox"
                    else _segmentation_problem(res["segmentation"], images[res["image_id"]]) is None)
        except (KeyError, TypeError):
            fine = False
        if not fine:
            raise CocoFileError(f"{where}: entry {i}: {_result_problem(res, iou_type, images, categories)}")


def _result_problem(res, iou_type: str, images: dict, categories: Optional[set]) -> str:
    if not isinstance(res, dict):
        return f"not an object: {_short(res)}"
    for key in ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation"):
        if key not in res:
            return f"no '{key}' in {_short(res)}"
    if res["image_id"] not in images:
        return f"image_id {_short(res['image_id'])} is not in the annotation file's images"
    if categories is not None and res["category_id"] not in categories:
        return f"category_id {_short(res['category_id'])} is not in the annotation file's categories"
    if not _number(res["score"]):
        return f"score must be a finite number, got {_short(res['score'])}"
    if iou_type == "bbox":
        return _box_problem(res["bbox"]) or "malformed"
    return _segmentation_problem(res["segmentation"], images[res["image_id"]]) or "malformed"


# ---- evaluation ------------------------------------------------------------------------------------

def ground_truth(dataset: dict, backend: str):
    """The backend's COCO object for an annotation dict (copied: pycocotools and faster-coco-eval
    turn polygons into RLEs in place when they evaluate masks)."""
    if backend != "hotcoco":
        dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):  # 'creating index...'
        if backend == "hotcoco":
            import hotcoco

            return hotcoco.COCO(dataset)
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCO
        else:
            from pycocotools.coco import COCO
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        return gt


def _pycocotools_eval_with_progress(log: Callable[[str], None], name: str):
    from pycocotools.cocoeval import COCOeval

    class ProgressCOCOeval(COCOeval):
        """pycocotools' COCOeval, logging each tenth of its two slow loops (IoUs, matching)."""

        def _tick(self, stage: str, per_image: int) -> None:
            done = self._calls[stage] = self._calls.get(stage, 0) + 1
            total = len(self.params.imgIds) * per_image
            step = max(1, total // PROGRESS_STEPS)
            if done % step == 0 and done < total:
                log(f"{name}: {stage} {100 * done // total}% of {len(self.params.imgIds):,} images")

        def _categories(self) -> int:
            return len(self.params.catIds) if self.params.useCats else 1

        def evaluate(self):
            self._calls = {}
            return super().evaluate()

        def computeIoU(self, imgId, catId):
            self._tick("IoUs", self._categories())
            return super().computeIoU(imgId, catId)

        def evaluateImg(self, imgId, catId, aRng, maxDet):
            self._tick("matching", self._categories() * len(self.params.areaRng))
            return super().evaluateImg(imgId, catId, aRng, maxDet)

    return ProgressCOCOeval


def evaluate(gt, results: list, iou_type: str, backend: str, *, cat_ids: Optional[Sequence[int]] = None,
             img_ids: Optional[Sequence[int]] = None, max_dets: Optional[Sequence[int]] = None,
             iou_thrs=None, use_cats: bool = True, log: Callable[[str], None] = lambda message: None):
    """Evaluate COCO-format ``results`` (a list of dicts, not changed) against ``gt`` (from
    :func:`ground_truth` with the same ``backend``); returns the evaluator after summarize():
    ``.stats`` (12 numbers as pycocotools gives them) and ``.eval['precision']``."""
    start = time.perf_counter()
    name = f"{iou_type} ({backend})"
    stdout = sys.stdout  # the libraries' own prints are silenced below, not ours

    def say(message: str) -> None:
        with contextlib.redirect_stdout(stdout):
            log(message)

    say(f"{name}: loading {len(results):,} results")
    results = [dict(r) for r in results]  # pycocotools' loadRes adds keys to the dicts it gets
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, warnings.catch_warnings():
        # hotcoco warns on MMDetection's maxDets (100, 300, 1000) and on class-agnostic proposals
        warnings.filterwarnings("ignore", message="hotcoco:")
        detections = gt.loadRes(results)
        if backend == "hotcoco":
            from hotcoco import COCOeval
        elif backend == "faster_coco_eval":
            from faster_coco_eval import COCOeval_faster as COCOeval
        else:
            COCOeval = _pycocotools_eval_with_progress(say, name)
        evaluator = COCOeval(gt, detections, iou_type)
        if backend == "faster_coco_eval":
            evaluator.print_function = lambda *args: None
        params = evaluator.params  # hotcoco hands out a copy: set it back below
        if cat_ids is not None:
            params.catIds = list(cat_ids)
        if img_ids is not None:
            params.imgIds = list(img_ids)
        if max_dets is not None:
            params.maxDets = list(max_dets)
        if iou_thrs is not None:
            params.iouThrs = np.asarray(iou_thrs, dtype=np.float64) if backend != "hotcoco" else list(iou_thrs)
        params.useCats = int(use_cats) if backend != "hotcoco" else bool(use_cats)
        evaluator.params = params
        loaded = time.perf_counter()
        say(f"{name}: loaded in {loaded - start:.2f} s; matching "
            f"{len(evaluator.params.imgIds):,} images")
        evaluator.evaluate()
        matched = time.perf_counter()
        say(f"{name}: matched in {matched - loaded:.2f} s; accumulating")
        evaluator.accumulate()
        evaluator.summarize()
    say(f"{name}: done in {time.perf_counter() - start:.2f} s")
    return evaluator


def stats_of(evaluator) -> list[float]:
    return [float(v) for v in list(evaluator.stats)[:12]]


def evaluate_files(ann_file: str, result_file: str, iou_type: str, backend: str = "auto",
                   log: Callable[[str], None] = print) -> dict[str, float]:
    """Check and evaluate a COCO result file against an annotation file; {stat name: value}."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    backend = resolve_backend(backend)
    dataset = read_json(ann_file, "annotation")
    check_annotations(dataset, ann_file)
    results = read_json(result_file, "result")
    images = {img["id"]: img for img in dataset["images"]}
    check_results(results, result_file, iou_type, images, {c["id"] for c in dataset["categories"]})
    if not results:
        raise CocoFileError(f"result file {result_file}: no detections to evaluate")
    if iou_type == "segm":  # as CocoMetric: mask areas from the masks, not from their boxes
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    evaluator = evaluate(ground_truth(dataset, backend), results, iou_type, backend, log=log)
    return dict(zip(STAT_NAMES, stats_of(evaluator)))


# ---- the metric ------------------------------------------------------------------------------------

@METRICS.register_module()
class FastCocoMetric(CocoMetric):
    """MMDetection's CocoMetric, evaluated by the fastest installed backend (``backend='auto'``)
    or the one named: ``'hotcoco'``, ``'faster_coco_eval'``, ``'pycocotools'``."""

    def __init__(self, ann_file: Optional[str] = None, *args, backend: str = "auto", **kwargs) -> None:
        self.backend = resolve_backend(backend)
        self._backend_gt = None
        super().__init__(None, *args, **kwargs)
        if ann_file is not None:
            with get_local_path(ann_file, backend_args=self.backend_args) as local_path:
                dataset = read_json(local_path, "annotation")
            check_annotations(dataset, ann_file)
            if kwargs.get("sort_categories", False):
                dataset["categories"] = sorted(dataset["categories"], key=lambda c: c["id"])
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco_api = MMDetCOCO()
                self._coco_api.dataset = dataset
                self._coco_api.createIndex()
                self._coco_api.img_ann_map, self._coco_api.cat_img_map = \
                    self._coco_api.imgToAnns, self._coco_api.catToImgs

    def results2json(self, results: Sequence[dict], outfile_prefix: str) -> dict:
        """CocoMetric's result files, written under temporary names and renamed when complete."""
        partial = f"{outfile_prefix}.partial{os.getpid()}"
        try:
            files = super().results2json(results, partial)
        except BaseException:
            for suffix in (".bbox.json", ".segm.json", ".proposal.json"):
                with contextlib.suppress(OSError):
                    os.remove(partial + suffix)
            raise
        final = {}
        for key, path in files.items():
            target = outfile_prefix + path[len(partial):]
            if osp.exists(path):
                os.replace(path, target)
            final[key] = target
        return final

    def _evaluation_gt(self):
        if self._backend_gt is None or self._backend_gt[0] is not self._coco_api:
            dataset = self._coco_api.dataset
            if self.backend == "pycocotools":
                self._backend_gt = (self._coco_api, self._coco_api)
            else:
                self._backend_gt = (self._coco_api, ground_truth(dataset, self.backend))
        return self._backend_gt[1]

    def compute_metrics(self, results: list) -> dict[str, float]:
        logger: MMLogger = MMLogger.get_current_instance()
        gts, preds = zip(*results)
        tmp_dir = None
        if self.outfile_prefix is None:
            tmp_dir = tempfile.TemporaryDirectory()
            outfile_prefix = osp.join(tmp_dir.name, "results")
        else:
            outfile_prefix = self.outfile_prefix
        try:
            if self._coco_api is None:
                logger.info("Converting ground truth to coco format...")
                path = self.gt_to_coco_json(gt_dicts=gts, outfile_prefix=outfile_prefix)
                with contextlib.redirect_stdout(io.StringIO()):
                    self._coco_api = MMDetCOCO(path)
            if self.cat_ids is None:
                self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta["classes"])
            if self.img_ids is None:
                self.img_ids = self._coco_api.get_img_ids()
            result_files = self.results2json(preds, outfile_prefix)
            if self.format_only:
                logger.info(f"results are saved in {osp.dirname(outfile_prefix)}")
                return OrderedDict()
            return self._evaluate(preds, result_files, logger)
        finally:
            if tmp_dir is not None:
                tmp_dir.cleanup()

    def _evaluate(self, preds, result_files: dict, logger) -> dict[str, float]:
        eval_results = OrderedDict()
        for item in self.metric_items or ():
            if item not in MMDET_STAT_INDEX:
                raise KeyError(f'metric item "{item}" is not supported')
        for metric in self.metrics:
            logger.info(f"Evaluating {metric}...")
            if metric == "proposal_fast":
                ar = self.fast_eval_recall(preds, self.proposal_nums, self.iou_thrs, logger=logger)
                for num, value in zip(self.proposal_nums, ar):
                    eval_results[f"AR@{num}"] = value
                logger.info("".join(f"\nAR@{num}\t{value:.4f}" for num, value in zip(self.proposal_nums, ar)))
                continue
            iou_type = "bbox" if metric == "proposal" else metric
            if metric not in result_files:
                raise KeyError(f"{metric} is not in results")
            predictions = load(result_files[metric])
            if not predictions:
                logger.error("The testing results of the whole dataset is empty.")
                break
            if iou_type == "segm":  # mask areas from the masks, as CocoMetric (not from their boxes)
                for p in predictions:
                    p.pop("bbox", None)
            evaluator = evaluate(self._evaluation_gt(), predictions, iou_type, self.backend,
                                 cat_ids=self.cat_ids, img_ids=self.img_ids, max_dets=self.proposal_nums,
                                 iou_thrs=self.iou_thrs, use_cats=metric != "proposal",
                                 log=lambda message: logger.info(message))
            stats = stats_of(evaluator)
            if metric == "proposal":
                items = self.metric_items or ["AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000",
                                              "AR_l@1000"]
                for item in items:
                    eval_results[item] = float(f"{stats[MMDET_STAT_INDEX[item]]:.3f}")
                continue
            if self.classwise:
                eval_results.update(self._classwise(np.asarray(evaluator.eval["precision"]), logger))
            for item in self.metric_items or ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"]:
                eval_results[f"{metric}_{item}"] = float(f"{round(stats[MMDET_STAT_INDEX[item]], 3)}")
            ap = stats[:6]
            logger.info(f"{metric}_mAP_copypaste: " + " ".join(f"{v:.3f}" for v in ap))
        return eval_results

    def _classwise(self, precisions: np.ndarray, logger) -> dict[str, float]:
        """CocoMetric's per-category AP (and its table): precision is (iou, recall, class, area, maxdets)."""
        from terminaltables import AsciiTable

        def mean(p):
            p = p[p > -1]
            return float(np.mean(p)) if p.size else float("nan")

        out, rows = {}, []
        for idx, cat_id in enumerate(self.cat_ids):
            name = self._coco_api.loadCats(cat_id)[0]["name"]
            values = [mean(precisions[:, :, idx, 0, -1]), mean(precisions[0, :, idx, 0, -1]),
                      mean(precisions[5, :, idx, 0, -1])] + [mean(precisions[:, :, idx, a, -1]) for a in (1, 2, 3)]
            out[f"{name}_precision"] = round(values[0], 3)
            rows.append([name] + [f"{round(v, 3)}" for v in values])
        headers = ["category", "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"]
        logger.info("\n" + AsciiTable([headers] + rows).table)
        return out


__all__ = ["BACKENDS", "CocoFileError", "FastCocoMetric", "check_annotations", "check_results", "evaluate",
           "evaluate_files", "ground_truth", "installed_backends", "read_json", "resolve_backend", "stats_of"]
