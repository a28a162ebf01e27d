"""tools/synthetic_coco.py run as users run it (the dataset itself: tests/demo/test_synthetic_coco.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_cli(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "synthetic_coco.py"), str(tmp_path / "d"),
                           "--train", "2", "--val", "1", "--size", "64"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train: 2 images" in proc.stdout and "val: 1 images" in proc.stdout
    with open(tmp_path / "d" / "annotations" / "instances_val.json") as f:
        assert len(json.load(f)["images"]) == 1
    assert sorted(os.listdir(tmp_path / "d" / "train")) == ["000000.png", "000001.png"]
