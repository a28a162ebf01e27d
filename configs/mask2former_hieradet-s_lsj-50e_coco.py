# Mask2Former with a HieraDet-S backbone, COCO instance segmentation (80 thing classes, box and mask
# AP), LSJ at 1024, 50 epochs (368,750 iterations at batch 16): MMDetection's Mask2Former R-50
# instance config with the backbone swapped, set up as the panoptic twin.
_base_ = [
    'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco.py',
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

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
