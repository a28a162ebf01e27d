"""MMDetection's own tools (the copies inside the installed wheel, mmdet/.mim/tools), run from a
directory outside this repository on a config that loads the plugin through custom_imports:
train, then test, resume, infer (DetInferencer, init_detector) and count FLOPs with what train wrote."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch

from helpers import ROOT, fail_text, mmdet_tool, run_tool, tiny_any_config, tiny_detector_config

ITERS = 2


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """(directory, config, work dir): a run of MMDetection's own train.py, outside the repository."""
    directory = tmp_path_factory.mktemp("mmdet_tools")
    config, _ = tiny_detector_config(directory, iters=ITERS, narrow=True)
    work = directory / "work"
    proc = run_tool(mmdet_tool("train.py"), config, "--work-dir", work, cwd=directory)
    assert proc.returncode == 0, fail_text(proc)
    assert (work / f"iter_{ITERS}.pth").is_file()
    return directory, config, work


def test_mmdet_test_py_evaluates_what_its_train_py_wrote(user_run):
    directory, config, work = user_run
    proc = run_tool(mmdet_tool("test.py"), config, work / f"iter_{ITERS}.pth", "--work-dir", directory / "eval",
                    cwd=directory)
    assert proc.returncode == 0, fail_text(proc)
    text = proc.stdout + proc.stderr
    assert "bbox_mAP_copypaste" in text and "segm_mAP_copypaste" in text
    assert "do not match exactly" not in text  # every weight of the detector was in the checkpoint


def test_mmdet_train_py_writes_crash_safe_checkpoints(user_run):
    """The config's one line (SafeCheckpointHook) gives MMDetection's own train.py the same checkpoints."""
    from hieradet_mmdet.weights.digest import verify_checkpoint

    _, _, work = user_run
    assert (work / "last_checkpoint").read_text() == f"iter_{ITERS}.pth"  # relative to the work dir
    assert verify_checkpoint(str(work / f"iter_{ITERS}.pth"))  # carries a digest, and it matches
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]


def test_mmdet_train_py_resumes(user_run, tmp_path):
    directory, config, work = user_run
    resumed = tmp_path / "work"
    shutil.copytree(work, resumed)  # a moved work dir: last_checkpoint holds a relative path
    proc = run_tool(mmdet_tool("train.py"), config, "--work-dir", resumed, "--resume",
                    "--cfg-options", f"train_cfg.max_iters={ITERS + 1}", cwd=directory)
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert f"resumed epoch: 0, iter: {ITERS}" in log, fail_text(proc)
    assert f"Iter(train) [{ITERS + 1}/{ITERS + 1}]" in log


INFER = """
import sys
from mmdet.apis import DetInferencer, inference_detector, init_detector
config, checkpoint, image = sys.argv[1:]
model = init_detector(config, checkpoint, device="cpu")
result = inference_detector(model, image)
print("init_detector", len(result.pred_instances.bboxes))
inferencer = DetInferencer(model=config, weights=checkpoint, device="cpu", show_progress=False)
out = inferencer(image, no_save_vis=True, return_datasamples=True)
print("DetInferencer", len(out["predictions"][0].pred_instances.bboxes))
"""


def test_det_inferencer_and_init_detector_load_what_train_py_wrote(user_run):
    """In a fresh process: whether MMEngine's checkpoints load must not depend on what ran before."""
    directory, config, work = user_run
    image = next((directory / "data" / "val").glob("*.png"))
    proc = run_tool(sys.executable, "-c", INFER, config, work / f"iter_{ITERS}.pth", image, cwd=directory)
    assert proc.returncode == 0, fail_text(proc)
    counts = dict(re.findall(r"^(init_detector|DetInferencer) (\d+)$", proc.stdout, re.M))
    assert set(counts) == {"init_detector", "DetInferencer"}, fail_text(proc)
    assert int(counts["init_detector"]) > 0 and counts["init_detector"] == counts["DetInferencer"]


