# Query-based swap: MMDetection's two-stage Deformable DETR with box refinement (R-50, 50 epochs)
# with HieraDet-S. Its 300 queries, Hungarian matching and schedule (x0.1 at epoch 40) are kept.
_base_ = [
    'mmdet::deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
    # 1. the plugin (custom_imports), its checks (custom_hooks) and the shared HieraDet-S settings
    '../_base_/hieradet_s.py',
]

model = dict(
    # 2. RGB input normalised with the checkpoint's statistics
    data_preprocessor=_base_.hieradet_data_preprocessor,
    # 3. replace the ResNet dict entirely (_delete_): strides 8, 16, 32, as the base takes them
    backbone=dict(_delete_=True, **dict(_base_.hieradet_s_backbone, out_indices=(1, 2, 3))),
    # 4. HieraDet-S's channels at those strides; ChannelMapper adds the stride-64 level
    neck=dict(in_channels=_base_.hieradet_s_channels[1:]))

# 5. Deformable DETR's AdamW (lr 2e-4 for a batch of 32, weight decay 1e-4, gradient norm clipped
# at 0.1, x0.1 lr on the sampling offsets and reference points) with layer-wise lr decay over the
# backbone's blocks in place of the flat x0.1 backbone multiplier.
optim_wrapper = dict(
    _delete_=True,
    **dict(_base_.hieradet_detr_optim_wrapper,
           optimizer=dict(_base_.hieradet_detr_optim_wrapper.optimizer, lr=2e-4),
           paramwise_cfg=dict(_base_.hieradet_detr_optim_wrapper.paramwise_cfg,
                              custom_keys=dict(sampling_offsets=dict(lr_mult=0.1),
                                               reference_points=dict(lr_mult=0.1)))))
auto_scale_lr = dict(enable=True, base_batch_size=32)
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
