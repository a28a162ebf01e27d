"""Every contact with MMEngine's private API (hieradet_mmdet/mmengine_adapter.py), checked against
the installed MMEngine: each test fails, naming its contact, when an MMEngine release changes it."""

from __future__ import annotations

import io
import itertools
import pickle
import zipfile

import pytest
import torch
from mmengine.hooks import CheckpointHook
from mmengine.model import BaseDataPreprocessor, BaseModel, ImgDataPreprocessor
from mmengine.optim import OptimWrapper
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from hieradet_mmdet import mmengine_adapter as api


class ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        out = self.linear(torch.stack(inputs) if isinstance(inputs, list) else inputs)
        if mode == "loss":
            return {"loss": out.square().mean()}
        return out


class ToyData(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.full((2,), float(i)))


_RUNS = itertools.count()


def toy_runner(tmp_path, **kwargs) -> Runner:
    loader = dict(dataset=ToyData(), sampler=dict(type="DefaultSampler", shuffle=False), batch_size=2,
                  collate_fn=dict(type="default_collate"), num_workers=0)
    args = dict(model=ToyModel(), work_dir=str(tmp_path), train_dataloader=loader,
                train_cfg=dict(by_epoch=False, max_iters=2), optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
                default_hooks=dict(logger=None, checkpoint=None), default_scope="mmengine",
                experiment_name=f"toy_{tmp_path.name}_{next(_RUNS)}")
    args.update(kwargs)
    return Runner(**args)


def test_runner_keeps_resume_and_load_from_until_load_or_resume(tmp_path):
    runner = toy_runner(tmp_path, resume=True, load_from=None)
    assert api.resume_requested(runner) and api.checkpoint_to_load(runner) is None
    chosen = []
    runner.resume = lambda path: chosen.append(path)  # what load_or_resume calls with the chosen file
    api.set_checkpoint_to_load(runner, "chosen.pth")
    runner.load_or_resume()
    assert chosen == ["chosen.pth"]
    assert not api.resume_requested(toy_runner(tmp_path / "other", resume=False))


def test_checkpoint_hook_writes_every_checkpoint_through_its_writer(tmp_path):
    api.require_checkpoint_writers()
    steps = []

    class Recording(CheckpointHook):
        def _save_checkpoint_with_step(self, runner, step, meta):
            steps.append(step)
            assert set(api.checkpoint_hook_state(self)) >= set(api.CHECKPOINT_HOOK_STATE)

    hook = Recording(interval=1, by_epoch=False, max_keep_ckpts=2)
    toy_runner(tmp_path, default_hooks=dict(logger=None, checkpoint=hook)).train()
    assert steps == [1, 2]
    assert "keep_ckpt_ids" in api.checkpoint_hook_state(hook)  # the rotation's queue, with max_keep_ckpts > 0


def test_a_checkpoint_hook_without_the_writer_is_named():
    class Changed:
        pass

    with pytest.raises(api.MMEngineChanged, match="CheckpointHook's writer: Changed._save_checkpoint_with_step"):
        api._require_method(Changed, api.CHECKPOINT_WRITER, ("runner", "step", "meta"), "CheckpointHook's writer")


def test_gradient_clipping_goes_through_clip_grad_and_reports_the_norm():
    model = nn.Linear(3, 1)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1e-3))
    seen = []

    def around(clip):
        clip()
        seen.append((api.last_gradient_norm(wrapper.message_hub), float(model.weight.grad.norm())))

    api.wrap_gradient_clipping(wrapper, around)
    wrapper.update_params(model(torch.ones(4, 3)).sum() * 100)
    assert len(seen) == 1
    logged, after = seen[0]
    assert logged > 1e-3  # the norm before clipping, as MMEngine logs it
    assert after <= 1e-3 * 1.01  # and MMEngine's clipping ran


def test_image_preprocessors_say_whether_they_swap_channels_and_normalise():
    plain = ImgDataPreprocessor()
    full = ImgDataPreprocessor(mean=[1.0, 2.0, 3.0], std=[2.0, 2.0, 2.0], bgr_to_rgb=True)
    assert api.swaps_channels(plain) is False and api.normalizes(plain) is False
    assert api.swaps_channels(full) is True and api.normalizes(full) is True
    assert api.swaps_channels(BaseDataPreprocessor()) is None and api.normalizes(BaseDataPreprocessor()) is None
    x = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)]).mul(10)
    out = full(dict(inputs=list(x)))["inputs"]  # what the two flags stand for
    assert torch.allclose(out[1, 0], (x[1, 2] - 1.0) / 2.0)


