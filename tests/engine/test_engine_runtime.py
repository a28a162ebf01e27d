"""What the tools add around MMEngine: CPU data-parallel settings and process group, image loading
that names the broken file."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import free_port, tiny_detector_config

SIZE = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_detector_config(tmp_path_factory.mktemp("engine"), size=SIZE)[1]


def test_checked_image_loader_names_the_file(tmp_path, data):
    import hieradet_mmdet  # noqa: F401  (registers CheckedLoadImageFromFile)
    from mmdet.registry import TRANSFORMS

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


def test_prepare_config_for_cpu_data_parallel(monkeypatch):
    from mmengine.config import Config

    from hieradet_mmdet.engine.runner import prepare_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config(dict(train_dataloader=dict(dataset=dict(pipeline=[dict(type="LoadImageFromFile"),
                                                                    dict(type="PackDetInputs")])),
                      model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=[0],
                                             find_unused_parameters=True)))
    changes = []
    prepare_config(cfg, "pytorch", changes=changes)
    assert cfg.launcher == "pytorch"
    assert cfg.model_wrapper_cfg.device_ids is None and cfg.model_wrapper_cfg.find_unused_parameters
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    assert cfg.train_dataloader.dataset.pipeline[0].type == "CheckedLoadImageFromFile"
    assert changes == [
        "model_wrapper_cfg: {'type': 'MMDistributedDataParallel', 'device_ids': [0], 'find_unused_parameters': True} -> "
        "{'type': 'MMDistributedDataParallel', 'device_ids': None, 'find_unused_parameters': True} "
        "(data-parallel on this machine)",
        "env_cfg: None -> {'dist_cfg': {'backend': 'gloo'}} (data-parallel on this machine)",
        "train_dataloader.dataset.pipeline[0]: LoadImageFromFile -> CheckedLoadImageFromFile",
        "custom_hooks: + HieraDetCheckHook, FiniteLossHook, CompileHook, HeartbeatHook"]
    plain = prepare_config(Config(dict()), "none")
    assert plain.launcher == "none" and "model_wrapper_cfg" not in plain


def test_init_and_finish_distributed_on_cpu(monkeypatch):
    """The tools' own process-group lifecycle: created on CPU, gone again before exit."""
    import torch.distributed as dist

    from hieradet_mmdet.engine.distributed import finish_distributed, init_distributed

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


def test_every_change_to_a_users_config_is_one_line():
    from mmengine.config import Config

    from hieradet_mmdet.engine.runner import prepare_config

    cfg = Config(dict(train_cfg=dict(type="IterBasedTrainLoop", max_iters=4),
                      default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2)),
                      val_dataloader=dict(dataset=dict(type="CocoDataset", pipeline=[dict(type="mmdet.LoadImageFromFile")])),
                      val_evaluator=dict(type="CocoMetric", metric="bbox"),
                      custom_hooks=[dict(type="FiniteLossHook")]))
    changes = []
    prepare_config(cfg, "none", changes=changes)
    assert changes == ["val_dataloader.dataset: CocoDataset -> CheckedCocoDataset",
                       "val_dataloader.dataset.pipeline[0]: mmdet.LoadImageFromFile -> CheckedLoadImageFromFile",
                       "val_evaluator: CocoMetric -> FastCocoMetric",
                       "custom_hooks: + HieraDetCheckHook, CompileHook",
                       "train loop: IterBasedTrainLoop -> ResumableIterBasedTrainLoop",
                       "checkpoint hook: CheckpointHook -> SafeCheckpointHook"]
    again = []
    prepare_config(cfg, "none", changes=again)
    assert again == []  # a prepared config needs nothing more
