"""``compile = True`` (MMEngine's torch.compile switch): the optimizer groups dynamo can trace, what
CompileHook compiles, and runs through our tools and MMDetection's whose losses and resumes equal
the eager ones.

The tool runs compile with ``backend='aot_eager'`` (dynamo's capture and AOTAutograd's forward and
backward graphs, run by ATen): the same graphs and graph breaks as inductor, without inductor's C++
code generation, which takes minutes per graph on 2 cores; one test compiles with inductor."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, fail_text, load_config, logged_training_values, mmdet_tool, run_tool, tiny_any_config,
                     tiny_epoch_config)

TESTS = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
AOT = "compile.backend=aot_eager"


def narrow_trunk_with_head():
    from narrow_configs import NARROW_HIERADET
    from hieradet_mmdet.models import HieraDet

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = HieraDet(dict(NARROW_HIERADET))
            self.head = torch.nn.Linear(128, 3)

        def forward(self, x):
            return self.head(self.backbone(x)[-1].mean((2, 3))).square().mean()

    torch.manual_seed(0)
    return Model()


def compiled_steps(model, optimizer, steps=2, backend="eager"):
    """``steps`` optimizer steps on fixed inputs, the step traced by dynamo; the loss of each."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    @torch.compile(backend=backend)
    def step():
        optimizer.step()

    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        step()
        losses.append(loss.detach())
    return losses


def assert_compiled_steps_equal_eager(build_wrapper):
    """Two optimizer steps traced by dynamo give the losses and weights of two eager ones."""
    model, eager_model = narrow_trunk_with_head(), narrow_trunk_with_head()
    optimizer, eager_optimizer = build_wrapper(model).optimizer, build_wrapper(eager_model).optimizer
    compiled = compiled_steps(model, optimizer)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for loss in compiled:
        eager_optimizer.zero_grad()
        eager = eager_model(x)
        eager.backward()
        eager_optimizer.step()
        torch.testing.assert_close(loss, eager.detach())
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 rounding through Adam's 1/sqrt(v)


def test_layer_decay_groups_are_plain_dicts_that_dynamo_steps():
    """The issue's crash: HieraDetLayerDecayConstructor's groups came out as ConfigDicts (stored in
    the config's ConfigDict), and dynamo failed on them in the optimizer step."""
    from mmengine.config import ConfigDict
    from mmengine.optim import build_optim_wrapper

    cfg = ConfigDict(load_config("maskrcnn_hieradet_s.py").optim_wrapper)
    groups = build_optim_wrapper(narrow_trunk_with_head(), cfg).optimizer.param_groups
    assert len(groups) > 3 and all(type(g) is dict for g in groups), {type(g) for g in groups}
    assert_compiled_steps_equal_eager(lambda model: build_optim_wrapper(model, cfg))


def test_compile_hook_makes_mmengines_paramwise_groups_plain():
    """MMEngine's own constructor with a paramwise_cfg stores its groups in the config's ConfigDict;
    CompileHook turns them into plain dicts so that dynamo can step them."""
    from mmengine.config import ConfigDict
    from mmengine.optim import build_optim_wrapper

    from hieradet_mmdet.engine.compile import plain_param_groups

    cfg = ConfigDict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
                     paramwise_cfg=dict(custom_keys={"head": dict(lr_mult=0.1)}))
    wrapper = build_optim_wrapper(narrow_trunk_with_head(), cfg)
    assert any(type(g) is not dict for g in wrapper.optimizer.param_groups)  # MMEngine's as it is
    lrs = [g["lr"] for g in wrapper.optimizer.param_groups]
    assert plain_param_groups(wrapper.optimizer) > 0
    assert all(type(g) is dict for g in wrapper.optimizer.param_groups)
    assert [g["lr"] for g in wrapper.optimizer.param_groups] == lrs

    def plain(model):
        built = build_optim_wrapper(model, cfg)
        plain_param_groups(built.optimizer)
        return built
    assert_compiled_steps_equal_eager(plain)


