"""End-to-end checks of tools/train.py, tools/test.py and tools/dist_train.sh on CPU.

A tiny generated dataset (4 train / 2 val images of 128 px) and Mask R-CNN HieraDet-S from
configs/maskrcnn_hieradet_s.py with a 2-iteration schedule: train -> test (COCO bbox + segm
AP) -> resume, a 2-process gloo run, and the refusals (hostile checkpoint, corrupt image).
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest
import torch

from helpers import ROOT, fail_text, free_port, random_detector, run_tool, tiny_detector_config
from helpers import load_mmengine_checkpoint as load_ckpt

SIZE = 128
ITERS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, data root): the tiny dataset and a standalone config file for it."""
    return tiny_detector_config(tmp_path_factory.mktemp("tools"), iters=ITERS, size=SIZE, narrow=True)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    config, _ = tiny
    work = tmp_path_factory.mktemp("train")
    proc = run_tool("tools/train.py", str(config), "--work-dir", str(work))
    assert proc.returncode == 0, fail_text(proc)
    return work


def test_train_writes_a_checkpoint_with_optimizer_and_scheduler_state(trained):
    log = next(trained.glob("*/*.log")).read_text()  # MMEngine's log file of the run
    assert "config change: train_dataloader.dataset.pipeline[0]: LoadImageFromFile -> CheckedLoadImageFromFile" in log
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

    from hieradet_mmdet.engine.runner import enforce_safe_loading, prepare_config

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


def test_dist_train_two_cpu_processes_with_amp_bf16(tiny, tmp_path):
    """Data-parallel training in bf16, forced: the bf16 path runs on any CPU (slowly where bf16 is
    emulated, and the run says that the measurement would have stayed in float32)."""
    config, _ = tiny
    work = tmp_path / "dist"
    proc = run_tool("bash", str(ROOT / "tools" / "dist_train.sh"), str(config), "2", "--work-dir", str(work),
                    "--amp", "bf16", "--cfg-options", "train_dataloader.batch_size=1",
                    env={"PORT": str(free_port()), "PYTHON": sys.executable}, timeout=600)
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert "Distributed training: True" in log
    assert "GPU number: 2" in log, fail_text(proc)  # MMEngine's name for the world size
    assert log.count("--amp bf16 on CPU: bfloat16 autocast over the whole detector") == 2, fail_text(proc)
    assert f"Iter(train) [{ITERS}/{ITERS}]" in log
    ckpt = load_ckpt(work / f"iter_{ITERS}.pth")
    assert ckpt["meta"]["iter"] == ITERS
    assert "terminate called" not in log


def test_dist_test_two_cpu_processes_in_bf16(trained, tiny, tmp_path):
    config, _ = tiny
    proc = run_tool("bash", str(ROOT / "tools" / "dist_test.sh"), str(config), str(trained / f"iter_{ITERS}.pth"), "2",
                    "--work-dir", str(tmp_path), "--amp", "bf16",
                    env={"PORT": str(free_port()), "PYTHON": sys.executable}, timeout=400)
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert "GPU number: 2" in log
    assert log.count("--amp bf16 on CPU: bfloat16 autocast") == 2, fail_text(proc)
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


def _variants(ckpt: dict) -> dict:
    """Checkpoints that do not fit the tiny 3-class Mask R-CNN, as users end up holding them."""
    state = ckpt["state_dict"]
    meta = {k: v for k, v in ckpt["meta"].items() if not k.startswith("hieradet_")}  # edited: no digest of ours
    coco_head = dict(state)
    for key in ("roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_cls.bias"):
        coco_head[key] = torch.zeros(81, *state[key].shape[1:])  # 80 classes + background
    coco_head["roi_head.mask_head.conv_logits.weight"] = torch.zeros(80, *state["roi_head.mask_head.conv_logits.weight"].shape[1:])
    return {
        "backbone-only": ({k: v for k, v in state.items() if k.startswith("backbone.")}, ["neck.*", "roi_head.*"]),
        "renamed": ({f"detector.{k}": v for k, v in state.items()}, ["backbone.*", "detector.*"]),
        "coco-head": ({"meta": meta, "state_dict": coco_head},
                      ["roi_head.bbox_head.fc_cls.weight: (81, 64) vs (4, 64)"]),
    }


def test_checkpoints_that_do_not_fit_the_detector_are_described(trained, tiny, tmp_path):
    from mmengine.config import Config

    from hieradet_mmdet.weights.fit import checkpoint_mismatch

    config, _ = tiny
    model = random_detector(Config.fromfile(str(config)))
    ckpt = load_ckpt(trained / f"iter_{ITERS}.pth")
    assert checkpoint_mismatch(model, str(trained / f"iter_{ITERS}.pth")) is None
    for name, (content, expected) in _variants(ckpt).items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        text = checkpoint_mismatch(model, str(path))
        for part in expected:
            assert part in text, f"{name}: {part!r}\n{text}"
        assert len(text.splitlines()) < 30, "the keys are grouped, not listed one per line"


def test_test_py_refuses_a_checkpoint_that_does_not_fit_the_detector(trained, tiny, tmp_path):
    config, _ = tiny
    ckpt = load_ckpt(trained / f"iter_{ITERS}.pth")
    path = tmp_path / "backbone-only.pth"
    torch.save(_variants(ckpt)["backbone-only"][0], path)
    proc = run_tool("tools/test.py", str(config), str(path), "--work-dir", str(tmp_path / "refused"))
    assert proc.returncode == 1, fail_text(proc)
    assert f"checkpoint {path} does not fit the detector" in proc.stderr and "neck.*" in proc.stderr, fail_text(proc)
    assert "bbox_mAP" not in proc.stdout  # nothing was evaluated
    proc = run_tool("tools/test.py", str(config), str(path), "--work-dir", str(tmp_path / "partial"),
                    "--allow-partial-load")
    assert proc.returncode == 0 and "loads only partly" in proc.stderr, fail_text(proc)
    assert "[hieradet-mmdet] test metrics: bbox_mAP=" in proc.stdout


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


def test_visualize_features_from_a_detector_checkpoint(tiny, tmp_path):
    import cv2
    from mmengine.runner.checkpoint import save_checkpoint

    from hieradet_mmdet.models import HieraDet

    _, data = tiny
    image = data / "val" / "000000.png"
    detector_ckpt = tmp_path / "epoch_12.pth"  # a HieraDet-S detector's checkpoint, as MMEngine writes it
    trunk = {f"backbone.{k}": v for k, v in HieraDet("small").state_dict().items()}
    save_checkpoint({"meta": {"epoch": 12}, "state_dict": {**trunk, "neck.conv.weight": torch.zeros(1)}},
                    str(detector_ckpt))
    proc = run_tool("tools/visualize_features.py", str(image), "--checkpoint", str(detector_ckpt),
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
