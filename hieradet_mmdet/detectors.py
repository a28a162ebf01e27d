"""Configs and the detectors built from them: what the tools, the export and the tests share.

* :func:`load_config`: a config file with ``--cfg-options`` merged in, in MMDetection's scope;
  :func:`set_work_dir`: the work dir MMDetection's tools choose.
* :func:`build_detector`: the config's detector with every module registered, and a checkpoint's
  weights loaded strictly (weights-only; every weight must fit) or the model's own initial weights.
"""

from __future__ import annotations

import os.path as osp
from typing import Optional

from torch import nn

from . import mmengine_adapter as mmengine_api

DEFAULT_SCOPE = "mmdet"


def load_config(path: str, cfg_options: Optional[dict] = None):
    """An MMEngine Config from ``path``, ``cfg_options`` (``--cfg-options``) merged, default scope
    ``mmdet`` unless the config names one.

    The config text MMEngine logs and writes into the work dir is not run through yapf: formatting
    a detector config takes 1-3 s each time (a Runner does it twice), and the text is the same
    Python either way."""
    from mmengine.config import Config

    cfg = Config.fromfile(path)
    mmengine_api.skip_config_formatting(cfg)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.setdefault("default_scope", DEFAULT_SCOPE)
    return cfg


def set_work_dir(cfg, config_path: str, work_dir: Optional[str] = None):
    """``cfg.work_dir``: ``work_dir`` if given, else the config's own, else
    ``./work_dirs/CONFIG_NAME`` (as MMDetection's tools do). Returns the config."""
    cfg.work_dir = work_dir or cfg.get("work_dir") or osp.join("./work_dirs", osp.splitext(osp.basename(config_path))[0])
    return cfg


def register_modules() -> None:
    """MMDetection's modules and this package's in MMDetection's registries (also when
    ``hieradet_mmdet`` was imported before MMDetection was importable, as on a GPU machine whose
    mmcv was built meanwhile)."""
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    from . import engine  # noqa: F401  (the wrappers, constructor, loops, transform, hooks)
    from .models import backbone  # noqa: F401  (type='HieraDet')


def build_detector(cfg, checkpoint: Optional[str] = None) -> nn.Module:
    """The config's detector on the CPU in eval mode, ``cfg`` as ``model.cfg``.

    With a checkpoint, its state dict must fit the detector exactly (else CheckpointError saying
    what is missing or unexpected), the backbone's ``init_cfg`` is then not loaded, and
    ``model.dataset_meta`` is the checkpoint's (as ``mmdet.apis.init_detector`` has it). Without
    one, the model's ``init_weights`` runs (e.g. the published backbone weights), the heads keep
    their random initial values and ``model.dataset_meta`` is empty."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from .weights.digest import check_checkpoint
    from .weights.fit import load_whole_model

    register_modules()
    init_default_scope(cfg.get("default_scope", DEFAULT_SCOPE))
    if checkpoint:
        check_checkpoint(checkpoint)
        if cfg.model.get("backbone", {}).get("init_cfg") is not None:
            cfg.model.backbone.init_cfg = None  # the checkpoint holds the backbone
    model = MODELS.build(cfg.model)
    if checkpoint:
        meta = load_whole_model(model, checkpoint, "the detector of the config")
        model.dataset_meta = dict(meta.get("dataset_meta") or {})
    else:
        _quiet_init_weights(model)
        model.dataset_meta = {}
    model.cfg = cfg
    return model.eval()


def _quiet_init_weights(model: nn.Module) -> None:
    """init_weights without MMEngine's INFO line for every parameter."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
