# Mask R-CNN + FPN with a HieraDet-S backbone, the ViTDet recipe: large-scale jitter at 1024
# (scale 0.1-2.0), 100 epochs, AdamW with layer-wise lr decay. Total batch 64 as in ViTDet (lr
# scales with it). Train: python tools/train.py configs/mask-rcnn_hieradet-s_lsj-100e_coco.py
# Where each value comes from (ViTDet: Li et al., "Exploring Plain Vision Transformer Backbones
# for Object Detection", 2022; their Mask R-CNN ViT-B reaches 51.6 box / 45.9 mask AP):
#   LSJ 1024, scale 0.1-2.0, 100 epochs, drops x0.1 at ~89% and ~96%  ViTDet, through MMDetection's
#       common/lsj-100e_coco-instance.py (25 epochs over the set repeated 4 times, drops at 22, 24)
#   AdamW lr 1e-4 at batch 64, betas (0.9, 0.999), weight decay 0.1  ViTDet
#   layer decay 0.75  ours: ViTDet uses 0.7 for the 12 blocks of ViT-B (embeddings at 0.7**13 ~ 0.01x);
#       0.75 over our 16 blocks gives the embeddings the same ~0.01x (0.75**17 ~ 0.008x)
#   drop path 0.2  ours: between ViTDet's 0.1 (ViT-B, 12 blocks) and 0.4 (ViT-L, 24 blocks)
#   2-conv RPN, 4conv1fc box head, normalised neck and heads  ViTDet (LayerNorm there); GroupNorm
#       here, which like LayerNorm is independent of the per-GPU batch (1-2 images of 1024x1024)
#       and runs in any process layout, CPU included, unlike SyncBN
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::common/lsj-100e_coco-instance.py',
    './_base_/hieradet_s.py',
]

norm_cfg = _base_.hieradet_lsj_norm_cfg
model = dict(
    data_preprocessor=_base_.hieradet_lsj_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.hieradet_s_backbone),
    neck=dict(in_channels=_base_.hieradet_s_channels, norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

optim_wrapper = dict(_delete_=True, **_base_.hieradet_lsj_optim_wrapper)
auto_scale_lr = _base_.hieradet_lsj_auto_scale_lr
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
