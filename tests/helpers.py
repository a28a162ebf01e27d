"""What several test files need: birder reference models and checkpoint files, relative errors,
detectors built from configs with a synthetic batch, and running the tools as a user would."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.reference import birder_features, noise_bound, ours_from_birder, rel_err  # noqa: F401
from benchmarks.reference import make_birder as make_birder_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PUBLISHED = "hieradet_d_small_dino-v2-imagenet12k"

# ---- numbers (rel_err and birder, the reference: benchmarks.reference) -------------------


def assert_close_rel(ours, ref, tol=1e-5):
    ours, ref = list(ours), list(ref)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        err = rel_err(a, b)
        assert err <= tol, err


def assert_fp32_within_reference_noise(ours, ref, truth, factor=4.0, floor=1e-6):
    """Each fp32 result of ``ours`` is no further from the float64 ``truth`` than ``factor`` times
    the fp32 reference ``ref`` is, plus ``floor``: a bound made from the reference's own rounding
    on the CPU at hand, not from what one CPU's float32 kernels happened to give."""
    ours, ref, truth = list(ours), list(ref), list(truth)
    assert len(ours) == len(ref) == len(truth)
    for i, (a, r, t) in enumerate(zip(ours, ref, truth)):
        assert a.shape == r.shape == t.shape, i
        err, noise = rel_err(a, t), rel_err(r, t)
        assert err <= noise_bound(noise, factor, floor), (i, err, noise)


# ---- the fast path's CPU-dependent choices, forced ---------------------------------------------


def force_fused_linears(monkeypatch, fused: bool) -> list:
    """Make the fast path take its fused-linear branch (``fused``) or its plain one, whatever this
    CPU offers. Forced on, the fused kernels are the plain PyTorch ops they fuse, in the same dtype
    (oneDNN has no bf16 kernels on CPUs without AVX-512 BF16 or AMX; tests/models/test_fused_linear.py
    compares oneDNN's kernels with these where this CPU has them). Returns the dtypes the kernels ran in."""
    import torch.nn.functional as F

    from hieradet_mmdet.models import fused_linear

    calls = []

    def linear(x, weight, bias, gelu):
        calls.append(x.dtype)
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y

    def linear_add(x, residual, weight, bias):
        calls.append(x.dtype)
        return residual + F.linear(x, weight, bias)

    monkeypatch.setattr(fused_linear, "fused_linear_available", lambda dtype=torch.float32: fused)
    monkeypatch.setattr(fused_linear, "fused_linear_kernel", linear)
    monkeypatch.setattr(fused_linear, "fused_linear_add_kernel", linear_add)
    return calls


# ---- birder checkpoints and test images -------------------------------------------------------

CHECKPOINT_SIZE = 64  # the input size the classifier checkpoints are saved with (birder's signature)
CLASS_TO_IDX = {"Eurasian jay": 0, "Common chaffinch": 1, "Great tit": 2, "Eurasian wren": 3,
                "Hooded crow": 4, "White wagtail": 5, "Common kingfisher": 6}


def save_birder_checkpoints(model, network_name: str, directory, rgb_stats) -> dict:
    """Write ``model`` as birder does (``checkpoint_model`` .pt and ``save_st`` .safetensors)."""
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.net.base import get_signature

    signature = get_signature((1, 3, CHECKPOINT_SIZE, CHECKPOINT_SIZE), len(CLASS_TO_IDX))
    old_models_dir = settings.MODELS_DIR
    settings.MODELS_DIR = directory  # checkpoint_model always writes under birder's models dir
    try:
        fs_ops.checkpoint_model(network_name, 0, model, signature, CLASS_TO_IDX, rgb_stats,
                                None, None, None, None)
        pt = fs_ops.model_path(network_name, epoch=0)
    finally:
        settings.MODELS_DIR = old_models_dir
    safetensors = Path(directory) / f"{network_name}.safetensors"
    fs_ops.save_st(model, str(safetensors), model.task, CLASS_TO_IDX, signature, rgb_stats)
    return {"pt": Path(pt), "safetensors": safetensors}


def write_test_images(directory: Path) -> dict:
    """Real image files: RGB PNG/JPEG of various shapes, greyscale, RGBA, palette, and a broken one."""
    from PIL import Image

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


# ---- detectors from configs -------------------------------------------------------------------

FAST_RPN_PROPOSALS = dict(nms_pre=200, max_per_img=100)
IMAGE_SIZES = ((64, 96), (96, 64))  # (h, w); small keeps a two-stage step around a second or two


