# Mask R-CNN + FPN with a HieraDet-S backbone, 3x schedule with multi-scale training, following
# MMDetection's mask-rcnn_r50_fpn_ms-poly-3x_coco: shorter side drawn from 640-800, the train
# set repeated 3 times over 12 "epochs" (36 real epochs), lr x0.1 at 9 and 11.
_base_ = [
    'mmdet::common/ms-poly_3x_coco-instance.py',
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './_base_/hieradet_s.py',
]

model = dict(
    data_preprocessor=_base_.hieradet_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.hieradet_s_backbone),
    neck=dict(in_channels=_base_.hieradet_s_channels, out_channels=256, num_outs=5))

optim_wrapper = dict(_delete_=True, **_base_.hieradet_optim_wrapper)
auto_scale_lr = _base_.hieradet_auto_scale_lr
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
