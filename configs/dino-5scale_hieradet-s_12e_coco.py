# DINO with 5 feature levels: all four HieraDet-S stages (strides 4-32) plus the stride-64 level,
# as MMDetection's DINO Swin-L 5-scale config does. More memory and time than the 4-scale config
# (the stride-4 level has 4x the tokens of stride 8) for better small-object recall.
_base_ = './dino-4scale_hieradet-s_12e_coco.py'

num_levels = 5
model = dict(
    num_feature_levels=num_levels,
    backbone=dict(out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=_base_.hieradet_s_channels, num_outs=num_levels),
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))))
