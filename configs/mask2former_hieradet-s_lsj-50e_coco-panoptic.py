# Mask2Former with a HieraDet-S backbone, COCO panoptic segmentation, LSJ at 1024, 50 epochs
# (368,750 iterations at batch 16). Train: python tools/train.py configs/mask2former_hieradet-s_lsj-50e_coco-panoptic.py
# MMDetection's Mask2Former R-50 panoptic config with the backbone swapped; its pipeline, queries,
# losses and iteration schedule are kept.
_base_ = [
    'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py',
    './_base_/hieradet_s.py',
]

model = dict(
    # RGB input normalised with the checkpoint's statistics; the base's LSJ padding is kept.
    data_preprocessor=_base_.hieradet_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.hieradet_s_backbone),
    panoptic_head=dict(in_channels=_base_.hieradet_s_channels))

optim_wrapper = dict(_delete_=True, **_base_.hieradet_mask2former_optim_wrapper)
auto_scale_lr = _base_.hieradet_auto_scale_lr
# Iteration-based like the base (validation every 5,000 iterations); checkpoints every 5,000
# iterations plus a rolling latest.pth every 10 minutes, resumed exactly at the next batch.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type='ResumableIterBasedTrainLoop')

# Panoptic quality (PQ, SQ, RQ over all classes, things and stuff) by MMDetection's
# CocoPanopticMetric (panopticapi's matching), and box / mask AP of the things by the fastest
# installed COCO evaluator with pycocotools' numbers (docs/configs.md).
val_evaluator = [
    dict(type='CocoPanopticMetric',
         ann_file='data/coco/annotations/panoptic_val2017.json',
         seg_prefix='data/coco/annotations/panoptic_val2017/'),
    dict(type='FastCocoMetric',
         ann_file='data/coco/annotations/instances_val2017.json',
         metric=['bbox', 'segm']),
]
test_evaluator = val_evaluator
