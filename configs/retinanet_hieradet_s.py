# RetinaNet + FPN with a HieraDet-S backbone, COCO detection, 1x schedule (12 epochs).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/hieradet_s.py',
]

model = dict(
    data_preprocessor=_base_.hieradet_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.hieradet_s_backbone),
    # in_channels lists all four stages; start_level=1 builds P3-P5 from strides 8-32 and
    # add_extra_convs='on_input' adds P6/P7 from the stride-32 backbone map.
    neck=dict(
        in_channels=_base_.hieradet_s_channels,
        out_channels=256,
        start_level=1,
        add_extra_convs='on_input',
        num_outs=5))

optim_wrapper = dict(_delete_=True, **_base_.hieradet_optim_wrapper)
auto_scale_lr = _base_.hieradet_auto_scale_lr
# A kill loses at most 10 minutes of training, and --resume repeats the uninterrupted run exactly.
default_hooks = dict(checkpoint=_base_.hieradet_checkpoint)
train_cfg = dict(type=_base_.hieradet_train_loop)

# COCO box/mask AP by the fastest installed evaluator, with pycocotools' numbers (docs/configs.md)
val_evaluator = dict(type='FastCocoMetric')
test_evaluator = dict(type='FastCocoMetric')
