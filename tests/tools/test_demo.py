"""``make demo`` (tools/demo.py) end to end on a tiny run (where it looks for the weights:
tests/demo/test_run.py)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

WEIGHTS_FILE = "hieradet_d_small_dino-v2-imagenet12k.pt"


def test_demo_runs_end_to_end_with_weights_from_the_hub_cache(birder_files, tmp_path):
    # The README's way to provide the real weights: the file in torch's hub cache.
    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    cached = torch_home / "hub" / "checkpoints" / WEIGHTS_FILE
    shutil.copy(birder_files["pt"], cached)
    work = tmp_path / "demo"
    env = {**os.environ, "TORCH_HOME": str(torch_home), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "tools/demo.py", "--work-dir", str(work), "--iters", "2", "--train-images", "4",
         "--val-images", "2", "--size", "96", "--num-pictures", "2", "--log-interval", "1", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"pretrained backbone weights from {cached}" in out
    assert "HieraDet: loaded trunk weights from" in out + proc.stderr
    assert "Iter(train) [2/2]" in out + proc.stderr  # progress is logged
    assert "results (pretrained backbone weights, 2 iterations)" in out
    rows = dict(re.findall(r"^(bbox_mAP|segm_mAP)\s+(\S+\s+\S+)$", out, re.M))
    assert set(rows) == {"bbox_mAP", "segm_mAP"}, out[-2000:]
    for before_after in rows.values():
        assert all(0.0 <= float(v) <= 1.0 for v in before_after.split())
    # Everything it says it wrote exists.
    assert len(list((work / "data" / "train").glob("*.png"))) == 4
    assert len(list((work / "predictions").glob("*.png"))) == 2
    assert (work / "features" / "overview.png").is_file()
    assert (work / "iter_2.pth").is_file() and (work / "demo_config.py").is_file()
    for path in re.findall(r"^  (?:dataset|config|checkpoint|predictions)\s+(\S+)", out, re.M):
        assert Path(path.rstrip("/")).exists(), path
