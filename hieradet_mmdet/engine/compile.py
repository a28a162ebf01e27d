"""``compile = True`` in a config (MMEngine's switch for ``torch.compile``): what it compiles here,
and a run that never stops because of it.

MMEngine's ``Runner.train`` compiles the whole ``model.train_step`` when the config sets ``compile``
(``True``, or a dict of ``torch.compile``'s keyword arguments): dynamo then traces the data
preprocessor, the detector, the losses, ``loss.backward()`` and the optimizer step, and breaks the
graph wherever it cannot trace -- in a two-stage detector at every mmcv op (NMS, RoIAlign), every
``.item()`` and every data-dependent shape of the heads: about a hundred frames, each compiled on
its own. On a 2-core CPU the first iteration of a narrow Mask R-CNN had not finished compiling
after 10 minutes (docs/compile.md). The graphs that pay are the backbone's (HieraDet runs its
reference path while compiled, ``hieradet.is_exporting``, and traces with 0 graph breaks) and the
neck's.

:class:`CompileHook` (in every config here's ``custom_hooks``; ``tools/train.py`` and
``tools/test.py`` add it to any config) does nothing unless ``compile`` is set. With it:

* ``parts`` (default ``('backbone', 'neck')``): those submodules are compiled in place
  (``nn.Module.compile`` with the config's options: state-dict keys and checkpoints unchanged),
  for training, validation and ``tools/test.py`` alike, and MMEngine's compiled ``train_step`` is
  put back to the eager one, so the heads, losses, backward and optimizer step run eagerly as
  without ``compile``. ``parts=None`` keeps MMEngine's whole-``train_step`` compilation (training
  only: MMEngine compiles nothing for validation and testing).
* ``dynamic=False`` unless the config sets ``dynamic`` (:func:`compile_options` says why): every
  new input shape compiles once, quickly, instead of a slow recompile with symbolic sizes.
* A frame that torch itself fails to compile runs eagerly instead of stopping the run
  (``torch._dynamo.config.suppress_errors``); the hook says so once, and dynamo's warning names
  the frame.
* CPU training keeps eager's memory format (:func:`run_settings` says why).
* Those settings hold for the run and are put back after it: a process that goes on after
  ``runner.train()`` gets its own back.
* The optimizer's parameter groups are plain dicts: dynamo cannot trace an optimizer step over
  groups of a dict subclass, which is what MMEngine's own ``DefaultOptimWrapperConstructor``
  hands torch when a config has a ``paramwise_cfg`` (``HieraDetLayerDecayConstructor`` gives plain
  dicts).
"""

from __future__ import annotations

from typing import Optional, Sequence

from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log

from .. import mmengine_adapter as mmengine_api

DEFAULT_PARTS = ("backbone", "neck")


def compile_options(cfg) -> Optional[dict]:
    """torch.compile's keyword arguments when a config asks MMEngine to compile, else None.

    ``dynamic`` is False unless the config sets it: detection batches change shape (keep-ratio
    resizing, padding to a multiple of 32), and with torch's default a second shape recompiles
    the backbone with symbolic sizes, which its windowing makes slow to trace (narrow HieraDet,
    2-core CPU, aot_eager: 98 s and then 242 s for the first two new shapes, against 6-9 s for
    each shape compiled static). Past ``torch._dynamo.config.recompile_limit`` shapes the rest run
    eagerly, with dynamo's warning."""
    value = cfg.get("compile", None) if cfg is not None else None
    if isinstance(value, dict):
        return {"dynamic": False, **value}
    return {"dynamic": False} if value else None


def run_settings(training: bool, device: str) -> list[tuple[object, str, object]]:
    """The dynamo and inductor settings a compiled run holds, as (config module, name, value).

    ``suppress_errors``: a frame torch fails to compile runs eagerly. ``layout_optimization``
    off for training on a CPU: inductor otherwise turns a graph with convolutions to channels-last,
    and oneDNN's convolution backward in channels-last is much slower there than in the NCHW eager
    layout (MMDetection's FPN at 800x1344, forward and backward, AMD EPYC AVX2, 2 threads: eager
    3.3 s, compiled 6.7 s with it, 3.1 s without; eager in channels-last 7.2 s). Inference keeps it:
    channels-last makes the forward convolutions faster there. A config's
    ``compile=dict(options=dict(layout_optimization=...))`` still decides for its own compile."""
    import torch._dynamo
    import torch._inductor.config

    settings: list[tuple[object, str, object]] = [(torch._dynamo.config, "suppress_errors", True)]
    if training and device == "cpu":
        settings.append((torch._inductor.config, "layout_optimization", False))
    return settings


