"""What the exported files compute, for the two models that are not detectors."""

from __future__ import annotations

from torch import Tensor, nn


class ClassifierGraph(nn.Module):
    """(N, 3, H, W) normalised images -> probabilities (N, classes) and embeddings (N, C): what
    :meth:`HieraDetClassifier.predict` computes after preprocessing."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.classifier.embedding(images)
        return self.classifier.classify(embedding).softmax(dim=1), embedding
