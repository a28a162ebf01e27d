"""The trunk (both paths) and the classifier, read from birder's own files, against birder's outputs
as tests/compat_references.py records them: in this process where birder is installed, from the
current stack's recording (HIERADET_MMDET_REFERENCES) in the stacks birder cannot be installed in."""

from __future__ import annotations

import os

import pytest
import torch

import compat_references
from helpers import assert_close_rel
from hieradet_mmdet.models import HieraDet
from hieradet_mmdet.models.classifier import HieraDetClassifier
from hieradet_mmdet.weights import load_backbone_weights

PATHS = {"fast": True, "reference": False}


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """(references, directory): the current stack's recording, or one made here with birder."""
    if os.environ.get(compat_references.ENV):
        directory = compat_references.recorded_directory()
    else:
        directory = compat_references.record(tmp_path_factory.mktemp("birder_references"))
    return compat_references.load(directory), directory


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", ["pt", "safetensors"])
@pytest.mark.parametrize("layout", compat_references.LAYOUTS)
def test_trunk_from_birders_files_gives_birders_stage_maps(layout, form, path, recording):
    references, directory = recording
    model = HieraDet(layout, fast_path=PATHS[path]).eval()
    load_backbone_weights(model, directory / references["files"][form])
    for x, expected in references["features"][layout]:
        with torch.no_grad():
            assert_close_rel(model(x), expected)


@pytest.mark.parametrize("layout", compat_references.LAYOUTS)
def test_classifier_from_birders_file_gives_birders_embedding_and_logits(layout, recording):
    references, directory = recording
    model = HieraDetClassifier.from_checkpoint(directory / references["files"]["pt"],
                                               arch=None if layout == "d_small" else layout)
    with torch.no_grad():
        embedding = model.embedding(references["batch"])
        assert_close_rel([embedding, model.classify(embedding)],
                         [references["embedding"][layout], references["logits"][layout]])
