"""Image classification with a HieraDet checkpoint that has a head (e.g. the published
ImageNet-12K weights): trunk -> LayerNorm -> average pool -> 768-d embedding -> Linear.

Preprocessing is birder's inference transform: RGB, bicubic (antialiased, as PIL always is)
resize to the checkpoint's input size, scale to [0, 1], normalise with the checkpoint's
``rgb_stats``. Reading and resizing images uses Pillow, which OpenMMLab already depends on.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..weights.errors import CheckpointError
from ..weights.load import describe_trunk, load_backbone_weights, trunk_size
from ..weights.reader import LoadedCheckpoint, Source, read_checkpoint
from .hieradet import HieraDet

# For checkpoints that do not say how their images were normalised.
IMAGENET_RGB_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
DEFAULT_LAYOUT = "d_"  # the layout of the published DINOv2 weights


class HieraDetClassifier(nn.Module):
    """HieraDet trunk + LayerNorm(eps 1e-6) on the last feature map + average pool + Linear head.

    ``class_to_idx``, ``rgb_stats`` and ``input_size`` describe how the head was trained and
    what :meth:`preprocess` does; :meth:`from_checkpoint` takes them from the checkpoint."""

    def __init__(self, arch: str = "d_small", num_classes: int = 1000, *,
                 class_to_idx: Optional[Mapping[str, int]] = None,
                 rgb_stats: Optional[Mapping[str, Sequence[float]]] = None,
                 input_size: tuple[int, int] = (256, 256)) -> None:
        super().__init__()
        self.trunk = HieraDet(arch, out_indices=(3,))
        self.embedding_dim = self.trunk.channels[-1]
        self.norm = nn.LayerNorm(self.embedding_dim, eps=1e-6)
        self.head = nn.Linear(self.embedding_dim, num_classes)
        self.num_classes = num_classes
        self.labels = _labels(class_to_idx, num_classes)
        self.rgb_stats = {k: tuple(float(x) for x in v) for k, v in (rgb_stats or IMAGENET_RGB_STATS).items()}
        self.input_size = (int(input_size[0]), int(input_size[1]))

    @classmethod
    def from_checkpoint(cls, source: Source, arch: Optional[str] = None, *,
                        progress: bool = True) -> "HieraDetClassifier":
        """Build from any checkpoint with a head: a published name, a birder .pt / .safetensors
        file, a URL, or a plain state dict holding ``norm.*`` and ``head.*``.

        The layout (windowed 'small' vs global 'd_small') is not visible in the weights; it is
        taken from ``arch``, else the checkpoint's network name, else assumed to be 'd_'.
        A checkpoint without birder's metadata gets ImageNet statistics and 224x224 inputs."""
        checkpoint = read_checkpoint(source, progress=progress)
        if not checkpoint.has_head:
            raise CheckpointError(f"{checkpoint.name} has no classification head (norm.* and head.* or birder's "
                                  "features.0.* and classifier.*); it can only serve as a backbone.")
        arch = arch or checkpoint.arch or _guess_arch(checkpoint)
        meta = checkpoint.metadata
        model = cls(arch, checkpoint.state_dict["head.weight"].shape[0], class_to_idx=meta.get("class_to_idx"),
                    rgb_stats=meta.get("rgb_stats"), input_size=meta.get("size") or (224, 224))
        load_backbone_weights(model.trunk, checkpoint)
        for name in ("norm", "head"):
            part = {k[len(name) + 1:]: v for k, v in checkpoint.state_dict.items() if k.startswith(name + ".")}
            try:
                getattr(model, name).load_state_dict(part)
            except RuntimeError as err:
                raise CheckpointError(f"{checkpoint.name}: its classifier {name} does not fit: {err}") from None
        return model.eval()

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, embedding_dim) pooled, normalised features."""
        (last,) = self.trunk(x)
        return self.norm(last.permute(0, 2, 3, 1)).mean(dim=(1, 2))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embedding(x))

    def preprocess(self, image: Any) -> torch.Tensor:
        """A PIL image -> the (3, H, W) tensor this model expects."""
        return preprocess_image(image, self.input_size, self.rgb_stats)

    @torch.no_grad()
    def predict(self, images: Sequence[Any], topk: int = 5) -> tuple[list[list[dict]], torch.Tensor]:
        """Top-k classes of PIL images: per image a list of {index, label, prob}; and the embeddings."""
        device = next(self.parameters()).device
        batch = torch.stack([self.preprocess(image) for image in images]).to(device)
        embeddings = self.embedding(batch)
        probs = self.classify(embeddings).softmax(dim=1)
        return top_classes(probs, self.labels, topk), embeddings


def top_classes(probs: torch.Tensor, labels: Sequence[str], topk: int = 5) -> list[list[dict]]:
    """Per row of ``probs`` (N, classes): the ``topk`` classes as {index, label, prob}, best first."""
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [[{"index": int(i), "label": labels[int(i)], "prob": float(p)} for p, i in zip(pv, iv)]
            for pv, iv in zip(values.tolist(), indices.tolist())]


def _labels(class_to_idx: Optional[Mapping[str, int]], num_classes: int) -> list[str]:
    labels = [str(i) for i in range(num_classes)]
    for name, index in (class_to_idx or {}).items():
        if 0 <= int(index) < num_classes:
            labels[int(index)] = name
    return labels


def _guess_arch(checkpoint: LoadedCheckpoint) -> str:
    size = trunk_size(checkpoint.trunk_state_dict)
    if size is None:
        raise CheckpointError(f"{checkpoint.name} holds {describe_trunk(checkpoint.trunk_state_dict)}, "
                              "not one of the known sizes; pass arch= (a name or a dict).")
    warnings.warn(f"{checkpoint.name} does not say which HieraDet it is; using the '{DEFAULT_LAYOUT}{size}' layout "
                  f"(global attention in stages 3-4). Pass arch='{size}' for SAM2's windowed layout.", stacklevel=3)
    return DEFAULT_LAYOUT + size


def open_rgb_image(path: str) -> Any:
    """Open an image file as an RGB PIL image (greyscale, RGBA, palette... are converted)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image.copy()


def preprocess_image(image: Any, size: tuple[int, int], rgb_stats: Mapping[str, Sequence[float]]) -> torch.Tensor:
    """birder's inference transform: RGB PIL image -> bicubic resize to (h, w) in 8-bit, as PIL
    does -> float in [0, 1] -> (x - mean) / std. Returns (3, h, w) float32."""
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().mul_(1.0 / 255)
    mean = torch.tensor(rgb_stats["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(rgb_stats["std"], dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std
