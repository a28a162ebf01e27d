# Two-stage swap: MMDetection's own Faster R-CNN R50-FPN 1x config with HieraDet-S as backbone.
# Everything else (RPN, RoI head, COCO data, 1x schedule, runtime) is MMDetection's config.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

# 1. Load the plugin so that type='HieraDet' and the optimizer constructor are registered.
custom_imports = dict(imports=['hieradet_mmdet'], allow_failed_imports=False)

model = dict(
    # 2. RGB input normalised with the checkpoint's statistics (birder's, x255).
    data_preprocessor=dict(
        mean=[0.5191 * 255, 0.5306 * 255, 0.4877 * 255],
        std=[0.2316 * 255, 0.2304 * 255, 0.2588 * 255],
        bgr_to_rgb=True),
    # 3. Replace the ResNet dict entirely (_delete_), not merge into it.
    backbone=dict(
        _delete_=True,
        type='HieraDet',
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='hieradet_d_small_dino-v2-imagenet12k')),
    # 4. The neck takes HieraDet-S's channels (R50's were [256, 512, 1024, 2048]).
    neck=dict(in_channels=[96, 192, 384, 768]))

# 5. AdamW with layer-wise lr decay instead of SGD lr 0.02 (which diverges with this backbone).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='HieraDetLayerDecayConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=0.85))
auto_scale_lr = dict(enable=True, base_batch_size=16)
