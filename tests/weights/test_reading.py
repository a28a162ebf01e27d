"""Checkpoint reading: every form users hold loads into our trunk and gives birder's numbers;
everything that cannot load fails loudly, naming the file (and keys and shapes)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (CHECKPOINT_SIZE, CLASS_TO_IDX, PUBLISHED, assert_close_rel, make_birder_model,
                     save_birder_checkpoints)
from hieradet_mmdet.models import HieraDet
from hieradet_mmdet.weights import CheckpointError, WeightsUnavailableError, load_backbone_weights, read_checkpoint

SIZES = [(64, 64), (96, 160)]  # token grids must be multiples of 8 for birder's window embedding


# --- Renamings written out here, independent of the code under test ------------------------


def birder_to_sam2_names(state, depths=(1, 2, 11, 2)):
    """birder's HieraDet names -> SAM2's image encoder names.

    This mirrors SAM2's sam2/modeling/backbones/hieradet.py (Hiera): ``patch_embed.proj``
    (PatchEmbed's Conv2d), ``pos_embed``, ``pos_embed_window``, a flat ``blocks`` ModuleList of
    MultiScaleBlock(norm1, attn.qkv, attn.proj, norm2, mlp = MLP(...).layers.{0,1}, proj), and
    the trunk sits at ``image_encoder.trunk`` of SAM2Base. birder's classifier has no SAM2
    counterpart and is left out."""
    starts = np.cumsum([0, *depths])
    out = {}
    for key, value in state.items():
        if key.startswith(("features.", "classifier.")):
            continue
        key = key.replace("stem.proj.", "patch_embed.proj.").replace("pos_embed_win", "pos_embed_window")
        m = re.match(r"body\.stage(\d)\.(\d+)\.(.*)", key)
        if m:
            rest = m.group(3).replace("mlp.0.", "mlp.layers.0.").replace("mlp.3.", "mlp.layers.1.")
            key = f"blocks.{starts[int(m.group(1)) - 1] + int(m.group(2))}.{rest}"
        out[key] = value
    return out


def sam2_to_our_names(state):
    return {k.replace("patch_embed.proj.", "patch_embed.").replace("mlp.layers.0.", "mlp.fc1.")
            .replace("mlp.layers.1.", "mlp.fc2."): v for k, v in state.items()}


def mmengine_checkpoint(backbone_state):
    """What mmengine's Runner saves for a detector on this backbone: meta with a MessageHub
    (numpy values in HistoryBuffers), the model's state dict, optimizer and scheduler states."""
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("hieradet_checkpoint_test")
    for loss in (0.9, 0.7, 0.6):
        hub.update_scalar("train/loss", np.float64(loss))
    hub.update_info("iter", 300)
    neck_and_heads = {"neck.lateral_convs.0.conv.weight": torch.randn(256, 96, 1, 1),
                      "rpn_head.rpn_conv.weight": torch.randn(256, 256, 3, 3),
                      "roi_head.bbox_head.fc_cls.weight": torch.randn(81, 1024)}
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.01, momentum=0.9)
    param.grad = torch.ones(3)
    optimizer.step()
    return {"meta": {"epoch": 3, "iter": 300, "seed": 0, "dataset_meta": {"classes": ("cat", "dog")},
                     "message_hub": hub.state_dict()},
            "state_dict": {**{f"backbone.{k}": v for k, v in backbone_state.items()}, **neck_and_heads},
            "optimizer": optimizer.state_dict(), "param_schedulers": []}


@pytest.fixture(scope="module")
def checkpoint_forms(birder_files, birder_pair, tmp_path_factory):
    """The same weights in every supported form, as files."""
    from mmengine.runner.checkpoint import save_checkpoint
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("forms")
    birder_state = birder_pair["d_small"].state_dict()
    sam2_trunk = birder_to_sam2_names(birder_state)
    ours = sam2_to_our_names(sam2_trunk)
    sam2_full = {**{f"image_encoder.trunk.{k}": v for k, v in sam2_trunk.items()},
                 "image_encoder.neck.convs.0.conv.weight": torch.randn(256, 768, 1, 1),
                 "maskmem_tpos_enc": torch.randn(7, 1, 1, 64),
                 "sam_mask_decoder.iou_token.weight": torch.randn(1, 256)}
    files = {"birder-pt": birder_files["pt"], "birder-safetensors": birder_files["safetensors"],
             "sam2": directory / "sam2.1_hiera_small.pt", "sam2-trunk": directory / "trunk.pth",
             "mmdet": directory / "epoch_3.pth", "plain": directory / "ours.pth",
             "plain-backbone": directory / "backbone.pth", "plain-safetensors": directory / "ours.safetensors"}
    torch.save({"model": sam2_full}, files["sam2"])
    torch.save({f"trunk.{k}": v for k, v in sam2_trunk.items()}, files["sam2-trunk"])
    save_checkpoint(mmengine_checkpoint(ours), str(files["mmdet"]))
    torch.save(ours, files["plain"])
    torch.save({f"backbone.{k}": v for k, v in ours.items()}, files["plain-backbone"])
    save_file({k: v.contiguous() for k, v in ours.items()}, str(files["plain-safetensors"]))
    return files


