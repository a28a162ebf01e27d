# Cascade Mask R-CNN + FPN with a HieraDet-S backbone, the same ViTDet LSJ-100e recipe as
# mask-rcnn_hieradet-s_lsj-100e_coco.py (see there for where each value comes from); each of the
# three cascade stages gets the 4conv1fc box head with GroupNorm, as ViTDet's cascade does.
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
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
        bbox_head=[dict(stage, type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg)
                   for stage in _base_.model.roi_head.bbox_head],
        mask_head=dict(norm_cfg=norm_cfg)))

optim_wrapper = dict(_delete_=True, **_base_.hieradet_lsj_optim_wrapper)
auto_scale_lr = _base_.hieradet_lsj_auto_scale_lr
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
