"""Short CPU training runs of MMDetection configs: the demo's, and the tests' tiny ones.

* :func:`small_run_overrides`: config entries for an iteration schedule of a few hundred steps
  with fewer proposals and RoI samples than COCO's defaults;
* :func:`set_num_classes`: a detector config of any family for another number of classes;
* :func:`calm_mask_logits`: the mask head's logit layer scaled for few classes;
* :func:`metric_values`: COCO metrics of a run, 0 for what MMDetection leaves out.
"""

from __future__ import annotations

from typing import Optional

METRIC_ROWS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75")


def small_run_overrides(max_iters: int, batch_size: int = 2, lr: float = 1e-4, warmup_iters: int = 50,
                        log_interval: int = 10, num_workers: int = 0, num_classes: Optional[int] = None,
                        rcnn_samples: int = 128, max_dets: int = 50, proposals: int = 300,
                        with_mask: bool = True) -> dict:
    """``cfg.merge_from_dict`` entries for short CPU runs of a two-stage MMDetection config.

    Iteration-based schedule of ``max_iters`` (linear warmup, then cosine to 1% of ``lr``), the
    config's optimizer at a fixed ``lr`` (``auto_scale_lr`` off), one checkpoint at the end, a
    log line every ``log_interval`` iterations, no validation during training, and fewer
    proposals / sampled RoIs / kept detections than COCO's defaults so a step is cheap.
    Keys that a config does not have (e.g. RoI settings for RetinaNet) are still set, so use
    it with Faster R-CNN (``with_mask=False``) or Mask R-CNN style configs.
    """
    warmup_iters = max(1, min(warmup_iters, max_iters // 2))
    loader = dict(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)
    over = {
        "train_cfg": dict(_delete_=True, type="ResumableIterBasedTrainLoop", max_iters=max_iters,
                          val_interval=max_iters + 1),
        "param_scheduler": [
            dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
            dict(type="CosineAnnealingLR", by_epoch=False, begin=warmup_iters, end=max(max_iters, warmup_iters + 1),
                 T_max=max(1, max_iters - warmup_iters), eta_min=lr * 0.01),
        ],
        "optim_wrapper.optimizer.lr": lr,
        "auto_scale_lr.enable": False,
        "train_dataloader": dict(loader, sampler=dict(type="DefaultSampler", shuffle=True)),
        "val_dataloader": dict(batch_size=1, num_workers=num_workers, persistent_workers=num_workers > 0),
        "test_dataloader": dict(batch_size=1, num_workers=num_workers, persistent_workers=num_workers > 0),
        "default_hooks.logger.interval": log_interval,
        "default_hooks.checkpoint": dict(type="SafeCheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=2),
        "log_processor": dict(type="LogProcessor", window_size=log_interval, by_epoch=False),
        "model.train_cfg.rpn_proposal.nms_pre": 4 * proposals,
        "model.train_cfg.rpn_proposal.max_per_img": proposals,
        "model.train_cfg.rcnn.sampler.num": rcnn_samples,
        "model.test_cfg.rpn.nms_pre": 4 * proposals,
        "model.test_cfg.rpn.max_per_img": proposals,
        "model.test_cfg.rcnn.max_per_img": max_dets,
    }
    if num_classes is not None:
        over["model.roi_head.bbox_head.num_classes"] = num_classes
        if with_mask:
            over["model.roi_head.mask_head.num_classes"] = num_classes
    return over


def set_num_classes(model, num_classes: int, num_stuff_classes: int = 0) -> None:
    """A detector config (``cfg.model``, in place) for ``num_classes`` thing classes, whatever the
    family: dense and DETR heads, (cascade) RoI box and mask heads, Mask2Former's heads (with
    ``num_stuff_classes`` stuff classes; the no-object class keeps Mask2Former's 0.1 weight)."""
    if model.get("bbox_head") is not None:
        model.bbox_head.num_classes = num_classes
    roi = model.get("roi_head")
    if roi is not None:
        for part in ("bbox_head", "mask_head"):
            heads = roi.get(part)
            for head in heads if isinstance(heads, list) else [heads] if heads is not None else []:
                head.num_classes = num_classes
    for name in ("panoptic_head", "panoptic_fusion_head"):
        if model.get(name) is not None:
            model[name].update(num_things_classes=num_classes, num_stuff_classes=num_stuff_classes)
    if model.get("panoptic_head") is not None:
        model.panoptic_head.loss_cls.class_weight = [1.0] * (num_classes + num_stuff_classes) + [0.1]


def calm_mask_logits(model, reference_classes: int = 80) -> None:
    """Scale the mask head's logit layer to what it gets for COCO's 80 classes.

    MMDetection initialises ``conv_logits`` with Kaiming fan-out, i.e. std sqrt(2 / num_classes):
    with our 3 classes 5x larger than with 80, which starts the mask loss at ~3.4 instead of
    ~0.7 and lets its gradients swamp everything else for the first hundred iterations."""
    conv = getattr(getattr(getattr(model, "roi_head", None), "mask_head", None), "conv_logits", None)
    if conv is not None and conv.out_channels < reference_classes:
        import torch

        with torch.no_grad():
            conv.weight.mul_((conv.out_channels / reference_classes) ** 0.5)


def metric_values(metrics: dict) -> dict:
    """{'bbox_mAP': ..., ...}; MMDetection's CocoMetric returns nothing at all when the model
    detected nothing (typical before training), which is an AP of 0."""
    values = {k.split("/")[-1]: float(v) for k, v in (metrics or {}).items()}
    return {key: values.get(key, 0.0) for key in METRIC_ROWS} | {k: v for k, v in values.items() if k not in METRIC_ROWS}