@pytest.fixture(scope="module")
def reference_features(birder_pair):
    torch.manual_seed(5)
    inputs = {hw: torch.randn(1, 3, *hw) for hw in SIZES}
    with torch.no_grad():
        return {(layout, hw): (x, list(birder_pair[layout].detection_features(x).values()))
                for layout in ("small", "d_small") for hw, x in inputs.items()}


@pytest.fixture(scope="module")
def trunks():
    """One model per layout, reused: building one costs more than a test's loading and forward."""
    return {layout: HieraDet(layout).eval() for layout in ("small", "d_small")}


def scrambled(model):
    """Overwrite every weight, so that what the next load leaves out cannot pass as loaded."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(0.5)
    return model


@pytest.mark.parametrize("layout", ["small", "d_small"])
@pytest.mark.parametrize("form", ["birder-pt", "birder-safetensors", "sam2", "sam2-trunk", "mmdet",
                                  "plain", "plain-backbone", "plain-safetensors"])
def test_every_form_gives_birders_features(form, layout, checkpoint_forms, reference_features, trunks):
    model = scrambled(trunks[layout])
    load_backbone_weights(model, checkpoint_forms[form])
    for hw in SIZES:
        x, ref = reference_features[(layout, hw)]
        with torch.no_grad():
            assert_close_rel(model(x), ref)


def test_metadata_of_birder_files(checkpoint_forms, birder_files, trunks):
    for form in ("birder-pt", "birder-safetensors"):
        ckpt = read_checkpoint(checkpoint_forms[form])
        meta = ckpt.metadata
        assert meta["class_to_idx"] == CLASS_TO_IDX
        assert {k: list(v) for k, v in meta["rgb_stats"].items()} == \
            {k: list(v) for k, v in birder_files["rgb_stats"].items()}
        assert meta["size"] == (CHECKPOINT_SIZE, CHECKPOINT_SIZE) and meta["num_classes"] == len(CLASS_TO_IDX)
        assert meta["network"] == "hieradet_d_small" and ckpt.arch == "d_small"
        assert ckpt.has_head and ckpt.state_dict["head.weight"].shape == (len(CLASS_TO_IDX), 768)
        assert ckpt.path == Path(checkpoint_forms[form])
    assert read_checkpoint(checkpoint_forms["birder-pt"]).metadata["format"] == "birder"
    assert read_checkpoint(checkpoint_forms["birder-safetensors"]).metadata["format"] == "birder-safetensors"
    for form, fmt in [("sam2", "sam2"), ("mmdet", "mmdet"), ("plain", "state_dict")]:
        ckpt = read_checkpoint(checkpoint_forms[form])
        assert ckpt.metadata["format"] == fmt and not ckpt.has_head and ckpt.arch is None
        assert set(ckpt.state_dict) == set(trunks["small"].state_dict())  # neck, heads, SAM parts left out


def test_pos_embed_of_another_grid_is_resized_like_birder(birder_pair, tmp_path, trunks):
    """A checkpoint with a 14x14 global embedding (as base/base_plus have) into small's 7x7:
    birder's own load_hiera_weights resizes it bicubically; we must give the same features."""
    from birder.model_registry import registry

    state = dict(birder_pair["d_small"].state_dict())
    torch.manual_seed(2)
    state["pos_embed"] = torch.randn(1, 96, 14, 14) * 0.5
    path = tmp_path / "pos14.pt"
    torch.save(state, path)

    reference = registry.net_factory("hieradet_small", len(CLASS_TO_IDX), size=(64, 64)).eval()
    hiera_state = {("features.1." + k[len("features.0."):] if k.startswith("features.0.") else k): v
                   for k, v in state.items()}
    reference.load_hiera_weights(hiera_state)
    model = scrambled(trunks["small"])
    load_backbone_weights(model, path)
    assert model.pos_embed.shape == (1, 96, 7, 7)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert_close_rel(model(x), list(reference.detection_features(x).values()))

    state["pos_embed"] = torch.randn(1, 128, 14, 14)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"pos_embed: \(1, 128, 14, 14\) vs \(1, 96, 7, 7\)"):
        load_backbone_weights(model, path)


# --- Wrong architectures: nothing loads, the error names file, keys and shapes ---------------