def test_instance_overrides_are_what_mmengine_calls(tmp_path):
    runner = toy_runner(tmp_path)
    model, wrapper = runner.model, runner.build_optim_wrapper(runner.optim_wrapper)
    calls = []
    parse = api.override(model, "parse_losses", lambda losses: calls.append("parse_losses") or parse(losses))
    update = api.override(wrapper, "update_params", lambda loss, **kw: calls.append("update_params") or update(loss, **kw))
    assert api.is_overridden(model, "parse_losses")
    model.train_step(dict(inputs=[torch.ones(2)]), wrapper)  # as the training loop calls it
    assert calls == ["parse_losses", "update_params"]
    api.restore(model, "parse_losses")
    assert not api.is_overridden(model, "parse_losses")

    test_calls = []
    test_step = api.override(model, "test_step", lambda data: test_calls.append(1) or test_step(data))
    runner = toy_runner(tmp_path / "test", model=model, train_dataloader=None, train_cfg=None, optim_wrapper=None,
                        test_dataloader=dict(dataset=ToyData(), sampler=dict(type="DefaultSampler", shuffle=False),
                                             batch_size=4, collate_fn=dict(type="default_collate")),
                        test_cfg=dict(), test_evaluator=dict(type="mmengine.DumpResults",
                                                             out_file_path=str(tmp_path / "out.pkl")))
    runner.test()
    assert test_calls == [1, 1]  # TestLoop called the instance's test_step for both batches

    linear = nn.Linear(2, 2)
    api.override(linear, "forward", lambda x: x * 0)
    assert linear(torch.ones(1, 2)).abs().sum() == 0
    api.restore(linear, "forward")
    assert linear(torch.ones(1, 2)).abs().sum() > 0


def test_iteration_loops_draw_from_a_data_iterator_that_can_be_restarted(tmp_path):
    loop = toy_runner(tmp_path).train_loop
    iterator = api.loop_data_iterator(loop)
    assert iterator is not None and next(iterator)["inputs"].shape == (2, 2)
    api.restart_loop_data_iterator(loop)
    assert type(api.loop_data_iterator(loop)) is type(iterator) and api.loop_data_iterator(loop) is not iterator
    epoch_loop = toy_runner(tmp_path / "e", train_cfg=dict(by_epoch=True, max_epochs=1)).train_loop
    assert api.loop_data_iterator(epoch_loop) is None


def test_history_buffers_pickle_only_the_listed_statistics():
    """A buffer in a checkpoint (torch.save's pickle) looks up exactly these statistics with getattr."""
    buffer = api.history_buffer_class()([1.0, 2.0], [1, 1])
    stream = io.BytesIO()
    torch.save({"buffer": buffer}, stream)
    with zipfile.ZipFile(io.BytesIO(stream.getvalue())) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    looked_up = []

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            if name == "getattr":
                return lambda owner, attr: looked_up.append((owner, attr)) or getattr(owner, attr)
            return super().find_class(module, name)

        def persistent_load(self, pid):  # tensor storages: none in a buffer
            raise pickle.UnpicklingError(pid)

    Recording(io.BytesIO(data)).load()
    assert looked_up and {owner for owner, _ in looked_up} == {api.history_buffer_class()}
    assert sorted(attr for _, attr in looked_up) == sorted(api.HISTORY_BUFFER_STATISTICS)


def test_setup_env_keeps_a_process_group_that_exists(tmp_path, monkeypatch):
    """engine/distributed.py creates the CPU (gloo) group itself; MMEngine must then not call init_dist."""
    import torch.distributed as dist
    from mmengine.runner import runner as runner_module

    from helpers import free_port

    monkeypatch.setenv("LOCAL_RANK", "0")  # engine/distributed.py sets it for MMEngine, as torchrun does
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(runner_module, "init_dist", lambda *a, **k: pytest.fail("init_dist was called"))
        runner = toy_runner(tmp_path, launcher="pytorch", env_cfg=dict(dist_cfg=dict(backend="gloo")),
                            cfg=dict(model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None)))
        assert runner.distributed and runner.world_size == 1
    finally:
        dist.destroy_process_group()


def test_config_text_without_yapf_is_the_same_config(tmp_path):
    from mmengine.config import Config

    path = tmp_path / "c.py"
    path.write_text("model = dict(type='X', layers=[dict(a=1, b=(2, 3)), dict(c='d')])\nlr = 0.1\n")
    cfg = Config.fromfile(str(path))
    api.skip_config_formatting(cfg)
    assert cfg._format_python_code is False
    text = cfg.pretty_text  # formatted or not, the text is Python that reads back as the same config
    again = Config.fromstring(text, ".py")
    assert again.to_dict() == cfg.to_dict()


def test_compile_true_sets_a_compiled_train_step_on_the_model_that_can_be_undone(tmp_path):
    from mmengine.hooks import Hook

    seen = []

    class Look(Hook):
        def before_train(self, runner):
            seen.append(callable(getattr(runner.model.train_step, "_torchdynamo_orig_callable", None)))
            seen.append(api.undo_train_step_compile(runner.model))
            seen.append(runner.model.train_step.__func__ is BaseModel.train_step)

    runner = toy_runner(tmp_path, cfg=dict(compile=True), custom_hooks=[Look()])
    runner.train()  # the eager train_step after the undo: no compilation
    assert seen == [True, True, True]
    assert not api.undo_train_step_compile(ToyModel())
