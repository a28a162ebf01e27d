"""``import hieradet_mmdet``: with MMDetection it registers everything; without it the plain PyTorch
model still imports and the MMDetection names raise an ImportError that says what to install."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT, fail_text

WITHOUT_MMDET = """
import sys
sys.modules["mmdet"] = None  # as if MMDetection were not installed
import torch
import hieradet_mmdet
from hieradet_mmdet import ARCH_NAMES, HieraDet
assert "small" in ARCH_NAMES and hieradet_mmdet.__all__ == ["ARCH_NAMES", "HieraDet"]
out = HieraDet("small", out_indices=(3,)).eval()(torch.zeros(1, 3, 64, 64))
assert out[0].shape == (1, 768, 2, 2)
for name in ("HieraDetBackbone", "check_detector"):
    try:
        exec(f"from hieradet_mmdet import {name}")
    except ImportError as err:
        print(f"{name}: {err}")
    else:
        raise SystemExit(f"{name} imported without MMDetection")
try:
    hieradet_mmdet.check_detector
except ImportError as err:
    print(f"attribute: {err}")
try:
    hieradet_mmdet.no_such_name
except AttributeError as err:
    print(f"other: {err}")
"""


def test_without_mmdetection_the_model_imports_and_mmdetection_names_say_what_to_install():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_MMDET], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, fail_text(proc)
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    for name in ("HieraDetBackbone", "check_detector", "attribute"):
        assert "needs MMDetection" in lines[name] and "mmdet>=3.3,<3.4" in lines[name], proc.stdout
        assert "docs/installation.md" in lines[name] and "hieradet_mmdet.models.HieraDet" in lines[name]
    assert "has no attribute 'no_such_name'" in lines["other"]


def test_with_mmdetection_the_names_are_the_registered_ones():
    import hieradet_mmdet
    from hieradet_mmdet.engine.checks import check_detector
    from hieradet_mmdet.models.backbone import HieraDetBackbone
    from mmdet.registry import MODELS

    assert hieradet_mmdet.HieraDetBackbone is HieraDetBackbone and MODELS.get("HieraDet") is HieraDetBackbone
    assert hieradet_mmdet.check_detector is check_detector
    assert set(hieradet_mmdet.__all__) == {"ARCH_NAMES", "HieraDet", "HieraDetBackbone", "check_detector"}