def test_tiny_checkpoint_into_small_names_keys_and_shapes(tmp_path, trunks):
    from birder.data.transforms.classification import get_rgb_stats

    tiny = make_birder_model("hieradet_tiny", len(CLASS_TO_IDX), CHECKPOINT_SIZE, seed=4)
    path = save_birder_checkpoints(tiny, "hieradet_tiny_test", tmp_path, get_rgb_stats("imagenet"))["pt"]
    model = trunks["small"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "'tiny' (depths 1-2-7-2, embed_dim 96)" in message and "'small' (depths 1-2-11-2" in message
    # block 10 opens stage 4 in tiny (384 -> 768) but is inside stage 3 in small (384 -> 384)
    assert "blocks.10.attn.qkv.weight: (2304, 384) vs (1152, 384)" in message
    assert "(50 keys): blocks.12.*, blocks.13.*, blocks.14.*, blocks.15.*" in message  # missing
    assert "(2 keys): blocks.10.proj.weight, blocks.10.proj.bias" in message  # not in the model
    assert "Nothing was loaded" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_base_plus_checkpoint_into_small_is_a_shape_mismatch(tmp_path, trunks):
    path = tmp_path / "hieradet_base_plus.pth"
    torch.save(HieraDet("base_plus").state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(trunks["small"], path)
    message = str(info.value)
    assert str(path) in message and "'base_plus'" in message
    assert "patch_embed.weight: (112, 3, 7, 7) vs (96, 3, 7, 7)" in message
    assert "pos_embed: (1, 112, 14, 14) vs (1, 96, 7, 7)" in message


# --- Files that are not (safe, whole) checkpoints -------------------------------------------


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_hostile_pickle_is_refused_without_running(writer, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.pt"
    payload = {"state": {}, "signature": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*: unpickling it would import and call posix.system") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_broken_and_foreign_files_fail_naming_the_file(checkpoint_forms, tmp_path):
    cases = {}
    for form in ("birder-pt", "birder-safetensors"):
        data = Path(checkpoint_forms[form]).read_bytes()
        cases[f"truncated-{form}"] = (tmp_path / f"truncated{Path(checkpoint_forms[form]).suffix}",
                                      data[: len(data) // 3], "truncated")
    cases["empty"] = (tmp_path / "empty.pt", b"", "empty")
    cases["text"] = (tmp_path / "notes.pt", b"epoch 3: loss 0.51\n", "not a")
    cases["list"] = (tmp_path / "list.pt", None, "holds a list")
    cases["no-trunk"] = (tmp_path / "resnet.pth", None, "no HieraDet trunk")
    for name, (path, data, expected) in cases.items():
        if name == "list":
            torch.save([torch.zeros(1)], path)
        elif name == "no-trunk":
            torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, path)
        else:
            path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
            read_checkpoint(path)
        assert expected in str(info.value), (name, str(info.value))

    jpeg = tmp_path / "photo.pt"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(jpeg, format="JPEG")
    with pytest.raises(CheckpointError, match=re.escape(str(jpeg))):
        read_checkpoint(jpeg)


def test_missing_file_and_unknown_name():
    with pytest.raises(WeightsUnavailableError, match="not found: /no/such/dir/model.pt"):
        read_checkpoint("/no/such/dir/model.pt")
    with pytest.raises(WeightsUnavailableError, match=f"Unknown HieraDet weights name 'hieradet_huge'.*{PUBLISHED}"):
        read_checkpoint("hieradet_huge")


class LooksUpAttribute:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_mmengine_log_buffers_load_but_getattr_stays_fenced(tmp_path):
    """MMEngine pickles HistoryBuffer statistics as getattr(HistoryBuffer, 'mean'): exactly those
    four load, in a process that never created a buffer; any other getattr is refused."""
    import subprocess
    import sys

    from mmengine.logging.history_buffer import HistoryBuffer

    good = tmp_path / "log_buffers.pth"
    torch.save({"meta": {"stats": [LooksUpAttribute(HistoryBuffer, n) for n in ("min", "max", "current", "mean")]},
                "state_dict": {"pos_embed": torch.zeros(1)}}, good)
    code = ("import sys, torch, hieradet_mmdet; "
            "print(torch.load(sys.argv[1], weights_only=True)['meta']['stats'][3].__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True, timeout=120)
    # The last line: the fork's mmdet prints a line of its own when imported.
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1:] == ["mean"], proc.stderr[-2000:]
    for owner, name in ((HistoryBuffer, "update"), (HistoryBuffer, "__init__"), (np.ndarray, "tofile")):
        bad = tmp_path / f"{name}.pth"
        torch.save({"state": {}, "signature": LooksUpAttribute(owner, name)}, bad)
        with pytest.raises(CheckpointError, match=f"refusing to load checkpoint {re.escape(str(bad))}"):
            read_checkpoint(bad)
