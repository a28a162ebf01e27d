"""Look at what a HieraDet backbone sees: one picture per stage, next to the input.

    python tools/visualize_features.py IMAGE --out DIR [--checkpoint CKPT] [--arch small] [--size 512]

Each stage's feature map (C channels at stride 4, 8, 16, 32) is projected onto its first
three principal components, shown as RGB and upsampled to the input size: regions the
backbone considers alike get alike colours. Writes ``DIR/stage{1..4}.png`` (input | features)
and ``DIR/overview.png`` (input and all stages in one row).

CKPT may be anything :func:`hieradet_mmdet.weights.load_backbone_weights` accepts (the
published weights' name, a birder / SAM2 / MMDetection checkpoint, a state dict). Without it
the backbone keeps random weights, with a warning: those pictures show structure of the input
only, not learned features.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="PCA pictures of HieraDet feature maps, one per stage")
    parser.add_argument("image", help="input image")
    parser.add_argument("--checkpoint", help="weights (published name, birder/SAM2/MMDetection checkpoint, state dict)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--arch", default="small",
                        help="HieraDet arch (default small, as configs/maskrcnn_hieradet_s.py; d_small is the "
                             "layout the published DINOv2 weights were trained with, same parameters)")
    parser.add_argument("--size", type=int, default=512, help="long side of the network input (default 512)")
    args = parser.parse_args(argv)
    from hieradet_mmdet.demo.features import build_backbone, feature_pictures, read_rgb_image, write_pictures

    try:
        rgb = read_rgb_image(args.image)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    from hieradet_mmdet.engine.runner import enforce_safe_loading

    enforce_safe_loading()
    import torch

    torch.set_grad_enabled(False)
    model = build_backbone(args.arch, args.checkpoint)
    resized, pictures = feature_pictures(model, rgb, args.size)
    for path in write_pictures(args.out, resized, pictures, model.out_strides):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
