"""End-to-end checks of tools/train.py, tools/test.py and tools/dist_train.sh on CPU.

A tiny generated dataset (4 train / 2 val images of 128 px) and Mask R-CNN HieraDet-S from
configs/maskrcnn_hieradet_s.py with a 2-iteration schedule: train -> test (COCO bbox + segm
AP) -> resume, a 2-process gloo run, and the refusals (hostile checkpoint, corrupt image).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "maskrcnn_hieradet_s.py"
SIZE = 128
ITERS = 2


def run_tool(*args, timeout=300, env=None, cwd=None):
    """Run a tool with this interpreter on CPU; returns the CompletedProcess."""
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    full_env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    full_env.update(env or {})
    cmd = list(args)
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


def fail_text(proc) -> str:
    return f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ckpt(path):
    from hieradet_mmdet.runtime import allow_mmengine_checkpoints

    allow_mmengine_checkpoints()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, data root): the tiny dataset and a standalone config file for it."""
    from mmengine.config import Config

    import hieradet_mmdet  # noqa: F401
    from hieradet_mmdet import synthetic_coco
    from hieradet_mmdet.runtime import small_run_overrides

    base = tmp_path_factory.mktemp("tools")
    data = base / "data"
    synthetic_coco.generate(str(data), num_train=4, num_val=2, size=SIZE, seed=1)
    cfg = Config.fromfile(str(BASE_CONFIG))
    cfg.merge_from_dict(synthetic_coco.mmdet_dataset_overrides(str(data), image_size=SIZE))
    cfg.merge_from_dict(small_run_overrides(ITERS, batch_size=2, lr=1e-4, log_interval=1,
                                            num_classes=len(synthetic_coco.CLASSES), rcnn_samples=64,
                                            proposals=100, max_dets=20))
    cfg.model.backbone.init_cfg = None  # offline: no published weights
    cfg.model.backbone.drop_path_rate = 0.0
    cfg.model.test_cfg.rcnn.score_thr = 0.0  # an untrained model still outputs boxes -> real AP numbers
    path = base / "tiny_maskrcnn.py"
    cfg.dump(str(path))
    return path, data


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    config, _ = tiny
    work = tmp_path_factory.mktemp("train")
    proc = run_tool("tools/train.py", str(config), "--work-dir", str(work))
    assert proc.returncode == 0, fail_text(proc)
    return work


def test_train_writes_a_checkpoint_with_optimizer_and_scheduler_state(trained):
    ckpt_path = trained / f"iter_{ITERS}.pth"
    assert ckpt_path.is_file(), sorted(os.listdir(trained))
    assert (trained / "last_checkpoint").read_text().strip().endswith(f"iter_{ITERS}.pth")
    ckpt = load_ckpt(ckpt_path)  # our own checkpoints load under weights_only
    assert ckpt["meta"]["iter"] == ITERS
    assert ckpt["optimizer"]["state"], "AdamW state missing"
    assert len(ckpt["param_schedulers"]) == 2
    assert any(k.startswith("backbone.blocks.") for k in ckpt["state_dict"])


def test_test_py_prints_coco_bbox_and_segm_ap(trained, tiny, tmp_path):
    config, _ = tiny
    out_pkl = tmp_path / "results.pkl"
    proc = run_tool("tools/test.py", str(config), str(trained / f"iter_{ITERS}.pth"), "--work-dir", str(tmp_path),
                    "--out", str(out_pkl), "--show-dir", "pictures")
    assert proc.returncode == 0, fail_text(proc)
    text = proc.stdout + proc.stderr
    assert "bbox_mAP_copypaste" in text and "segm_mAP_copypaste" in text  # CocoMetric's own report
    summary = re.search(r"\[hieradet-mmdet\] test metrics: (.*)", proc.stdout)
    assert summary, fail_text(proc)
    values = dict(item.split("=") for item in summary.group(1).split())
    for key in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"):
        assert key in values, values
        assert 0.0 <= float(values[key]) <= 1.0
    assert out_pkl.is_file() and out_pkl.stat().st_size > 0
    drawn = list(tmp_path.glob("*/pictures/*.png"))
    assert len(drawn) == 2, sorted(str(p) for p in tmp_path.rglob("*"))