def test_inductor_compiles_the_backbone_with_no_graph_break_and_equal_outputs():
    from benchmarks.compiled import graph_breaks

    model = narrow_trunk_with_head().backbone.eval()
    x = torch.randn(1, 3, 64, 96)
    for training in (False, True):
        model.train(training)
        report = graph_breaks(model, x, training=training)
        assert report["graph_breaks"] == 0 and report["graphs"] == 1, report
    model.eval()
    with torch.no_grad():
        eager = model(x)  # the fast path
        compiled = torch.compile(model)(x)  # the reference path, inductor's kernels
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def train(tool, config, work, *args):
    return run_tool(tool, config, "--work-dir", work, *args, env=ENV, timeout=600)


def losses_of(work: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in logged_training_values(work).items()}


def assert_same_losses(ours: dict, theirs: dict, steps) -> None:
    for step in steps:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-5), (step, ours[step], theirs[step])


def test_compiled_training_equals_eager_and_resumes_as_it_does(tmp_path):
    """Our tools/train.py on the epoch-based narrow Mask R-CNN (2 epochs of 4 batches, seed 0,
    FiniteLossHook, layer-wise decay, validation after each epoch): compiled, the losses are the
    eager run's; a compiled run stopped after epoch 1 and resumed compiled continues as the
    uninterrupted eager run; tools/test.py with compile=True evaluates."""
    config = tiny_epoch_config(tmp_path / "cfg")
    eager = train("tools/train.py", config, tmp_path / "eager")
    assert eager.returncode == 0, fail_text(eager)
    first = train("tools/train.py", config, tmp_path / "compiled", "--cfg-options", AOT, "train_cfg.max_epochs=1")
    assert first.returncode == 0, fail_text(first)
    log = first.stdout + first.stderr
    assert log.count("compile=True: compiled backbone, neck for training") == 1, fail_text(first)
    resumed = train("tools/train.py", config, tmp_path / "compiled", "--resume", "--cfg-options", AOT)
    assert resumed.returncode == 0, fail_text(resumed)
    assert "resumed epoch: 1, iter: 4" in resumed.stdout + resumed.stderr
    reference = losses_of(tmp_path / "eager")
    compiled = losses_of(tmp_path / "compiled")
    assert sorted(compiled) == sorted(reference) == list(range(1, 9))
    assert_same_losses(compiled, reference, range(1, 9))

    test = run_tool("tools/test.py", config, tmp_path / "compiled" / "epoch_2.pth", "--work-dir", tmp_path / "test",
                    "--cfg-options", AOT, env=ENV)
    assert test.returncode == 0, fail_text(test)
    text = test.stdout + test.stderr
    assert "compile=True: compiled backbone, neck for testing" in text and "bbox_mAP_copypaste" in text