def load_config(name: str):
    """A config of configs/ by its name there, as the tools load it."""
    from hieradet_mmdet.detectors import load_config as load

    return load(str(CONFIGS / name))


def shrink_two_stage(cfg) -> None:
    """Fewer proposals and RoI samples; the model is unchanged, only its train/test settings."""
    tr, te = cfg.model.get("train_cfg"), cfg.model.get("test_cfg")
    if tr is not None and "rpn_proposal" in tr:
        tr.rpn_proposal.update(FAST_RPN_PROPOSALS)
        stages = tr.rcnn if isinstance(tr.rcnn, list) else [tr.rcnn]
        for stage in stages:
            stage.sampler.num = 64
    if te is not None and "rpn" in te:
        te.rpn.update(FAST_RPN_PROPOSALS)


def random_detector(cfg, seed: int = 0):
    """The config's detector on CPU with random weights (no checkpoint in tests; ``seed``), few
    proposals and RoI samples (:func:`shrink_two_stage`), in training mode as MMDetection builds it."""
    from hieradet_mmdet.detectors import build_detector

    cfg.model.backbone.init_cfg = None
    shrink_two_stage(cfg)
    torch.manual_seed(seed)
    return build_detector(cfg).train()


def synthetic_batch(sizes=IMAGE_SIZES, with_mask=True, seed=0):
    """A data batch as a dataloader gives it: uint8 CHW images and packed DetDataSamples,
    each image with two boxes (and their masks) of classes 0 and 3."""
    from mmengine.structures import InstanceData

    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks

    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i, (h, w) in enumerate(sizes):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
        boxes = torch.tensor([[8.0, 10.0, w * 0.6, h * 0.7], [w * 0.4, h * 0.3, w - 4.0, h - 6.0]])
        sample = DetDataSample(metainfo=dict(img_id=i, img_shape=(h, w), ori_shape=(h, w),
                                             scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
        gt = InstanceData(bboxes=HorizontalBoxes(boxes), labels=torch.tensor([0, 3]))
        if with_mask:
            masks = np.zeros((2, h, w), dtype=np.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
                m[y1:y2, x1:x2] = 1
            gt.masks = BitmapMasks(masks, h, w)
        sample.gt_instances = gt
        sample.ignored_instances = InstanceData(bboxes=HorizontalBoxes(torch.zeros(0, 4)),
                                                labels=torch.zeros(0, dtype=torch.long))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def train_step_and_predict(model, optim_wrapper_cfg, with_mask=True):
    """One optimisation step with the config's optimizer, then predict; returns facts to assert on."""
    from mmengine.optim import build_optim_wrapper

    optim_wrapper = build_optim_wrapper(model, optim_wrapper_cfg)
    model.train()
    data = model.data_preprocessor(synthetic_batch(with_mask=with_mask), True)
    optim_wrapper.zero_grad()
    with optim_wrapper.optim_context(model):  # autocast under AmpOptimWrapper
        losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    optim_wrapper.backward(loss)  # loss scaling under AmpOptimWrapper
    bb = model.backbone
    grads = {
        "patch_embed": bb.patch_embed.weight.grad,
        "block0": bb.blocks[0].attn.qkv.weight.grad,
        "last_block": bb.blocks[-1].mlp.fc2.weight.grad,
    }
    before = bb.blocks[0].attn.qkv.weight.detach().clone()
    optim_wrapper.step()
    moved = not torch.equal(before, bb.blocks[0].attn.qkv.weight.detach())

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(synthetic_batch(with_mask=with_mask, seed=1), False)
        results = model(**data, mode="predict")
    return dict(loss=loss.detach(), log_vars=log_vars, grads=grads, moved=moved, results=results,
                optim_wrapper=optim_wrapper)


def assert_trains_and_predicts(model, optim_wrapper_cfg, with_mask=True):
    out = train_step_and_predict(model, optim_wrapper_cfg, with_mask=with_mask)
    assert torch.isfinite(out["loss"]), out["log_vars"]
    for name, grad in out["grads"].items():
        assert grad is not None and torch.isfinite(grad).all(), f"no finite gradient at backbone {name}"
        assert grad.abs().sum() > 0, f"zero gradient at backbone {name}"
    assert out["moved"], "the optimizer step did not change backbone block 0"
    results = out["results"]
    assert len(results) == 2
    for r, (h, w) in zip(results, IMAGE_SIZES):
        pred = r.pred_instances
        assert pred.bboxes.shape[-1] == 4 and len(pred.scores) == len(pred.labels) == len(pred.bboxes)
        assert r.ori_shape == (h, w)
        if with_mask:
            assert "masks" in pred and tuple(pred.masks.shape[-2:]) == (h, w)
    return out


# ---- running the tools as a user would ---------------------------------------------------------


def run_tool(*args, timeout=300, env=None, cwd=None):
    """Run a tool (a .py with this interpreter, or any command) on CPU; returns the CompletedProcess."""
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    full_env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    full_env.update(env or {})
    cmd = [str(a) for a in args]
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The training processes torchrun started, by their RANK."""
    pids = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        env = dict(kv.split(b"=", 1) for kv in environ if b"=" in kv)
        ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))
        if b"RANK" in env and ppid == launcher.pid and b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
            pids[int(env[b"RANK"])] = int(pid)
    return pids


def fail_text(proc) -> str:
    return f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def mmdet_tool(name: str) -> Path:
    """One of MMDetection's own tools, as its wheel installs them (mmdet/.mim/tools/NAME)."""
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "tools" / name


TIMING_KEYS = ("time", "data_time", "eta")


def logged_training_values(work: Path) -> dict[int, dict]:
    """Per-iteration logged training values of every run in a work dir (MMEngine's
    vis_data/scalars.json), keyed by iteration, without the timings that differ between runs."""
    import json

    out = {}
    for path in sorted(work.glob("*/vis_data/scalars.json")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_mmengine_checkpoint(path):
    """One of our (MMEngine) checkpoints, read as the tools read them: weights-only."""
    from hieradet_mmdet.weights.reader import allow_mmengine_types

    allow_mmengine_types()
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_detector_config(directory: Path, iters: int = 2, size: int = 128, base: str = "maskrcnn_hieradet_s.py",
                         num_train: Optional[int] = None, num_val: int = 2, narrow: bool = False,
                         options: Optional[dict] = None) -> tuple[Path, Path]:
    """A small synthetic COCO dataset and a standalone config of ``base`` on it (random backbone,
    an ``iters``-iteration schedule, few proposals; ``narrow``: narrow_detector_config, every block
    kind of HieraDet with a few channels): (config path, data root).
    By default one epoch covers every iteration: MMEngine's iteration loop sleeps 2 s whenever it
    restarts the data loader."""
    if num_train is None:
        num_train = max(4, 2 * iters)
    from hieradet_mmdet.demo import synthetic_coco
    from hieradet_mmdet.demo.small_run import set_num_classes, small_run_overrides

    data = directory / "data"
    synthetic_coco.generate(str(data), num_train=num_train, num_val=num_val, size=size, seed=1)
    cfg = load_config(base)
    with_mask = "mask" in base
    cfg.merge_from_dict(synthetic_coco.mmdet_dataset_overrides(str(data), image_size=size, with_mask=with_mask))
    cfg.merge_from_dict(small_run_overrides(iters, batch_size=2, lr=1e-4, log_interval=1, rcnn_samples=64,
                                            proposals=100, max_dets=20, with_mask=with_mask))
    set_num_classes(cfg.model, len(synthetic_coco.CLASSES))  # any family: R-CNN heads or RetinaNet's
    cfg.model.backbone.init_cfg = None  # offline: no published weights
    cfg.model.backbone.drop_path_rate = 0.0
    if cfg.model.get("test_cfg", {}).get("rcnn") is not None:
        cfg.model.test_cfg.rcnn.score_thr = 0.0  # an untrained model still outputs boxes -> real AP numbers
    if "score_thr" in cfg.model.get("test_cfg", {}):
        cfg.model.test_cfg.score_thr = 0.0  # the same for single-stage heads
    if narrow:
        from narrow_configs import narrow_detector_config

        narrow_detector_config(cfg)
    if options:
        cfg.merge_from_dict(options)
    path = directory / f"tiny_{Path(base).stem}.py"
    cfg.dump(str(path))
    return path, data


def tiny_epoch_config(directory: Path, record_loads: bool = False, **options) -> Path:
    """An epoch-based tiny_detector_config as the shipped configs train: ResumableEpochBasedTrainLoop,
    2 epochs of 4 batches (7 images in batches of 2 from AspectRatioBatchSampler, the last one its
    leftover), validation after each, an epoch schedule after an iteration warm-up, and
    SafeCheckpointHook's rolling latest.pth after every iteration. ``record_loads``: every sample the
    training pipeline loads is written to ``directory``/loads.txt (tests/load_counter.py; run the
    tools with tests/ on PYTHONPATH)."""
    overrides = {
        "train_cfg": dict(_delete_=True, type="ResumableEpochBasedTrainLoop", max_epochs=2, val_interval=1),
        "param_scheduler": [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=3),
                            dict(type="MultiStepLR", by_epoch=True, begin=0, end=2, milestones=[1], gamma=0.5)],
        "default_hooks.checkpoint": dict(_delete_=True, type="SafeCheckpointHook", by_epoch=True, interval=1,
                                         latest_interval_iters=1, latest_interval_minutes=None, max_keep_ckpts=3),
        "log_processor": dict(type="LogProcessor", window_size=1, by_epoch=True),
        "train_dataloader.batch_sampler": dict(type="AspectRatioBatchSampler"),
        "randomness.seed": 0}
    if record_loads:
        overrides["custom_imports"] = dict(imports=["hieradet_mmdet", "load_counter"], allow_failed_imports=False)
    path, _ = tiny_detector_config(directory, iters=4, size=96, narrow=True, num_train=7, num_val=2,
                                   options={**overrides, **options})
    if record_loads:
        from mmengine.config import Config

        cfg = Config.fromfile(str(path))
        cfg.train_dataloader.dataset.pipeline.insert(0, dict(type="RecordLoads", path=str(directory / "loads.txt")))
        cfg.dump(str(path))
    return path


def tiny_any_config(directory: Path, name: str, with_mask: bool, size: int = 96) -> Path:
    """A config of configs/ of any family (DINO, Mask2Former, the LSJ recipes) on a synthetic set of
    ``size`` px, narrow, with its own loop type: one epoch of two batches (or two iterations),
    validated and checkpointed at the end; images padded to ``size`` where the config pads to a
    fixed size. Panoptic configs get the synthetic COCO-panoptic set (3 thing, 2 stuff classes)."""
    from narrow_configs import narrow_detector_config
    from hieradet_mmdet.demo import synthetic_coco, synthetic_panoptic
    from hieradet_mmdet.demo.small_run import set_num_classes

    data = directory / "data"
    panoptic = "panoptic" in name
    if panoptic:
        synthetic_panoptic.generate(str(data), num_train=4, num_val=2, size=size, seed=1)
        overrides = synthetic_panoptic.mmdet_dataset_overrides(str(data), image_size=size)
    else:
        synthetic_coco.generate(str(data), num_train=4, num_val=2, size=size, seed=1)
        overrides = synthetic_coco.mmdet_dataset_overrides(str(data), with_mask=with_mask, image_size=size)
    cfg = load_config(name)
    inner = cfg.train_dataloader.dataset
    while inner.type == "RepeatDataset":  # the LSJ configs: 25 passes over the set repeated 4 times
        inner.times = 1
        inner = inner.dataset
    inner.update(overrides.pop("train_dataloader.dataset"))
    cfg.merge_from_dict(overrides)
    narrow_detector_config(cfg)
    shrink_two_stage(cfg)
    set_num_classes(cfg.model, len(synthetic_coco.CLASSES), len(synthetic_panoptic.STUFF_CLASSES) if panoptic else 0)
    cfg.model.backbone.init_cfg = None
    for augment in cfg.model.data_preprocessor.get("batch_augments") or []:
        augment.size = (size, size)
    if cfg.model.get("test_cfg", {}).get("rcnn") is not None:
        cfg.model.test_cfg.rcnn.score_thr = 0.0  # an untrained model still gives boxes: real AP numbers
    loader = dict(batch_size=2, num_workers=0, persistent_workers=False)
    cfg.merge_from_dict({"train_dataloader": loader, "val_dataloader": dict(loader, batch_size=1),
                         "test_dataloader": dict(loader, batch_size=1), "default_hooks.logger.interval": 1})
    if cfg.train_cfg.type == "ResumableIterBasedTrainLoop":
        cfg.train_cfg.update(max_iters=2, val_interval=2, dynamic_intervals=None)
        cfg.default_hooks.checkpoint.interval = 2
    else:
        cfg.train_cfg.update(max_epochs=1, val_interval=1)
    path = directory / f"tiny_{name}"
    cfg.dump(str(path))
    return path
