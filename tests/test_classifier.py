"""The classifier and tools/classify.py against birder's own loading, transform and inference."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from birder.data.transforms.classification import inference_preset
from PIL import Image

from conftest import CHECKPOINT_SIZE, CLASS_TO_IDX
from hieradet_mmdet import pretrained
from hieradet_mmdet.checkpoint import CheckpointError
from hieradet_mmdet.classifier import HieraDetClassifier, load_image, preprocess_image

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = "hieradet_d_small_dino-v2-imagenet12k"


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return ((a - b).abs().max() / b.abs().max()).item()


def birder_net(network: str, path):
    from birder.common import fs_ops

    net, info = fs_ops.load_model(torch.device("cpu"), network, path=str(path), inference=True,
                                  st=str(path).endswith(".safetensors"))
    return net, info


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real image files: RGB PNG/JPEG of various shapes, greyscale, RGBA, palette, and a broken one."""
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    smooth = lambda h, w: (np.linspace(0, 1, h)[:, None, None] * rng.integers(60, 255, 3)  # noqa: E731
                           + np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 120, 3)
                           + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    files = {"rgb_png": directory / "wide.png", "rgb_jpeg": directory / "tall.jpg",
             "grey": directory / "grey.png", "rgba": directory / "rgba.png", "palette": directory / "palette.gif"}
    Image.fromarray(smooth(48, 150)).save(files["rgb_png"])
    Image.fromarray(smooth(300, 97)).save(files["rgb_jpeg"], quality=90)
    Image.fromarray(smooth(80, 80)).convert("L").save(files["grey"])
    Image.fromarray(np.dstack([smooth(70, 90), rng.integers(0, 255, (70, 90), dtype=np.uint8)])).save(files["rgba"])
    Image.fromarray(smooth(64, 64)).convert("P", palette=Image.Palette.ADAPTIVE).save(files["palette"])
    files["broken"] = directory / "broken.jpg"
    files["broken"].write_bytes(Path(files["rgb_jpeg"]).read_bytes()[:200])
    return files


def test_preprocessing_is_birders_inference_transform(images, birder_files):
    stats = birder_files["rgb_stats"]
    for name in ("rgb_png", "rgb_jpeg", "grey", "rgba", "palette"):
        rgb = load_image(images[name])
        assert rgb.mode == "RGB"
        for size in [(64, 64), (48, 80)]:  # down- and up-sampling, non-square
            ours = preprocess_image(rgb, size, stats)
            ref = inference_preset(size, stats, 1.0)(Image.open(images[name]).convert("RGB"))
            assert ours.shape == ref.shape == (3, *size)
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # The comparison can fail: a bilinear resize is far outside its tolerance.
    rgb = load_image(images["rgb_jpeg"])
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
        embedding = model.embedding(batch)
        logits = model(batch)
    assert embedding.shape == (3, 768)
    assert rel_err(embedding, ref_embedding) < 1e-5
    assert rel_err(logits, ref_logits) < 1e-5
    assert rel_err(logits.softmax(1), ref_logits.softmax(1)) < 1e-5
    # Probabilities far from uniform and different per image: the comparison above can fail.
    assert (ref_logits.softmax(1).max(1).values - 1 / len(CLASS_TO_IDX)).min() > 0.05
    assert (ref_logits[0] - ref_logits[1]).abs().max() > 0.1


def test_published_name_builds_the_classifier_from_its_metadata(birder_files, tmp_path, monkeypatch, hub_dir):
    """The published entry, pointed at a local birder file: arch from the entry, size / labels /
    statistics from the file itself."""
    served = tmp_path / f"{PUBLISHED}.pt"
    served.write_bytes(Path(birder_files["pt"]).read_bytes())
    entry = dataclasses.replace(pretrained.PRETRAINED[PUBLISHED], url=served.as_uri(),
                                sha256=pretrained.sha256_of(served))
    monkeypatch.setitem(pretrained.PRETRAINED, PUBLISHED, entry)
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


# --- tools/classify.py, run as users run it -------------------------------------------------


def classify(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "classify.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_json_and_embeddings_match_birders_infer_image(birder_files, images, tmp_path):
    from birder.inference.classification import infer_image

    order = ["rgb_png", "broken", "grey", "rgba", "palette", "rgb_jpeg"]
    missing = tmp_path / "no_such_image.png"
    out = tmp_path / "embeddings.npy"
    result = classify(*[images[n] for n in order], missing, "--checkpoint", birder_files["pt"],
                      "--topk", 3, "--json", "--embeddings", out)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in result.stderr
    assert str(images["broken"]) in errors[0] and str(missing) in errors[1]

    listing = json.loads(result.stdout)  # stdout holds only the JSON
    readable = [n for n in order if n != "broken"]
    assert [entry["image"] for entry in listing] == [str(images[n]) for n in readable]
    embeddings = np.load(out)
    assert embeddings.shape == (len(readable), 768) and embeddings.dtype == np.float32

    net, info = birder_net("hieradet_d_small", birder_files["pt"])
    transform = inference_preset((CHECKPOINT_SIZE, CHECKPOINT_SIZE), info.rgb_stats, 1.0)
    idx_to_class = {i: c for c, i in CLASS_TO_IDX.items()}
    for entry, name, embedding in zip(listing, readable, embeddings):
        # birder's infer_image does not convert modes itself; its data pipeline reads images as RGB.
        probs, ref_embedding = infer_image(net, Image.open(images[name]).convert("RGB"), transform,
                                           return_embedding=True)
        top = np.argsort(-probs[0])[:3]
        assert [t["index"] for t in entry["topk"]] == top.tolist()
        assert [t["label"] for t in entry["topk"]] == [idx_to_class[i] for i in top]
        np.testing.assert_allclose([t["prob"] for t in entry["topk"]], probs[0][top], rtol=0, atol=1e-4)
        assert rel_err(embedding, ref_embedding[0]) < 1e-5


def test_cli_human_output(birder_files, images):
    result = classify(images["rgb_jpeg"], images["grey"], "--checkpoint", birder_files["safetensors"])
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    for block, name in zip(blocks, ("rgb_jpeg", "grey")):
        lines = block.splitlines()
        assert lines[0] == str(images[name]) and len(lines) == 1 + 5  # default --topk 5
        probs = []
        for rank, line in enumerate(lines[1:], 1):
            parsed = re_line(line)
            assert parsed["rank"] == rank and parsed["label"] in CLASS_TO_IDX
            assert CLASS_TO_IDX[parsed["label"]] == parsed["index"]
            probs.append(parsed["prob"])
        assert probs == sorted(probs, reverse=True)


def re_line(line: str) -> dict:
    import re

    m = re.fullmatch(r"\s*(\d+)\. (.+?)\s+\(index\s+(\d+)\)\s+([0-9.]+)", line)
    assert m, line
    return {"rank": int(m.group(1)), "label": m.group(2), "index": int(m.group(3)), "prob": float(m.group(4))}


def test_cli_checkpoint_without_head_is_a_one_line_error(tmp_path, birder_pair, images):
    torch.save({k: v for k, v in birder_pair["d_small"].state_dict().items() if not k.startswith("classifier.")},
               tmp_path / "backbone_only.pth")
    result = classify(images["rgb_png"], "--checkpoint", tmp_path / "backbone_only.pth")
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and "has no classification head" in result.stderr