def test_compiled_mixed_precision_training_equals_eager(tmp_path):
    """tools/train.py --amp bf16 (AutocastOptimWrapper: the whole detector under bf16 autocast, after
    its head-output probe at another input size) with compile=True: the losses are the eager bf16
    run's. Both take the reference path, as the compiled backbone does, so what differs is compile
    alone: AOTAutograd's backward sums in another order, within bf16's rounding."""
    config = tiny_epoch_config(tmp_path / "cfg")
    losses = {}
    for name, extra in (("eager", ()), ("compiled", (AOT,))):
        proc = train("tools/train.py", config, tmp_path / name, "--amp", "bf16", "--cfg-options",
                     "train_cfg.max_epochs=1", "model.backbone.fast_path=False", *extra)
        assert proc.returncode == 0, fail_text(proc)
        log = proc.stdout + proc.stderr
        assert "--amp bf16 on CPU: bfloat16 autocast over the whole detector" in log, fail_text(proc)
        losses[name] = losses_of(tmp_path / name)
    assert "compile=True: compiled backbone, neck for training" in log, fail_text(proc)
    assert sorted(losses["compiled"]) == sorted(losses["eager"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert losses["compiled"][step] == pytest.approx(losses["eager"][step], rel=2e-3), (step, losses)


# One config per family; every shipped config is one of these (docs/compile.md lists which).
FAMILIES = {
    "maskrcnn_hieradet_s.py": True,  # two-stage: Mask R-CNN (also 3x, LSJ), Faster R-CNN, Cascade
    "retinanet_hieradet_s.py": False,  # one-stage dense heads: RetinaNet, FCOS
    "dino-4scale_hieradet-s_12e_coco.py": False,  # DETR-style: DINO 4/5-scale, Deformable DETR
    "mask2former_hieradet-s_lsj-50e_coco.py": True,  # Mask2Former, instance and panoptic
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_mmdetections_own_tools_train_and_test_compiled(name, tmp_path):
    config = tiny_any_config(tmp_path, name, with_mask=FAMILIES[name])
    iteration_based = "mask2former" in name
    length = "train_cfg.max_iters=1" if iteration_based else "train_cfg.max_epochs=1"
    proc = train(mmdet_tool("train.py"), config, tmp_path / "work", "--cfg-options", AOT, length,
                 "train_cfg.val_interval=1")
    assert proc.returncode == 0, fail_text(proc)
    log = proc.stdout + proc.stderr
    assert "compile=True: compiled backbone" in log, fail_text(proc)
    assert re.search(r"Iter\(train\) \[\d+/\d+\]|Epoch\(train\)", log), fail_text(proc)
    checkpoint = (tmp_path / "work" / "last_checkpoint").read_text().strip()
    test = run_tool(mmdet_tool("test.py"), config, tmp_path / "work" / checkpoint, "--work-dir", tmp_path / "test",
                    "--cfg-options", AOT, env=ENV, cwd=tmp_path)
    assert test.returncode == 0, fail_text(test)
    text = test.stdout + test.stderr
    # an untrained RetinaNet may keep no detection above its score threshold: then no mAP is printed
    assert "compile=True: compiled backbone" in text, fail_text(test)
    assert re.search(r"(Epoch|Iter)\(test\) \[2/2\]", text), fail_text(test)  # Mask2Former's loop is iteration-based


def test_data_parallel_training_compiled(tmp_path):
    """2 CPU processes (gloo, tools/dist_train.sh): each compiles its backbone and neck inside
    MMDistributedDataParallel, and the run trains and validates with the eager data-parallel
    run's losses."""
    import sys

    from helpers import free_port

    config = tiny_epoch_config(tmp_path / "cfg")
    for name, options in (("eager", ()), ("compiled", (AOT,))):
        proc = run_tool("bash", ROOT / "tools" / "dist_train.sh", config, "2", "--work-dir", tmp_path / name,
                        "--cfg-options", *options, "train_cfg.max_epochs=1",
                        env={**ENV, "PORT": str(free_port()), "PYTHON": sys.executable}, timeout=600)
        assert proc.returncode == 0, fail_text(proc)
        assert (tmp_path / name / "epoch_1.pth").is_file()
    log = proc.stdout + proc.stderr
    assert "compile=True: compiled backbone, neck for training" in log, fail_text(proc)
    reference, compiled = losses_of(tmp_path / "eager"), losses_of(tmp_path / "compiled")
    assert sorted(compiled) == sorted(reference) and len(reference) >= 2
    assert_same_losses(compiled, reference, sorted(reference))


def test_benchmark_attributes_graph_breaks_to_the_part_whose_code_broke():
    import traceback

    import mmdet

    from benchmarks.compiled import part_of
    from hieradet_mmdet.models import hieradet

    heads = os.path.join(os.path.dirname(mmdet.__file__), "models", "roi_heads", "standard_roi_head.py")
    glue = os.path.join(os.path.dirname(mmdet.__file__), "models", "detectors", "two_stage.py")
    frame = lambda path: traceback.FrameSummary(path, 1, "f")  # noqa: E731
    assert part_of([frame(glue), frame(hieradet.__file__)]) == "backbone"
    assert part_of([frame(glue), frame(heads)]) == "heads"
    assert part_of([frame(glue)]) == "other"


SHIPPED = sorted(str(p.relative_to(ROOT / "configs")) for p in [*(ROOT / "configs").glob("*.py"),
                                                                  *(ROOT / "configs" / "swap").glob("*.py")])


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_builds_for_compile(name):
    """Every config: CompileHook among its hooks, optimizer groups dynamo can step, and the parts
    CompileHook compiles present (compiling is lazy: nothing is traced here)."""
    from mmengine.optim import build_optim_wrapper

    from narrow_configs import narrow_detector_config
    from hieradet_mmdet.engine.compile import DEFAULT_PARTS, compile_parts
    from helpers import random_detector

    cfg = load_config(name)
    assert dict(type="CompileHook") in cfg.custom_hooks
    model = random_detector(narrow_detector_config(cfg))
    groups = build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
    assert all(type(g) is dict for g in groups)
    done = compile_parts(model, DEFAULT_PARTS, dict(backend="aot_eager"))
    assert done == [part for part in DEFAULT_PARTS if getattr(model, part, None) is not None] and "backbone" in done
    assert compile_parts(model, DEFAULT_PARTS, {}) == []  # compiled once


def test_compile_options_are_static_unless_the_config_says_dynamic():
    from mmengine.config import Config

    from hieradet_mmdet.engine.compile import compile_options

    assert compile_options(Config(dict(compile=True))) == {"dynamic": False}
    assert compile_options(Config(dict(compile=dict(backend="aot_eager")))) == {"dynamic": False,
                                                                               "backend": "aot_eager"}
    assert compile_options(Config(dict(compile=dict(dynamic=True)))) == {"dynamic": True}
    assert compile_options(Config(dict(compile=False))) is None and compile_options(Config(dict())) is None


def test_eager_fallback_lasts_as_long_as_the_run():
    """CompileHook turns dynamo's suppress_errors on for the run and gives the process its own
    setting back after it (validation and testing alike)."""
    import torch._dynamo
    from mmengine.config import Config

    from hieradet_mmdet.engine.compile import CompileHook

    class Runner:
        cfg = Config(dict(compile=dict(backend="aot_eager")))
        model = narrow_trunk_with_head()

    # torch's own patch: pytest's monkeypatch deletes a config entry it restores, hiding it
    with torch._dynamo.config.patch(suppress_errors=False):
        hook, runner = CompileHook(), Runner()
        hook.before_test(runner)
        assert torch._dynamo.config.suppress_errors is True
        hook.before_val(runner)  # a second compile in the same run keeps the first setting to restore
        hook.after_run(runner)
        assert torch._dynamo.config.suppress_errors is False
        hook.after_run(runner)
        assert torch._dynamo.config.suppress_errors is False


def test_cpu_training_keeps_eagers_memory_format_for_the_run():
    """Inductor turns graphs with convolutions to channels-last, whose convolution backward oneDNN
    runs much slower on a CPU than eager's NCHW (docs/compile.md): CompileHook turns that off for
    CPU training, for the run only; inference and GPUs keep inductor's choice."""
    import torch._dynamo
    import torch._inductor.config as inductor
    from mmengine.config import Config

    from hieradet_mmdet.engine.compile import CompileHook, run_settings

    def settings(training, device):
        return {name: value for _, name, value in run_settings(training, device)}

    assert settings(True, "cpu") == {"suppress_errors": True, "layout_optimization": False}
    assert settings(False, "cpu") == settings(True, "cuda") == {"suppress_errors": True}

    class Runner:
        cfg = Config(dict(compile=dict(backend="aot_eager")))
        model = narrow_trunk_with_head()
        optim_wrapper = None

    with inductor.patch(layout_optimization=True), torch._dynamo.config.patch(suppress_errors=False):
        hook, runner = CompileHook(), Runner()
        hook.before_train(runner)
        assert inductor.layout_optimization is False and torch._dynamo.config.suppress_errors is True
        hook.before_val(runner)
        assert inductor.layout_optimization is False  # the run's validation uses the training graphs
        hook.after_run(runner)
        assert inductor.layout_optimization is True and torch._dynamo.config.suppress_errors is False
        hook = CompileHook()
        hook.before_test(runner)
        assert inductor.layout_optimization is True
        hook.after_run(runner)
