"""The HieraDet classifier as an exported file: its graph, and the check of the written file
against the eager model at another batch size than the traced one."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .compare import rel_err
from .exporting import ExportTarget
from .metadata import base_metadata, tensor_spec

CLASSIFIER_TOL = 1e-4  # absolute on probabilities, relative on embeddings


class ClassifierGraph(nn.Module):
    """(N, 3, H, W) normalised images -> probabilities (N, classes) and embeddings (N, C): what
    :meth:`HieraDetClassifier.predict` computes after preprocessing."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.classifier.embedding(images)
        return self.classifier.classify(embedding).softmax(dim=1), embedding


def export_classifier(checkpoint: str, target: ExportTarget, arch: Optional[str] = None) -> dict:
    """Write the classifier of ``checkpoint`` (any form with a head) to ``target`` and check it.

    Returns ``metadata`` (the JSON's content), ``check_lines`` (what the check found, to print)
    and ``failures`` (empty when the file is within CLASSIFIER_TOL of the eager model)."""
    import numpy as np

    from ..models.classifier import HieraDetClassifier

    classifier = HieraDetClassifier.from_checkpoint(checkpoint, arch).eval()
    graph = ClassifierGraph(classifier)
    h, w = classifier.input_size
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(1, 3, h, w, generator=gen),)
    check = torch.randn(2, 3, h, w, generator=gen)
    dynamic = {"input": {0: "N", 2: "H", 3: "W"}}
    run = target.write(graph, example, ["input"], ["probs", "embedding"], dynamic)
    probs, embedding = run({"input": check.numpy()})
    with torch.no_grad():  # eager: the fast path, as tools/classify.py runs it
        ref_embedding = classifier.embedding(check)
        ref_probs = classifier.classify(ref_embedding).softmax(dim=1)
    prob_err = float(np.abs(probs - ref_probs.numpy()).max())
    emb_err = rel_err(embedding, ref_embedding.numpy())
    failures = [f"probabilities differ by {prob_err:.2e} (> {CLASSIFIER_TOL})"] if prob_err > CLASSIFIER_TOL else []
    if emb_err > CLASSIFIER_TOL:
        failures.append(f"embeddings differ by {emb_err:.2e} relative (> {CLASSIFIER_TOL})")
    line = (f"check ({target.runtime_name} vs eager, batch 2 at {h}x{w}): max |probability diff| {prob_err:.2e}, "
            f"embedding relative error {emb_err:.2e}")
    stats = classifier.rgb_stats
    metadata = base_metadata(target.format, target.exporter, "classifier", "HieraDetClassifier")
    metadata.update({
        "inputs": [tensor_spec("input", ["N", 3, "H", "W"], "float32",
                               f"normalised RGB images; the head was trained at {h}x{w}")],
        "outputs": [tensor_spec("probs", ["N", classifier.num_classes], "float32", "softmax probabilities"),
                    tensor_spec("embedding", ["N", classifier.embedding_dim], "float32",
                                "pooled, normalised features (the head's input)")],
        "preprocess": {"channel_order": "RGB", "input_size": [h, w], "value_range": [0.0, 1.0],
                       "mean": list(stats["mean"]), "std": list(stats["std"]),
                       "resize": {"size": [h, w], "interpolation": "bicubic", "library": "Pillow"}},
        "classes": classifier.labels,
        "check": {"max_probability_diff": prob_err, "embedding_relative_error": emb_err},
    })
    return {"metadata": metadata, "check_lines": [line], "failures": failures}
