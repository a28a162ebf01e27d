# Cascade swap: MMDetection's Cascade Mask R-CNN R50-FPN 1x config with HieraDet-S as backbone.
_base_ = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'

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
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='HieraDetLayerDecayConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=0.85))
auto_scale_lr = dict(enable=True, base_batch_size=16)