def plain_param_groups(optimizer) -> int:
    """Make every parameter group of ``optimizer`` a plain dict (in place); returns how many were not."""
    changed = 0
    for i, group in enumerate(optimizer.param_groups):
        if type(group) is not dict:
            optimizer.param_groups[i] = {k: v if k == "params" else _plain(v) for k, v in group.items()}
            changed += 1
    return changed


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def optimizers_of(optim_wrapper) -> list:
    """The torch optimizers of an OptimWrapper or an OptimWrapperDict."""
    if hasattr(optim_wrapper, "optimizer"):
        return [optim_wrapper.optimizer]
    if hasattr(optim_wrapper, "optim_wrappers"):
        return [w.optimizer for w in optim_wrapper.optim_wrappers.values()]
    return []


def compile_parts(model, parts: Sequence[str], options: dict) -> list[str]:
    """Compile the named submodules of ``model`` in place (those it has and that are not compiled
    yet); returns the names compiled now."""
    model = getattr(model, "module", model)  # (Distributed)DataParallel
    done = []
    for name in parts:
        module = getattr(model, name, None)
        if module is None or getattr(module, "_compiled_call_impl", None) is not None:
            continue
        module.compile(**options)
        done.append(name)
    return done


@HOOKS.register_module()
class CompileHook(Hook):
    """What ``compile = True`` compiles, and eager fallback instead of a crash (module docstring)."""

    priority = "VERY_HIGH"

    def __init__(self, parts: Optional[Sequence[str]] = DEFAULT_PARTS) -> None:
        self.parts = None if parts is None else tuple(parts)
        self._said = False
        self._settings_before: dict[str, tuple[object, str, object]] = {}  # run_settings' previous values

    def before_train(self, runner) -> None:
        options = compile_options(runner.cfg)
        if options is None:
            return
        model = runner.model
        if self.parts is not None:
            mmengine_api.undo_train_step_compile(model)
        fixed = sum(plain_param_groups(opt) for opt in optimizers_of(runner.optim_wrapper))
        self._compile(runner, options, "training", training=True)
        if fixed:
            print_log(f"compile: {fixed} optimizer parameter groups made plain dicts (dynamo traces the optimizer "
                      "step)", logger="current")

    def before_val(self, runner) -> None:
        self._for_inference(runner, "validation")

    def before_test(self, runner) -> None:
        self._for_inference(runner, "testing")

    def _for_inference(self, runner, what: str) -> None:
        options = compile_options(runner.cfg)
        if options is not None and self.parts is not None:
            self._compile(runner, options, what)

    def after_run(self, runner) -> None:
        for config, name, value in self._settings_before.values():
            setattr(config, name, value)
        self._settings_before.clear()

    def _compile(self, runner, options: dict, what: str, training: bool = False) -> None:
        device = next(runner.model.parameters()).device.type
        settings = run_settings(training, device)
        for config, name, value in settings:
            self._settings_before.setdefault(f"{config.__name__}.{name}", (config, name, getattr(config, name)))
            setattr(config, name, value)
        done = compile_parts(runner.model, self.parts, options) if self.parts is not None else []
        if self._said:
            return
        self._said = True
        if self.parts is None:
            scope = "MMEngine compiles the whole train_step (CompileHook parts=None)"
        else:
            scope = (f"compiled {', '.join(done) or 'nothing new'} for {what} (CompileHook parts="
                     f"{list(self.parts)}, dynamic={options.get('dynamic')}); heads, losses, backward and "
                     "optimizer step run eagerly")
        layout = any(name == "layout_optimization" for _, name, _ in settings)
        print_log(f"compile=True: {scope}. What torch cannot compile runs eagerly (dynamo's warning names it) "
                  "instead of stopping the run; the first iterations compile and are slow, and so does the first "
                  "batch of every new shape unless dynamic=True."
                  + (" CPU training keeps eager's NCHW layout (inductor's layout_optimization off for the run; "
                     "docs/compile.md says why)." if layout else ""), logger="current")
