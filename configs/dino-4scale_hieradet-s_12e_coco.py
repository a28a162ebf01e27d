# DINO (4 feature levels) with a HieraDet-S backbone, COCO detection, 12 epochs.
# Train: python tools/train.py configs/dino-4scale_hieradet-s_12e_coco.py  (lr scales with the total batch)
# MMDetection's DINO R-50 12e config with the backbone swapped; its data pipeline, 900 queries,
# denoising queries, Hungarian matching and schedule (x0.1 at epoch 11) are kept as they are.
_base_ = [
    'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py',
    './_base_/hieradet_s.py',
]

model = dict(
    data_preprocessor=_base_.hieradet_data_preprocessor,
    # Strides 8, 16, 32 from the backbone; ChannelMapper adds the stride-64 level (4 levels).
    backbone=dict(_delete_=True, **dict(_base_.hieradet_s_backbone, out_indices=(1, 2, 3))),
    neck=dict(in_channels=_base_.hieradet_s_channels[1:]))

# DINO's optimizer (AdamW lr 1e-4, weight decay 1e-4, gradient norm clipped at 0.1) with layer-wise
# lr decay over the backbone's 16 blocks in place of DINO's flat x0.1 backbone multiplier (ViTDet's
# choice for pre-trained transformer backbones).
optim_wrapper = dict(_delete_=True, **_base_.hieradet_detr_optim_wrapper)
auto_scale_lr = _base_.hieradet_auto_scale_lr
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
