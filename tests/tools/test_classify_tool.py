"""tools/classify.py, run as users run it: its JSON, embeddings and text against birder's infer_image."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from birder.data.transforms.classification import inference_preset
from PIL import Image

from helpers import CHECKPOINT_SIZE, CLASS_TO_IDX, rel_err, run_tool, write_test_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_test_images(tmp_path_factory.mktemp("images"))


def birder_net(network: str, path):
    from birder.common import fs_ops

    net, info = fs_ops.load_model(torch.device("cpu"), network, path=str(path), inference=True,
                                  st=str(path).endswith(".safetensors"))
    return net, info


def classify(*args):
    return run_tool("tools/classify.py", *args)


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
    m = re.fullmatch(r"\s*(\d+)\. (.+?)\s+\(index\s+(\d+)\)\s+([0-9.]+)", line)
    assert m, line
    return {"rank": int(m.group(1)), "label": m.group(2), "index": int(m.group(3)), "prob": float(m.group(4))}


def test_cli_checkpoint_without_head_is_a_one_line_error(tmp_path, birder_pair, images):
    torch.save({k: v for k, v in birder_pair["d_small"].state_dict().items() if not k.startswith("classifier.")},
               tmp_path / "backbone_only.pth")
    result = classify(images["rgb_png"], "--checkpoint", tmp_path / "backbone_only.pth")
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and "has no classification head" in result.stderr
