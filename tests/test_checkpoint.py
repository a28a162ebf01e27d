"""Checkpoint reading: every form users hold loads into our trunk and gives birder's numbers;
everything that cannot load fails loudly, naming the file (and keys and shapes)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import pickle
import re
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CHECKPOINT_SIZE, CLASS_TO_IDX, make_birder_model, save_birder_checkpoints
from hieradet_mmdet import pretrained
from hieradet_mmdet.checkpoint import CheckpointError, load_backbone_weights, read_checkpoint
from hieradet_mmdet.hieradet import HieraDet
from hieradet_mmdet.pretrained import WeightsUnavailableError

PUBLISHED = "hieradet_d_small_dino-v2-imagenet12k"
SIZES = [(64, 64), (96, 160)]  # token grids must be multiples of 8 for birder's window embedding


def assert_close_rel(ours, ref, tol=1e-5):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()).item() <= tol


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
    with pytest.raises(CheckpointError, match=r"refused to load: unpickling it would import and call posix.system") as info:
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


# --- Published names and URLs: download, cache, checksum, offline --------------------------


@pytest.fixture
def served_published(birder_files, tmp_path, monkeypatch):
    """The published entry pointed at a local file:// copy of a birder checkpoint."""
    served = tmp_path / "server" / f"{PUBLISHED}.pt"
    served.parent.mkdir()
    served.write_bytes(Path(birder_files["pt"]).read_bytes())
    entry = dataclasses.replace(pretrained.PRETRAINED[PUBLISHED], url=served.as_uri(),
                                sha256=pretrained.sha256_of(served))
    monkeypatch.setitem(pretrained.PRETRAINED, PUBLISHED, entry)
    return served


def test_published_name_downloads_once_verifies_and_caches(served_published, hub_dir, capfd, birder_pair):
    ckpt = read_checkpoint(PUBLISHED)
    cached = hub_dir / f"{PUBLISHED}.pt"
    assert ckpt.path == cached and cached.read_bytes() == served_published.read_bytes()
    assert "100%" in capfd.readouterr().err  # the progress bar
    assert ckpt.metadata["weights"] == PUBLISHED and ckpt.arch == "d_small"
    assert ckpt.metadata["size"] == (CHECKPOINT_SIZE, CHECKPOINT_SIZE)  # the file's own signature wins

    served_published.unlink()  # now only the cache has it; the alias resolves to the same file
    assert read_checkpoint("hieradet_small_dino-v2-imagenet12k").path == cached
    assert sorted(os.listdir(hub_dir)) == [f"{PUBLISHED}.pt"]

    cached.write_bytes(cached.read_bytes()[:1000])  # e.g. an interrupted manual download
    with pytest.raises(WeightsUnavailableError, match=f"cached checkpoint {re.escape(str(cached))} has sha256"):
        read_checkpoint(PUBLISHED)


def test_checksum_mismatch_deletes_the_download(served_published, hub_dir, monkeypatch):
    entry = dataclasses.replace(pretrained.PRETRAINED[PUBLISHED], sha256="0" * 64)
    monkeypatch.setitem(pretrained.PRETRAINED, PUBLISHED, entry)
    with pytest.raises(WeightsUnavailableError, match="sha256 .* instead of the published 0000"):
        read_checkpoint(PUBLISHED, progress=False)
    assert os.listdir(hub_dir) == []


