"""CheckedCocoDataset: broken annotation files are named; left-out annotations are counted per reason."""

from __future__ import annotations

import json

import pytest

import hieradet_mmdet  # noqa: F401  (registers CheckedCocoDataset)
from helpers import tiny_detector_config

CLASSES = ("circle", "rectangle", "triangle")


def build(ann_file, **kwargs):
    from mmengine.registry import init_default_scope

    from mmdet.registry import DATASETS

    init_default_scope("mmdet")
    return DATASETS.build(dict(type="CheckedCocoDataset", ann_file=str(ann_file), data_prefix=dict(img=""),
                               metainfo=dict(classes=CLASSES), pipeline=[], filter_cfg=None, **kwargs))


def coco(tmp_path, annotations):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)],
        "annotations": annotations}))
    return path


def ann(id, image=1, category=1, bbox=(4, 4, 20, 10), area=200.0, segmentation=None):
    return {"id": id, "image_id": image, "category_id": category, "bbox": list(bbox), "area": area, "iscrowd": 0,
            "segmentation": segmentation if segmentation is not None else [[4, 4, 24, 4, 24, 14]]}


def test_unreadable_annotation_files_are_named(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"cannot read annotation file {empty}: the file is empty"):
        build(empty)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"cannot read annotation file {broken}: not valid JSON"):
        build(broken)
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=f"cannot read annotation file {not_coco}: not COCO-format"):
        build(not_coco)


def test_left_out_annotations_are_counted_per_reason_in_one_warning(tmp_path):
    path = coco(tmp_path, [
        ann(1), ann(2, image=2),                                   # kept
        ann(10, category=99), ann(11, category=42, image=2),      # unknown categories
        ann(20, bbox=(4, 4, 0, 10), area=0.0),                     # zero width
        ann(21, bbox=(4, 4, -5, 10)),                              # negative width
        ann(30, segmentation=[[4, 4, 24, 4]]),                     # a two-point "polygon"
    ])
    with pytest.warns(UserWarning) as record:
        dataset = build(path)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"{path}: 5 of 7 annotations left out: ")
    assert "2 with a category not in the dataset's classes (ids 10, 11)" in message
    assert "2 with a box outside the image or of zero size (ids 20, 21)" in message
    assert "1 with no polygon of at least 3 points (mask ignored) (ids 30)" in message
    # The same instances as CocoDataset keeps (LoadAnnotations later ignores the two-point polygon).
    assert [len(dataset.get_data_info(i)["instances"]) for i in range(len(dataset))] == [2, 1]
    with pytest.raises(ValueError, match=r"5 of 7 annotations left out: .*\(strict=True\)"):
        build(path, strict=True)


def test_the_tools_read_coco_data_through_it(tmp_path):
    from mmengine.config import Config

    from hieradet_mmdet.engine.runner import prepare_config

    cfg = Config.fromfile(str(tiny_detector_config(tmp_path)[0]))
    prepare_config(cfg)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert cfg[loader].dataset.type == "CheckedCocoDataset"
    assert cfg.default_hooks.checkpoint.type == "SafeCheckpointHook"
    assert {"HieraDetCheckHook", "FiniteLossHook"} <= {h["type"] for h in cfg.custom_hooks}
