# Shared HieraDet-S settings for this repo's detection configs (one place to change them).
#
# MMEngine does not allow two sibling `_base_` files to define the same key, and MMDetection's
# own model/schedule bases already define `model` and `optim_wrapper`. So this file exports
# `hieradet_*` variables, and each config applies them with `_base_.hieradet_*`.

custom_imports = dict(imports=['hieradet_mmdet'], allow_failed_imports=False)
# HieraDetCheckHook: the neck against the backbone before anything runs, the preprocessing against
# the loaded checkpoint's rgb_stats. FiniteLossHook: a non-finite loss stops training before the
# step that would write NaNs into the weights ('skip' instead: dict(type=..., on_nonfinite='skip')).
# CompileHook: with `compile = True`, what torch cannot compile runs eagerly instead of stopping the
# run (does nothing otherwise; docs/compile.md).
custom_hooks = [dict(type='HieraDetCheckHook'), dict(type='FiniteLossHook'), dict(type='CompileHook')]

# Backbone output channels at strides 4, 8, 16, 32 (HieraDet-S: 96 * 2**stage).
hieradet_s_channels = [96, 192, 384, 768]

# 'small' is SAM2's windowed layout (global attention only in blocks 7, 10, 13), which keeps
# the cost linear in the image size at detection resolutions. The DINOv2 weights were trained
# with 'd_small' (global attention from stage 3 on); both layouts share the same parameters.
hieradet_s_backbone = dict(
    type='HieraDet',
    arch='small',
    out_indices=(0, 1, 2, 3),
    frozen_stages=-1,
    drop_path_rate=0.2,
    with_cp=False,  # True recomputes block activations in backward: less memory, slower steps
    init_cfg=dict(type='Pretrained', checkpoint='hieradet_d_small_dino-v2-imagenet12k'))

# Normalisation of the checkpoint: birder's default RGB statistics ("birder" rgb mode, which
# the published HieraDet-S DINOv2 / ImageNet-12K recipe trained with), times 255 because
# MMDetection normalises 0-255 pixels. Images are loaded BGR by mmcv, hence bgr_to_rgb.
hieradet_data_preprocessor = dict(
    mean=[0.5191 * 255, 0.5306 * 255, 0.4877 * 255],
    std=[0.2316 * 255, 0.2304 * 255, 0.2588 * 255],
    bgr_to_rgb=True)

# AdamW transformer recipe: lr 1e-4 for a total batch of 16 (set auto_scale_lr in the config),
# no weight decay on norms, biases and position embeddings, layer-wise lr decay over the
# 16 backbone blocks (embeddings at 0.85**17 ~ 0.06x, last block 0.85x, neck and heads 1x).
hieradet_optim_wrapper = dict(
    type='OptimWrapper',  # `tools/train.py --amp` switches this to AmpOptimWrapper
    constructor='HieraDetLayerDecayConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        layer_decay_rate=0.85,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        pos_embed_decay_mult=0.0),
    clip_grad=None)

hieradet_auto_scale_lr = dict(enable=True, base_batch_size=16)

# Training that never loses more than minutes of work: checkpoints written atomically with a digest,
# the random states and every process's data position, plus a rolling latest.pth every 10 minutes
# inside epochs (hieradet_mmdet.engine.checkpointing); the training loop that resumes there, at the
# next batch, without loading the trained batches again (hieradet_mmdet.engine.loops).
# Only the type is set here (latest_interval_minutes=10 is the hook's default): a config of yours
# that writes MMEngine's checkpoint hook over it, dict(type='CheckpointHook', interval=2), gets exactly
# that hook (our tools/train.py makes it a SafeCheckpointHook with the same arguments).
hieradet_checkpoint = dict(type='SafeCheckpointHook')
hieradet_train_loop = 'ResumableEpochBasedTrainLoop'

# Mask2Former's optimizer (AdamW lr 1e-4, weight decay 0.05, gradient norm clipped at 0.01) with
# the layer-wise lr decay above in place of its flat x0.1 backbone multiplier; no weight decay on
# the queries and level embeddings, as in Mask2Former. Shared by its instance and panoptic configs.
hieradet_mask2former_no_decay = dict(lr_mult=1.0, decay_mult=0.0)
hieradet_mask2former_optim_wrapper = dict(
    hieradet_optim_wrapper,
    clip_grad=dict(max_norm=0.01, norm_type=2),
    paramwise_cfg=dict(
        hieradet_optim_wrapper['paramwise_cfg'],
        custom_keys=dict(query_embed=hieradet_mask2former_no_decay, query_feat=hieradet_mask2former_no_decay,
                         level_embed=hieradet_mask2former_no_decay)))

# DETR-style detectors (DINO, Deformable DETR): their AdamW (weight decay 1e-4, gradient norm
# clipped at 0.1; the transformer is trained from scratch) with the layer-wise lr decay above in
# place of their flat x0.1 backbone multiplier.
hieradet_detr_optim_wrapper = dict(
    hieradet_optim_wrapper,
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2))

# The ViTDet LSJ-100e recipe of the *_lsj-100e_coco.py configs (where each value comes from is
# stated in mask-rcnn_hieradet-s_lsj-100e_coco.py): images padded to 1024 x 1024, GroupNorm in
# the neck and heads, AdamW with weight decay 0.1 and layer decay 0.75 at lr 1e-4 for a batch of 64.
hieradet_lsj_image_size = (1024, 1024)
hieradet_lsj_norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
hieradet_lsj_data_preprocessor = dict(
    hieradet_data_preprocessor,
    pad_size_divisor=32,
    batch_augments=[dict(type='BatchFixedSizePad', size=hieradet_lsj_image_size, pad_mask=True)])
hieradet_lsj_optim_wrapper = dict(
    hieradet_optim_wrapper,
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(hieradet_optim_wrapper['paramwise_cfg'], layer_decay_rate=0.75))
hieradet_lsj_auto_scale_lr = dict(enable=True, base_batch_size=64)