def test_offline_published_name_says_what_to_fetch_and_where(hub_dir, monkeypatch):
    from urllib.error import URLError

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(pretrained, "urlopen", no_network)
    for name in (PUBLISHED, "hieradet_small_dino-v2-imagenet12k"):
        with pytest.raises(WeightsUnavailableError) as info:
            read_checkpoint(name)
        message = str(info.value)
        assert "https://huggingface.co/birder-project/hieradet_d_small_dino-v2-imagenet12k/resolve/main/" \
               "hieradet_d_small_dino-v2-imagenet12k.pt" in message
        assert "b89dd6c13d061fe8a09d051bb3d76e632e650067ca71578e37b02033107c9963" in message
        assert str(hub_dir / f"{PUBLISHED}.pt") in message
        assert "init_cfg=dict(type='Pretrained', checkpoint='/path/to/" in message
        assert "name resolution" in message
    assert os.listdir(hub_dir) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_downloads_into_cache_by_file_name(birder_files, hub_dir):
    directory = Path(birder_files["pt"]).parent
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{Path(birder_files['pt']).name}"
    try:
        ckpt = read_checkpoint(url, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert ckpt.path == hub_dir / Path(birder_files["pt"]).name and ckpt.has_head
    assert read_checkpoint(url).path == ckpt.path  # served from the cache now that the server is gone

    offline = f"http://127.0.0.1:{closed_port()}/elsewhere.pt"
    with pytest.raises(WeightsUnavailableError, match=r"Could not download .*elsewhere.pt") as info:
        read_checkpoint(offline)
    assert str(hub_dir / "elsewhere.pt") in str(info.value)
    assert not (hub_dir / "elsewhere.pt").exists()


# --- Through MMDetection: init_cfg of a real detector, and that detector's own checkpoint ---


def small_retinanet(init_cfg, mean=(0, 0, 0), std=(1, 1, 1)):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    return MODELS.build(dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=list(mean), std=list(std), pad_size_divisor=32),
        backbone=dict(type="HieraDet", arch="d_small", out_indices=(1, 2, 3), init_cfg=init_cfg),
        neck=dict(type="FPN", in_channels=[192, 384, 768], out_channels=32, num_outs=3),
        bbox_head=dict(
            type="RetinaHead", num_classes=2, in_channels=32, stacked_convs=1, feat_channels=32,
            anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=1,
                                  ratios=[1.0], strides=[8, 16, 32]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True), loss_bbox=dict(type="L1Loss")),
        test_cfg=dict(nms_pre=100, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=10)))


def test_detector_init_cfg_and_its_saved_checkpoint(birder_files, reference_features, tmp_path):
    from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

    x, ref = reference_features[("d_small", (96, 160))]
    detector = small_retinanet(dict(type="Pretrained", checkpoint=str(birder_files["pt"])))
    stats = birder_files["rgb_stats"]
    want_mean = [round(255 * v, 4) for v in stats["mean"]]
    with pytest.warns(UserWarning, match="trained with rgb_stats") as record:
        detector.init_weights()  # mean 0 / std 1 is not what the checkpoint's rgb_stats say
    assert f"set model.data_preprocessor.mean={want_mean}" in str(record[0].message)
    assert {k: list(v) for k, v in detector.backbone.pretrained_rgb_stats.items()} == \
        {k: list(v) for k, v in stats.items()}
    detector.eval()
    with torch.no_grad():
        assert_close_rel(detector.backbone(x), ref[1:])

    # What mmengine's Runner writes for this detector, read back through another init_cfg.
    path = tmp_path / "epoch_1.pth"
    save_checkpoint({"meta": {"epoch": 1}, "state_dict": weights_to_cpu(get_state_dict(detector))}, str(path))
    fresh = small_retinanet(dict(type="Pretrained", checkpoint=str(path)))
    fresh.init_weights()  # an MMDetection checkpoint carries no rgb_stats: nothing to compare
    fresh.eval()
    with torch.no_grad():
        assert_close_rel(fresh.backbone(x), ref[1:])

    # Preprocessing as the checkpoint says: no warning (any warning would fail this block).
    matching = small_retinanet(dict(type="Pretrained", checkpoint=str(birder_files["safetensors"])),
                               mean=[255 * v for v in stats["mean"]], std=[255 * v for v in stats["std"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        matching.init_weights()
    pickle.dumps(matching)  # the backbone's link to its detector does not get in the way of pickling
    matching.eval()
    with torch.no_grad():
        assert_close_rel(fresh.backbone(x), ref[1:])
