# Mask R-CNN + FPN with a HieraDet-S backbone, COCO instance segmentation, 1x schedule (12 epochs).
# Train: python tools/train.py configs/maskrcnn_hieradet_s.py  (lr scales with the total batch)
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/hieradet_s.py',
]

model = dict(
    data_preprocessor=_base_.hieradet_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.hieradet_s_backbone),
    # 5 levels: the four backbone stages (strides 4-32) plus a max-pooled stride-64 level.
    neck=dict(in_channels=_base_.hieradet_s_channels, out_channels=256, num_outs=5))

# AdamW + layer-wise lr decay instead of the R50 base's SGD (lr 0.02 diverges with this backbone).
# The base schedule keeps its 500-iteration linear warmup and the x0.1 steps at epochs 8 and 11.
optim_wrapper = dict(_delete_=True, **_base_.hieradet_optim_wrapper)
auto_scale_lr = _base_.hieradet_auto_scale_lr
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
