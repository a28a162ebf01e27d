"""The classifier (trunk, norm, pooling, head) and birder's preprocessing, against birder."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from birder.data.transforms.classification import inference_preset
from PIL import Image

from helpers import (CHECKPOINT_SIZE, CLASS_TO_IDX, PUBLISHED, assert_fp32_within_reference_noise, rel_err,
                     write_test_images)
from hieradet_mmdet.models.classifier import HieraDetClassifier, open_rgb_image, preprocess_image
from hieradet_mmdet.weights import CheckpointError, published


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_test_images(tmp_path_factory.mktemp("images"))


def test_preprocessing_is_birders_inference_transform(images, birder_files):
    stats = birder_files["rgb_stats"]
    for name in ("rgb_png", "rgb_jpeg", "grey", "rgba", "palette"):
        rgb = open_rgb_image(images[name])
        assert rgb.mode == "RGB"
        for size in [(64, 64), (48, 80)]:  # down- and up-sampling, non-square
            ours = preprocess_image(rgb, size, stats)
            ref = inference_preset(size, stats, 1.0)(Image.open(images[name]).convert("RGB"))
            assert ours.shape == ref.shape == (3, *size)
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # The comparison can fail: a bilinear resize is far outside its tolerance.
    rgb = open_rgb_image(images["rgb_jpeg"])
    bilinear = preprocess_image(rgb.resize((64, 64), Image.Resampling.BILINEAR), (64, 64), stats)
    assert (bilinear - preprocess_image(rgb, (64, 64), stats)).abs().max() > 1e-2


@pytest.mark.parametrize("form,layout", [("pt", "d_small"), ("safetensors", "d_small"), ("pt", "small")])
def test_logits_probabilities_and_embedding_match_birder(form, layout, birder_files, birder_pair, images):
    path = birder_files[form]
    net = birder_pair[layout]  # the weights the files were saved from (birder's loading: see the CLI test)
    # birder names its files after the network, so the d_small layout is read off the name;
    # the windowed layout of the same weights has to be asked for.
    model = HieraDetClassifier.from_checkpoint(path, arch=None if layout == "d_small" else layout)
    assert model.trunk.arch["window_spec"] == ((8, 4, 0, 0) if layout == "d_small" else (8, 4, 14, 7))
    assert model.input_size == (CHECKPOINT_SIZE, CHECKPOINT_SIZE) and model.num_classes == len(CLASS_TO_IDX)
    assert model.labels == list(CLASS_TO_IDX)

    transform = inference_preset((CHECKPOINT_SIZE, CHECKPOINT_SIZE), birder_files["rgb_stats"], 1.0)
    batch = torch.stack([transform(Image.open(images[n]).convert("RGB")) for n in ("rgb_png", "rgb_jpeg", "rgba")])
    with torch.no_grad():
        ref_embedding = net.embedding(batch)
        ref_logits = net.classify(ref_embedding)
        net64 = copy.deepcopy(net).double()
        true_embedding = net64.embedding(batch.double())
        true_logits = net64.classify(true_embedding)
        embedding = model.embedding(batch)
        logits = model(batch)
    assert embedding.shape == (3, 768)
    # as close to birder's float64 numbers as birder's own float32 ones are
    assert_fp32_within_reference_noise([embedding, logits, logits.softmax(1)],
                                       [ref_embedding, ref_logits, ref_logits.softmax(1)],
                                       [true_embedding, true_logits, true_logits.softmax(1)])
    # Probabilities far from uniform and different per image: the comparison above can fail.
    assert (ref_logits.softmax(1).max(1).values - 1 / len(CLASS_TO_IDX)).min() > 0.05
    assert (ref_logits[0] - ref_logits[1]).abs().max() > 0.1


def test_published_name_builds_the_classifier_from_its_metadata(birder_files, tmp_path, monkeypatch, hub_dir):
    """The published entry, pointed at a local birder file: arch from the entry, size / labels /
    statistics from the file itself."""
    served = tmp_path / f"{PUBLISHED}.pt"
    served.write_bytes(Path(birder_files["pt"]).read_bytes())
    entry = dataclasses.replace(published.PRETRAINED[PUBLISHED], url=served.as_uri(),
                                sha256=published.sha256_of(served))
    monkeypatch.setitem(published.PRETRAINED, PUBLISHED, entry)
    model = HieraDetClassifier.from_checkpoint(PUBLISHED, progress=False)
    assert model.trunk.arch["window_spec"] == (8, 4, 0, 0)
    assert model.labels == list(CLASS_TO_IDX) and model.input_size == (CHECKPOINT_SIZE, CHECKPOINT_SIZE)
    assert model.rgb_stats["mean"] == tuple(birder_files["rgb_stats"]["mean"])


def test_plain_state_dict_with_head_and_without(birder_pair, tmp_path):
    state = birder_pair["d_small"].state_dict()
    torch.save(state, tmp_path / "model.pth")  # birder names, no metadata at all
    with pytest.warns(UserWarning, match="'d_small' layout"):
        model = HieraDetClassifier.from_checkpoint(tmp_path / "model.pth")
    assert model.labels[0] == "0" and model.num_classes == len(CLASS_TO_IDX)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), birder_pair["d_small"](x)) < 1e-5

    torch.save({k: v for k, v in state.items() if not k.startswith(("features.", "classifier."))},
               tmp_path / "trunk_only.pth")
    with pytest.raises(CheckpointError, match="trunk_only.pth has no classification head"):
        HieraDetClassifier.from_checkpoint(tmp_path / "trunk_only.pth")
