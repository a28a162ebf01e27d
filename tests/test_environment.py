"""The installed stack: a broken mmcv ops build or a wrong pin must fail here, not at training time."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_mmcv_ops_nms_runs_on_cpu():
    from mmcv.ops import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert torch.allclose(dets[:, 4], torch.tensor([0.9, 0.7]))


def test_mmcv_ops_roi_align_runs_on_cpu():
    from mmcv.ops import RoIAlign

    feats = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    rois = torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32)
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=1, aligned=True)(feats, rois)
    # On a linear ramp, one sample at the centre of each 2x2 bin (pixel-centred coordinates) is the bin mean.
    assert torch.allclose(out.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))


def test_import_line_from_readme_works_in_a_fresh_interpreter():
    code = "import hieradet_mmdet, mmdet; from mmcv.ops import nms, RoIAlign"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_pinned_versions():
    from importlib.metadata import version

    import mmcv
    import mmdet
    import mmengine

    assert (mmcv.__version__, mmdet.__version__, mmengine.__version__) == ("2.1.0", "3.3.0", "0.10.7")
    assert torch.__version__.split("+")[0] == "2.15.0"
    major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    assert 77 <= major < 81, "mmcv and mmengine's mmdet:: config lookup import pkg_resources (gone in 81)"
    import pkg_resources  # noqa: F401


def test_no_generated_files_tracked_in_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = [p for p in tracked if p.startswith(".venv/") or p.endswith((".pt", ".pth", ".safetensors", ".whl", ".npy"))]
    assert not bad


def test_coco_evaluation_packages_without_numpy_pulled_back():
    """The fast COCO evaluators, and panopticapi from panopticapi-lite installed without its numpy<2 pin."""
    from importlib.metadata import version

    import numpy
    from panopticapi.evaluation import pq_compute  # noqa: F401

    assert (version("hotcoco"), version("faster-coco-eval"), version("panopticapi-lite")) == ("1.3.0", "1.8.0", "0.2.0")
    assert int(numpy.__version__.split(".")[0]) >= 2
