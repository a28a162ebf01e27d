# One-stage swap: MMDetection's FCOS R50-caffe-FPN (GN head) 1x config with HieraDet-S.
# The base is a Caffe-style ResNet config (BGR input, std 1, SGD with bias lr x2, gradient
# clipping, constant warmup): each of those is replaced below, not only the backbone.
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'

custom_imports = dict(imports=['hieradet_mmdet'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(
        mean=[0.5191 * 255, 0.5306 * 255, 0.4877 * 255],
        std=[0.2316 * 255, 0.2304 * 255, 0.2588 * 255],
        bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,
        type='HieraDet',
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='hieradet_d_small_dino-v2-imagenet12k')),
    # All four stages listed; start_level=1 (from the base) feeds P3-P5 from strides 8-32.
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='HieraDetLayerDecayConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=0.85))
auto_scale_lr = dict(enable=True, base_batch_size=16)

# Linear warmup (the base's ConstantLR x1/3 is an SGD-era setting), same 1x steps.
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
]
