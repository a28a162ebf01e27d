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

import copy
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


def prepare_config(cfg, launcher: str = "none", dist_timeout_s: Optional[float] = None,
                   changes: Optional[list] = None):
    """Adapt a loaded MMDetection config to this machine and our tools (in place; returns it).
    Each change is appended to ``changes`` as one line ("checkpoint hook: CheckpointHook ->
    SafeCheckpointHook"), for the tools to log (:func:`log_config_changes`)."""
    said = changes if changes is not None else []
    cfg.launcher = launcher
    before = {key: copy.deepcopy(cfg.get(key)) for key in ("model_wrapper_cfg", "env_cfg")}
    data_parallel_config(cfg, launcher, dist_timeout_s)
    for key, old in before.items():
        if cfg.get(key) != old:
            said.append(f"{key}: {_plain(old)} -> {_plain(cfg.get(key))} (data-parallel on this machine)")
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(key) is not None:
            _replace_types(cfg[key], CHECKED_TYPES, key, said)
    for key in ("val_evaluator", "test_evaluator"):
        if cfg.get(key) is not None:
            _replace_types(cfg[key], FAST_METRIC_TYPES, key, said)
    wanted = ["HieraDetCheckHook", "FiniteLossHook", "CompileHook"] + (["HeartbeatHook"] if launcher != "none" else [])
    hooks = list(cfg.get("custom_hooks") or [])
    present = {h.get("type") for h in hooks}
    added = [t for t in wanted if t not in present]
    cfg.custom_hooks = hooks + [dict(type=t) for t in added]
    if added:
        said.append(f"custom_hooks: + {', '.join(added)}")
    train_cfg = cfg.get("train_cfg")
    if train_cfg is not None and train_cfg.get("type") in RESUMABLE_LOOP_TYPES:
        _set_type(train_cfg, RESUMABLE_LOOP_TYPES, "train loop", said)
    checkpoint = (cfg.get("default_hooks") or {}).get("checkpoint")
    if checkpoint is not None and checkpoint.get("type") in ("CheckpointHook", "mmengine.CheckpointHook"):
        _set_type(checkpoint, {checkpoint["type"]: "SafeCheckpointHook"}, "checkpoint hook", said)
    return cfg


def log_config_changes(changes: list) -> None:
    """One line in the run's log (console and file) for every change :func:`prepare_config` made."""
    from mmengine.logging import print_log

    for line in changes:
        print_log(f"config change: {line}", logger="current")


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def _set_type(node: dict, mapping: dict, where: str, said: list) -> None:
    old = node["type"]
    node["type"] = mapping[old]
    said.append(f"{where}: {old} -> {node['type']}")


def _replace_types(node, mapping: dict, where: str, said: list) -> None:
    """Replace registered ``type`` names throughout a config subtree (in place)."""
    if isinstance(node, dict):
        if node.get("type") in mapping:
            _set_type(node, mapping, where, said)
        for key, value in node.items():
            _replace_types(value, mapping, f"{where}.{key}", said)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _replace_types(value, mapping, f"{where}[{i}]", said)


def build_runner(cfg):
    """The runner the config asks for (``runner_type``), else MMEngine's ``Runner``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