def test_mmdet_get_flops_counts_a_hieradet_mask_rcnn(tmp_path):
    config, _ = tiny_detector_config(tmp_path, iters=ITERS)  # HieraDet-S itself
    proc = run_tool(mmdet_tool("analysis_tools/get_flops.py"), config, "--num-images", "2", cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    flops = re.search(r"^Flops: ([0-9.]+)G$", proc.stdout, re.M)
    assert flops and float(flops.group(1)) > 0, fail_text(proc)
    assert "scaled_dot_product" not in proc.stdout + proc.stderr  # no attention left uncounted


@pytest.mark.parametrize("name", ["dino-4scale_hieradet-s_12e_coco.py", "mask2former_hieradet-s_lsj-50e_coco.py"])
def test_mmdet_get_flops_counts_dino_and_mask2former(name, tmp_path):
    config = tiny_any_config(tmp_path, name, with_mask="mask2former" in name)  # narrow: seconds
    proc = run_tool(mmdet_tool("analysis_tools/get_flops.py"), config, "--num-images", "1", cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    flops = re.search(r"^Flops: ([0-9.]+)([KMG])$", proc.stdout, re.M)  # narrow: millions
    assert flops and float(flops.group(1)) > 0, fail_text(proc)
    assert "scaled_dot_product" not in proc.stdout + proc.stderr  # no attention left uncounted


@pytest.mark.parametrize("arch", ["small", "d_small"])
def test_mmengine_flop_count_agrees_with_the_benchmarks(arch):
    """MMEngine (get_flops.py) counts a multiply-add as one FLOP and LayerNorm too; the benchmark
    (torch's FlopCounterMode) counts a multiply-add as two and no normalisation. Convolutions,
    linears and attention then agree exactly, on either path of the model."""
    from benchmarks.flops import count_flops
    from mmengine.analysis import FlopAnalyzer

    from hieradet_mmdet.models import HieraDet

    model = HieraDet(arch).eval()
    x = torch.randn(1, 3, 200, 328)  # a size birder cannot run
    by_operator = dict(FlopAnalyzer(model, (x,)).unsupported_ops_warnings(False).by_operator())
    assert by_operator["matmul"] > 0  # attention
    model.fast_path = False
    with torch.no_grad():
        benchmark = count_flops(lambda: model(x))
    assert sum(v for k, v in by_operator.items() if k != "layer_norm") * 2 == benchmark


# A config of a user's that inherits ours and writes its checkpoint hook as MMDetection's runtime base does.
MMDET_STYLE_CHECKPOINT = "default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False))\n"


def user_config(directory, base, body: str):
    path = directory / "user_config.py"
    path.write_text(f"_base_ = ['{base.as_posix()}']\n{body}")
    return path


@pytest.mark.parametrize("tool", ["mmdetection's", "ours"])
def test_a_checkpoint_hook_written_as_mmdetection_writes_it_trains_and_saves(tool, tmp_path):
    """Our configs' checkpoint hook carries no argument MMEngine's lacks, so overriding its type keeps
    none (it used to keep latest_interval_minutes, a TypeError at MMDetection's first save); our
    train.py makes it a SafeCheckpointHook with the user's arguments."""
    from hieradet_mmdet.weights.digest import verify_checkpoint

    base, _ = tiny_detector_config(tmp_path, iters=ITERS, narrow=True)
    config = user_config(tmp_path, base, MMDET_STYLE_CHECKPOINT)
    train = mmdet_tool("train.py") if tool == "mmdetection's" else ROOT / "tools" / "train.py"
    work = tmp_path / "work"
    proc = run_tool(train, config, "--work-dir", work, cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    assert (work / f"iter_{ITERS}.pth").is_file() and not (work / "iter_1.pth").exists()  # interval=2
    assert bool(verify_checkpoint(str(work / f"iter_{ITERS}.pth"))) == (tool == "ours")  # digest: SafeCheckpointHook


def test_our_hooks_arguments_under_mmengines_hook_are_refused_before_training(tmp_path):
    """Where the inherited config did set one of SafeCheckpointHook's arguments, MMDetection's train.py
    stops before the first iteration with one line saying what to write; ours trains (SafeCheckpointHook)."""
    base, _ = tiny_detector_config(tmp_path, iters=ITERS, narrow=True, options={
        "default_hooks.checkpoint.latest_interval_minutes": 5})
    config = user_config(tmp_path, base, MMDET_STYLE_CHECKPOINT)
    proc = run_tool(mmdet_tool("train.py"), config, "--work-dir", tmp_path / "mmdet", cwd=tmp_path)
    assert proc.returncode != 0
    line = next(line for line in proc.stderr.splitlines() if line.startswith("hieradet_mmdet.engine.checks.ConfigMergeError: "))
    assert "latest_interval_minutes" in line and "type='SafeCheckpointHook'" in line and "_delete_=True" in line, line
    assert "Iter(train)" not in proc.stdout + proc.stderr
    ours = run_tool(ROOT / "tools" / "train.py", config, "--work-dir", tmp_path / "ours", cwd=tmp_path)
    assert ours.returncode == 0, fail_text(ours)


def test_retinanet_trains_tests_and_resumes_through_both_tools(tmp_path):
    """RetinaNet (the single-stage config): MMDetection's train.py, then our test.py's COCO bbox AP,
    then our train.py resuming what MMDetection's wrote, and MMDetection's test.py on the result."""
    config, _ = tiny_detector_config(tmp_path, iters=ITERS, narrow=True, base="retinanet_hieradet_s.py")
    work = tmp_path / "work"
    proc = run_tool(mmdet_tool("train.py"), config, "--work-dir", work, cwd=tmp_path)
    assert proc.returncode == 0, fail_text(proc)
    proc = run_tool(ROOT / "tools" / "test.py", config, work / f"iter_{ITERS}.pth", "--work-dir", tmp_path / "eval")
    assert proc.returncode == 0 and "bbox_mAP_copypaste" in proc.stdout + proc.stderr, fail_text(proc)
    proc = run_tool(ROOT / "tools" / "train.py", config, "--work-dir", work, "--resume",
                    "--cfg-options", f"train_cfg.max_iters={ITERS + 1}")
    assert proc.returncode == 0, fail_text(proc)
    assert f"Iter(train) [{ITERS + 1}/{ITERS + 1}]" in proc.stdout + proc.stderr, fail_text(proc)
    proc = run_tool(mmdet_tool("test.py"), config, work / f"iter_{ITERS + 1}.pth", "--work-dir",
                    tmp_path / "eval2", cwd=tmp_path)
    assert proc.returncode == 0 and "bbox_mAP_copypaste" in proc.stdout + proc.stderr, fail_text(proc)
