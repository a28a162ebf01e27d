# Cascade swap: MMDetection's Cascade Mask R-CNN R50-FPN 1x config with HieraDet-S as backbone.
_base_ = [
    'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
    # 1. the plugin (custom_imports), its checks (custom_hooks) and the shared HieraDet-S settings
    '../_base_/hieradet_s.py',
]

model = dict(
    # 2. RGB input normalised with the checkpoint's statistics
    data_preprocessor=_base_.hieradet_data_preprocessor,
    # 3. replace the ResNet dict entirely (_delete_), not merge into it
    backbone=dict(_delete_=True, **_base_.hieradet_s_backbone),
    # 4. the neck takes HieraDet-S's channels, all four stages (R50's were [256, 512, 1024, 2048])
    neck=dict(in_channels=_base_.hieradet_s_channels))

# 5. AdamW with layer-wise lr decay instead of SGD (_delete_ drops SGD's momentum, paramwise_cfg
# and gradient clipping); SGD at lr 0.02 diverges with this backbone.
optim_wrapper = dict(_delete_=True, **_base_.hieradet_optim_wrapper)
auto_scale_lr = _base_.hieradet_auto_scale_lr
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