def test_resume_restores_iteration_optimizer_and_scheduler(trained, tiny, monkeypatch):
    """The state train.py --resume puts into the runner equals the checkpoint's."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from hieradet_mmdet.runtime import enforce_safe_loading, prepare_config

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    enforce_safe_loading()
    config, _ = tiny
    ckpt_path = trained / f"iter_{ITERS}.pth"
    ckpt = load_ckpt(ckpt_path)
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(trained / "inprocess")
    cfg.resume, cfg.load_from = True, str(ckpt_path)
    prepare_config(cfg)
    runner = Runner.from_cfg(cfg)
    runner._train_loop = runner.build_train_loop(runner._train_loop)  # what train() does before resuming
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
    runner.param_schedulers = runner.build_param_scheduler(runner.param_schedulers)
    runner.load_or_resume()
    assert runner.iter == ITERS
    state = runner.optim_wrapper.state_dict()
    assert state["param_groups"] == ckpt["optimizer"]["param_groups"]
    assert state["state"].keys() == ckpt["optimizer"]["state"].keys()
    for idx, saved in ckpt["optimizer"]["state"].items():
        for name, value in saved.items():
            assert torch.equal(torch.as_tensor(state["state"][idx][name]), torch.as_tensor(value)), (idx, name)
    assert [s.state_dict() for s in runner.param_schedulers] == ckpt["param_schedulers"]
    model_state = runner.model.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in ckpt["state_dict"].items())


def test_train_resume_continues_at_the_next_iteration(trained, tiny, tmp_path):
    config, _ = tiny
    work = tmp_path / "resumed"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("inprocess"))
    # last_checkpoint holds an absolute path into the original work dir; --resume CKPT is explicit
    proc = run_tool("tools/train.py", str(config), "--work-dir", str(work), "--resume", str(work / f"iter_{ITERS}.pth"),
                    "--cfg-options", f"train_cfg.max_iters={ITERS + 1}")
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert f"resumed epoch: 0, iter: {ITERS}" in log, fail_text(proc)
    assert f"Iter(train) [{ITERS + 1}/{ITERS + 1}]" in log
    assert f"Iter(train) [{ITERS}/" not in log.split("resumed epoch")[1]  # no iteration ran twice
    ckpt = load_ckpt(work / f"iter_{ITERS + 1}.pth")
    assert ckpt["meta"]["iter"] == ITERS + 1
    # AdamW's per-parameter step counters continued from the checkpoint instead of restarting
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {ITERS + 1}


def test_dist_train_two_cpu_processes_with_amp(tiny, tmp_path):
    config, _ = tiny
    work = tmp_path / "dist"
    proc = run_tool("bash", str(ROOT / "tools" / "dist_train.sh"), str(config), "2", "--work-dir", str(work),
                    "--amp", "--cfg-options", "train_dataloader.batch_size=1",
                    env={"PORT": str(free_port()), "PYTHON": sys.executable}, timeout=400)
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert "Distributed training: True" in log
    assert "GPU number: 2" in log, fail_text(proc)  # MMEngine's name for the world size
    assert "--amp on CPU: bfloat16 autocast" in log
    assert f"Iter(train) [{ITERS}/{ITERS}]" in log
    ckpt = load_ckpt(work / f"iter_{ITERS}.pth")
    assert ckpt["meta"]["iter"] == ITERS


def test_dist_test_two_cpu_processes(trained, tiny, tmp_path):
    config, _ = tiny
    proc = run_tool("bash", str(ROOT / "tools" / "dist_test.sh"), str(config), str(trained / f"iter_{ITERS}.pth"), "2",
                    "--work-dir", str(tmp_path), env={"PORT": str(free_port()), "PYTHON": sys.executable},
                    timeout=400)
    assert proc.returncode == 0, fail_text(proc)
    assert "GPU number: 2" in proc.stdout + proc.stderr
    # results of both processes are gathered over gloo and evaluated once, on rank 0
    assert proc.stdout.count("[hieradet-mmdet] test metrics: bbox_mAP=") == 1, fail_text(proc)


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_checkpoint_is_refused(tiny, tmp_path):
    config, _ = tiny
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"meta": {"iter": 1}, "state_dict": {}, "payload": _Hostile(marker)}, evil)
    work = tmp_path / "work"
    work.mkdir()
    (work / "last_checkpoint").write_text(str(evil))
    runs = {
        "test.py": run_tool("tools/test.py", str(config), str(evil), "--work-dir", str(work)),
        "train.py --resume CKPT": run_tool("tools/train.py", str(config), "--work-dir", str(work), "--resume", str(evil)),
        "train.py --resume (auto)": run_tool("tools/train.py", str(config), "--work-dir", str(work), "--resume"),
    }
    for name, proc in runs.items():
        assert proc.returncode != 0, f"{name} accepted a hostile checkpoint\n{fail_text(proc)}"
        assert "refusing to load checkpoint" in proc.stderr and str(evil) in proc.stderr, f"{name}\n{fail_text(proc)}"
        assert "Traceback" not in proc.stderr, f"{name}: expected a clear error\n{fail_text(proc)}"
    assert not marker.exists(), "the hostile checkpoint's payload ran"


def test_corrupt_checkpoint_is_reported(tiny, tmp_path):
    config, _ = tiny
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    proc = run_tool("tools/test.py", str(config), str(broken))
    assert proc.returncode != 0
    assert "cannot read checkpoint" in proc.stderr and str(broken) in proc.stderr, fail_text(proc)


def test_checked_image_loader_names_the_file(tmp_path, tiny):
    from mmdet.registry import TRANSFORMS

    import hieradet_mmdet.runtime  # noqa: F401  (registers CheckedLoadImageFromFile)

    _, data = tiny
    loader = TRANSFORMS.build(dict(type="CheckedLoadImageFromFile"))
    good = data / "val" / "000000.png"
    out = loader(dict(img_path=str(good)))
    assert out["img"].shape == (SIZE, SIZE, 3)
    raw = good.read_bytes()
    cases = {"truncated.png": raw[: len(raw) // 2], "garbage.png": b"this is not an image" * 10, "empty.png": b"",
             "truncated.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 200}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))):
            loader(dict(img_path=str(tmp_path / name)))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.png"))):
        loader(dict(img_path=str(tmp_path / "missing.png")))
    # a complete JPEG followed by a long trailer (some cameras append data) is not "truncated"
    import cv2

    ok, jpeg = cv2.imencode(".jpg", out["img"])
    (tmp_path / "trailer.jpg").write_bytes(jpeg.tobytes() + b"\x00" * 4096)
    assert loader(dict(img_path=str(tmp_path / "trailer.jpg")))["img"].shape == (SIZE, SIZE, 3)


def test_corrupt_dataset_image_stops_test_py_naming_the_file(trained, tiny, tmp_path):
    config, data = tiny
    bad_root = tmp_path / "data"
    shutil.copytree(data, bad_root)
    victim = bad_root / "val" / "000001.png"
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated download
    proc = run_tool("tools/test.py", str(config), str(trained / f"iter_{ITERS}.pth"), "--work-dir", str(tmp_path),
                    "--cfg-options", f"test_dataloader.dataset.data_root={bad_root}/")
    assert proc.returncode != 0
    assert str(victim) in proc.stderr and "truncated" in proc.stderr, fail_text(proc)


def test_visualize_features_from_a_detector_checkpoint(trained, tiny, tmp_path):
    import cv2

    _, data = tiny
    image = data / "val" / "000000.png"
    proc = run_tool("tools/visualize_features.py", str(image), "--checkpoint", str(trained / f"iter_{ITERS}.pth"),
                    "--out", str(tmp_path / "feat"), "--size", "96")
    assert proc.returncode == 0, fail_text(proc)
    assert "RANDOM" not in proc.stderr
    names = sorted(p.name for p in (tmp_path / "feat").iterdir())
    assert names == ["overview.png", "stage1.png", "stage2.png", "stage3.png", "stage4.png"]
    stage = cv2.imread(str(tmp_path / "feat" / "stage4.png"))
    assert stage.shape[0] == 96 + 24 and stage.shape[1] == 2 * 96 + 6  # input | stage, labelled
    assert stage[24:, 96 + 6:].std() > 0  # not a blank picture

    proc = run_tool("tools/visualize_features.py", str(image), "--out", str(tmp_path / "rand"), "--size", "64")
    assert proc.returncode == 0 and "RANDOM weights" in proc.stderr, fail_text(proc)
    proc = run_tool("tools/visualize_features.py", str(tmp_path / "nope.png"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 1 and "nope.png does not exist" in proc.stderr


def test_roi_features_do_not_depend_on_the_memory_layout(tiny):
    """mmcv's RoIAlign reads channels-last maps (what HieraDet's views give the FPN) as if they
    were NCHW; the tools guard every RoI op of the model they build."""
    from mmcv.ops import RoIAlign
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from hieradet_mmdet.runtime import guard_roi_ops
    from mmdet.registry import MODELS

    torch.manual_seed(0)
    x = torch.randn(1, 8, 24, 24)
    rois = torch.tensor([[0, 2.0, 3.0, 15.0, 20.0], [0, 10.0, 1.0, 23.0, 9.0]])
    op = RoIAlign((7, 7), spatial_scale=1.0, sampling_ratio=0)
    reference = op(x, rois)
    assert guard_roi_ops(torch.nn.Sequential(op)) == 1
    assert torch.allclose(op(x.contiguous(memory_format=torch.channels_last), rois), reference)

    config, _ = tiny
    init_default_scope("mmdet")
    model = MODELS.build(Config.fromfile(str(config)).model).eval()
    assert guard_roi_ops(model) > 0 and guard_roi_ops(model) == 0  # idempotent
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, SIZE, SIZE))
        ext = model.roi_head.bbox_roi_extractor
        boxes = torch.tensor([[0, 8.0, 8.0, 60.0, 60.0], [0, 30.0, 40.0, 100.0, 120.0]])
        got = ext(feats[:ext.num_inputs], boxes)
        expected = ext([f.contiguous() for f in feats[:ext.num_inputs]], boxes)
    assert torch.allclose(got, expected)


def test_prepare_config_for_cpu_data_parallel(monkeypatch):
    from mmengine.config import Config

    from hieradet_mmdet.runtime import prepare_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config(dict(train_dataloader=dict(dataset=dict(pipeline=[dict(type="LoadImageFromFile"),
                                                                    dict(type="PackDetInputs")])),
                      model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=[0],
                                             find_unused_parameters=True)))
    prepare_config(cfg, "pytorch")
    assert cfg.launcher == "pytorch"
    assert cfg.model_wrapper_cfg.device_ids is None and cfg.model_wrapper_cfg.find_unused_parameters
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    assert cfg.train_dataloader.dataset.pipeline[0].type == "CheckedLoadImageFromFile"
    plain = prepare_config(Config(dict()), "none")
    assert plain.launcher == "none" and "model_wrapper_cfg" not in plain


def test_init_and_finish_distributed_on_cpu(monkeypatch):
    """The tools' own process-group lifecycle: created on CPU, gone again before exit."""
    import torch.distributed as dist

    from hieradet_mmdet.runtime import finish_distributed, init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)  # restored (or removed again) after the test
    assert not dist.is_initialized()
    init_distributed("pytorch")
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
    finally:
        finish_distributed()
    assert not dist.is_initialized()
    finish_distributed()  # and a no-op without a group
