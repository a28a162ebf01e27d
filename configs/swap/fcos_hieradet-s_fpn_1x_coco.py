# One-stage swap: MMDetection's FCOS R50-caffe-FPN (GN head) 1x config with HieraDet-S.
# The base is a Caffe-style ResNet config (BGR input, std 1, SGD with bias lr x2, gradient
# clipping, constant warmup): each of those is replaced below, not only the backbone.
_base_ = [
    'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
    # 1. the plugin (custom_imports), its checks (custom_hooks) and the shared HieraDet-S settings
    '../_base_/hieradet_s.py',
]

model = dict(
    # 2. RGB input normalised with the checkpoint's statistics
    data_preprocessor=_base_.hieradet_data_preprocessor,
    # 3. replace the ResNet dict entirely (_delete_), not merge into it
    backbone=dict(_delete_=True, **_base_.hieradet_s_backbone),
    # 4. HieraDet-S's channels, all four stages: start_level=1 (from the base) feeds P3-P5 from strides 8-32
    neck=dict(in_channels=_base_.hieradet_s_channels))

# 5. AdamW with layer-wise lr decay instead of SGD (_delete_ drops SGD's momentum, paramwise_cfg
# and gradient clipping); SGD at lr 0.02 diverges with this backbone.
optim_wrapper = dict(_delete_=True, **_base_.hieradet_optim_wrapper)
auto_scale_lr = _base_.hieradet_auto_scale_lr
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# Linear warmup (the base's ConstantLR x1/3 is an SGD-era setting), same 1x steps.
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
]

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
