"""What ``tools/train.py`` and ``tools/test.py`` add around MMEngine's ``Runner``.

* :func:`enforce_safe_loading`: every ``torch.load`` in the process runs weights-only (the
  allowlist of :mod:`hieradet_mmdet.weights.safe_globals` on top of torch's own), and
  :func:`hieradet_mmdet.weights.digest.check_checkpoint` refuses a file that would need more up
  front, naming it.
* :func:`prepare_config`: whatever the config, the safety this package offers through MMEngine's
  own extension points: data-parallel settings (:mod:`.distributed`), crash-safe checkpoints
  (:mod:`.checkpointing`), the non-finite loss check (:mod:`.finite_loss`), image and annotation
  loading that names broken files (:mod:`.transforms`, :mod:`.datasets`), detector checks
  (:mod:`.checks`), COCO metrics in a fraction of pycocotools' time (:mod:`.coco_metric`),
  ``compile = True`` that never stops a run (:mod:`.compile`).
"""

from __future__ import annotations

import os
from typing import Optional

from ..weights.reader import allow_mmengine_types
from .distributed import data_parallel_config

# MMEngine's training loops -> the ones that resume inside an epoch without reloading data (.loops)
RESUMABLE_LOOP_TYPES = {"EpochBasedTrainLoop": "ResumableEpochBasedTrainLoop",
                        "mmengine.EpochBasedTrainLoop": "ResumableEpochBasedTrainLoop",
                        "IterBasedTrainLoop": "ResumableIterBasedTrainLoop",
                        "mmengine.IterBasedTrainLoop": "ResumableIterBasedTrainLoop"}
CHECKED_TYPES = {"LoadImageFromFile": "CheckedLoadImageFromFile", "mmdet.LoadImageFromFile": "CheckedLoadImageFromFile",
                 "mmcv.LoadImageFromFile": "CheckedLoadImageFromFile", "CocoDataset": "CheckedCocoDataset",
                 "mmdet.CocoDataset": "CheckedCocoDataset"}
# MMDetection's COCO metric -> the same metric evaluated faster, with the same numbers (.coco_metric)
FAST_METRIC_TYPES = {"CocoMetric": "FastCocoMetric", "mmdet.CocoMetric": "FastCocoMetric"}


def enforce_safe_loading() -> None:
    """Make every ``torch.load`` in this process weights-only, whatever its caller passes.

    torch honours ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` even over an explicit ``weights_only=False``;
    an inherited ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is dropped (torch refuses both at once).
    """
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    allow_mmengine_types()


def prepare_config(cfg, launcher: str = "none", dist_timeout_s: Optional[float] = None):
    """Adapt a loaded MMDetection config to this machine and our tools (in place; returns it)."""
    cfg.launcher = launcher
    data_parallel_config(cfg, launcher, dist_timeout_s)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(key) is not None:
            _replace_types(cfg[key], CHECKED_TYPES)
    for key in ("val_evaluator", "test_evaluator"):
        if cfg.get(key) is not None:
            _replace_types(cfg[key], FAST_METRIC_TYPES)
    wanted = ["HieraDetCheckHook", "FiniteLossHook", "CompileHook"] + (["HeartbeatHook"] if launcher != "none" else [])
    hooks = list(cfg.get("custom_hooks") or [])
    present = {h.get("type") for h in hooks}
    cfg.custom_hooks = hooks + [dict(type=t) for t in wanted if t not in present]
    train_cfg = cfg.get("train_cfg")
    if train_cfg is not None and train_cfg.get("type") in RESUMABLE_LOOP_TYPES:
        train_cfg["type"] = RESUMABLE_LOOP_TYPES[train_cfg["type"]]
    checkpoint = (cfg.get("default_hooks") or {}).get("checkpoint")
    if checkpoint is not None and checkpoint.get("type") in ("CheckpointHook", "mmengine.CheckpointHook"):
        checkpoint["type"] = "SafeCheckpointHook"
    return cfg


def _replace_types(node, mapping: dict) -> None:
    """Replace registered ``type`` names throughout a config subtree (in place)."""
    if isinstance(node, dict):
        if node.get("type") in mapping:
            node["type"] = mapping[node["type"]]
        for value in node.values():
            _replace_types(value, mapping)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _replace_types(value, mapping)


def build_runner(cfg):
    """The runner the config asks for (``runner_type``), else MMEngine's ``Runner``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
