"""Narrow forms of any detector config: every block kind of the real model at a fraction of its
width and depth, for tests of code paths (not for measurements)."""

# Every block kind of HieraDet (q-pools, windows that tile and that need padding, a global block),
# narrow; Swin-T likewise. For code paths, not for measurements: steps of a fraction of a second
# on any CPU, in bf16 too (tens of times slower than fp32 where the CPU has no bf16 instructions).
NARROW_HIERADET = dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=1, global_pos_size=(7, 7),
                       global_att_blocks=(3,), window_spec=(8, 4, 14, 7))
NARROW_SWIN = dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])


def narrow_detector_config(cfg, width: int = 32):
    """``cfg``'s detector with a narrow backbone (NARROW_HIERADET or NARROW_SWIN) and ``width``
    channels from the neck on, whatever the family (in place; returns ``cfg``)."""
    model = cfg.model
    backbone = model.backbone
    kind = str(backbone.type).split(".")[-1]
    if kind == "HieraDet":
        backbone.arch = dict(NARROW_HIERADET)
        backbone.pop("window_spec", None)
        backbone.pop("global_att_blocks", None)
        stages = [NARROW_HIERADET["embed_dim"] * 2 ** i for i in range(4)]
    elif kind == "SwinTransformer":
        backbone.update(NARROW_SWIN)
        stages = [NARROW_SWIN["embed_dims"] * 2 ** i for i in range(4)]
    else:
        raise ValueError(f"no narrow form of a {backbone.type} backbone")
    indices = backbone.get("out_indices", (0, 1, 2, 3))
    if model.get("panoptic_head") is not None:
        _narrow_mask2former(model.panoptic_head, [stages[i] for i in indices], width)
        model.test_cfg.max_per_image = NARROW_LAYERS["queries"]  # at most queries x classes
        model.train_cfg.num_points = NARROW_LAYERS["mask_points"]  # points sampled per mask for matching and losses
        return cfg
    model.neck.in_channels = [stages[i] for i in indices]
    model.neck.out_channels = width
    if model.get("encoder") is not None:
        model.neck.out_channels = DETR_WIDTH
        _narrow_detr(model, DETR_WIDTH)
        return cfg
    for name in ("rpn_head", "bbox_head"):
        if model.get(name) is not None:
            model[name].update(in_channels=width, feat_channels=width)
    roi = model.get("roi_head")
    if roi is not None:
        roi.bbox_roi_extractor.out_channels = width
        for head in roi.bbox_head if isinstance(roi.bbox_head, list) else [roi.bbox_head]:
            head.update(in_channels=width, fc_out_channels=2 * width)
            if "conv_out_channels" in head:  # convolutional box heads (4conv1fc)
                head.conv_out_channels = width
        if roi.get("mask_head") is not None:
            roi.mask_roi_extractor.out_channels = width
            roi.mask_head.update(in_channels=width, conv_out_channels=width)
    return cfg


# Layers of the transformers of query-based detectors in their narrow forms, their queries, and
# Mask2Former's points per mask (12,544 in its configs).
NARROW_LAYERS = dict(encoder=1, decoder=2, queries=30, mask_points=28 * 28)
# DINO's decoder encodes each reference box as 4 x 128 sine features for a 2 x embed_dims MLP:
# its transformer is 256 wide whatever the config says, and the narrow form keeps that width.
DETR_WIDTH = 256


def _narrow_attention_stack(stack, width: int, layers: int) -> None:
    """An MMDetection transformer encoder / decoder config (``layer_cfg`` of attentions and an FFN)
    at ``width`` channels, 4 heads, ``layers`` layers."""
    stack.num_layers = layers
    for key, part in stack.layer_cfg.items():
        if key.endswith("attn_cfg"):
            part.embed_dims = width
            part.num_heads = 4
        elif key == "ffn_cfg":
            part.update(embed_dims=width, feedforward_channels=min(2 * width, 256))


def _narrow_detr(model, width: int) -> None:
    """DINO / Deformable DETR / DETR: ``width``-channel transformer of few layers and queries."""
    _narrow_attention_stack(model.encoder, width, NARROW_LAYERS["encoder"])
    _narrow_attention_stack(model.decoder, width, NARROW_LAYERS["decoder"])
    model.positional_encoding.num_feats = width // 2
    model.bbox_head.embed_dims = width
    model.num_queries = NARROW_LAYERS["queries"]
    if model.get("dn_cfg") is not None:
        model.dn_cfg.group_cfg.num_dn_queries = NARROW_LAYERS["queries"]
    if model.get("test_cfg") is not None and "max_per_img" in model.test_cfg:
        model.test_cfg.max_per_img = NARROW_LAYERS["queries"]


def _narrow_mask2former(head, in_channels: list[int], width: int) -> None:
    """Mask2Former's head (pixel decoder and transformer decoder) at ``width`` channels."""
    head.update(in_channels=in_channels, feat_channels=width, out_channels=width,
                num_queries=NARROW_LAYERS["queries"])
    _narrow_attention_stack(head.pixel_decoder.encoder, width, NARROW_LAYERS["encoder"])
    head.pixel_decoder.positional_encoding.num_feats = width // 2
    _narrow_attention_stack(head.transformer_decoder, width, NARROW_LAYERS["decoder"])
    head.positional_encoding.num_feats = width // 2
