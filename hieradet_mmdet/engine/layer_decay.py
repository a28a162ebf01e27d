"""Layer-wise learning-rate decay for detectors with a HieraDet backbone.

``optim_wrapper=dict(constructor='HieraDetLayerDecayConstructor', paramwise_cfg=dict(...))``
gives every HieraDet block its own learning rate, shrinking geometrically towards the input.
The layers are the model's own (:meth:`HieraDet.get_layer_depth`); with
``L = len(backbone.blocks) + 1``,

* the patch embedding and both position embeddings are layer 0,
* block ``i`` is layer ``i + 1``,
* everything outside the backbone (neck, heads) is layer ``L``,

and a parameter of layer ``k`` trains at ``lr * decay_rate ** (L - k)``: the neck and heads at the
full rate, the last block at ``decay_rate`` of it, the embeddings at ``decay_rate ** L``.

Independently, weight decay is switched off for normalisation layers, biases and the position
embeddings (whole model, not only the backbone). Parameters that share an (lr, weight decay)
pair end up in one optimizer group; groups are ordered from the highest lr down, so the first
group (the one MMEngine logs as ``lr``) is the heads' full rate.

The constructor builds whatever wrapper ``optim_wrapper.type`` names (``OptimWrapper``,
``AmpOptimWrapper``, ...) around the optimizer, exactly like MMEngine's default one.
"""

from __future__ import annotations

import inspect
from typing import Optional

from torch import nn

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS

from .checks import ConfigMergeError

from ..models.hieradet import HieraDet

POS_EMBED_NAMES = ("pos_embed", "pos_embed_window")  # no weight decay by default

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
              nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def find_hieradet(model: nn.Module) -> tuple[str, Optional[HieraDet]]:
    """The (qualified name, module) of the outermost HieraDet in ``model``; ('', None) if none."""
    for name, module in model.named_modules():
        if isinstance(module, HieraDet):
            return name, module
    return "", None


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class HieraDetLayerDecayConstructor(DefaultOptimWrapperConstructor):
    """Optimizer-wrapper constructor with layer-wise lr decay over a HieraDet backbone.

    ``paramwise_cfg`` keys (all optional):

    * ``layer_decay_rate`` (float, 0.85): lr ratio between consecutive layers; 1.0 disables decay.
    * ``num_layers`` (int): override ``L`` (default ``len(blocks) + 1``); layers deeper than
      ``L`` are clamped to it.
    * ``norm_decay_mult`` / ``bias_decay_mult`` / ``pos_embed_decay_mult`` (float, 0.0): weight
      decay multipliers of norm layers' parameters, biases and the position embeddings.
    * ``custom_keys`` (dict): ``{substring: dict(lr_mult=..., decay_mult=...)}``, applied on
      top of the rules above to every parameter whose full name contains the substring (the
      longest matching key wins), e.g. ``{'rpn_head': dict(lr_mult=2.0)}``.

    Parameters with ``requires_grad=False`` (frozen stages) are left out of the optimizer.
    A model without a HieraDet gets no decay, only the weight-decay rules.
    """

    KNOWN_KEYS = {"layer_decay_rate", "num_layers", "norm_decay_mult", "bias_decay_mult",
                  "pos_embed_decay_mult", "custom_keys"}

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        cfg = self.paramwise_cfg
        unknown = sorted(set(cfg) - self.KNOWN_KEYS)
        if unknown:
            raise ValueError(f"HieraDetLayerDecayConstructor: unknown paramwise_cfg keys {unknown}; "
                             f"valid keys are {sorted(self.KNOWN_KEYS)}")
        if self.base_lr is None:
            raise ValueError("HieraDetLayerDecayConstructor needs optimizer.lr to be set")
        self.decay_rate = float(cfg.get("layer_decay_rate", 0.85))
        if not 0.0 < self.decay_rate <= 1.0:
            raise ValueError(f"layer_decay_rate must be in (0, 1], got {self.decay_rate}")
        self.num_layers = cfg.get("num_layers")
        self.norm_decay_mult = float(cfg.get("norm_decay_mult", 0.0))
        self.bias_decay_mult = float(cfg.get("bias_decay_mult", 0.0))
        self.pos_embed_decay_mult = float(cfg.get("pos_embed_decay_mult", 0.0))
        self.custom_keys = dict(cfg.get("custom_keys", {}))

    # ---- per-parameter rules -------------------------------------------------------------------

    def param_settings(self, model: nn.Module) -> list[tuple[str, nn.Parameter, float, Optional[float]]]:
        """(full name, parameter, lr scale, weight-decay multiplier or None) for every trainable parameter."""
        trunk_name, trunk = find_hieradet(model)
        trunk_prefix = f"{trunk_name}." if trunk_name else ""
        top = len(trunk.blocks) + 1 if trunk is not None else 0  # the layer of the neck and heads
        num_layers = int(self.num_layers) if self.num_layers is not None else top

        norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES)
                       for p in m.parameters(recurse=False)}
        sorted_keys = sorted(sorted(self.custom_keys), key=len, reverse=True)

        settings = []
        seen = set()
        for name, param in model.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            in_trunk = trunk is not None and name.startswith(trunk_prefix)
            local = name[len(trunk_prefix):] if in_trunk else name
            layer = min(trunk.get_layer_depth(local)[0] if in_trunk else top, num_layers)
            lr_scale = self.decay_rate ** (num_layers - layer)

            if in_trunk and local in POS_EMBED_NAMES:
                decay_mult = self.pos_embed_decay_mult
            elif id(param) in norm_params:
                decay_mult = self.norm_decay_mult
            elif name.endswith(".bias") or name == "bias":
                decay_mult = self.bias_decay_mult
            else:
                decay_mult = 1.0

            for key in sorted_keys:
                if key in name:
                    lr_scale *= self.custom_keys[key].get("lr_mult", 1.0)
                    decay_mult *= self.custom_keys[key].get("decay_mult", 1.0)
                    break
            settings.append((name, param, lr_scale, decay_mult))
        return settings

    def build_param_groups(self, model: nn.Module) -> list[dict]:
        """Parameters grouped by (lr, weight decay), highest lr first."""
        groups: dict[tuple, dict] = {}
        for name, param, lr_scale, decay_mult in self.param_settings(model):
            lr = self.base_lr * lr_scale
            wd = self.base_wd * decay_mult if self.base_wd is not None else None
            key = (round(lr_scale, 12), None if wd is None else round(wd, 12))
            group = groups.get(key)
            if group is None:
                group = groups[key] = {"params": [], "param_names": [], "lr": lr, "lr_scale": lr_scale}
                if wd is not None:
                    group["weight_decay"] = wd
            group["params"].append(param)
            group["param_names"].append(name)
        ordered = sorted(groups.values(), key=lambda g: (-g["lr"], -g.get("weight_decay", 0.0)))
        for g in ordered:
            print_log(f"HieraDetLayerDecay: lr={g['lr']:.3g} (x{g['lr_scale']:.4f}) "
                      f"weight_decay={g.get('weight_decay')} for {len(g['params'])} tensors, "
                      f"e.g. {g['param_names'][0]}", logger="current", level=10)  # DEBUG
        return ordered

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if hasattr(model, "module"):  # (Distributed)DataParallel
            model = model.module
        trunk_name, trunk = find_hieradet(model)
        if trunk is None:
            print_log("HieraDetLayerDecayConstructor: no HieraDet in the model, so no layer-wise "
                      "decay; only the weight-decay rules apply", logger="current", level=30)

        # A plain dict, not the config's ConfigDict: a ConfigDict turns every dict stored in it into
        # a ConfigDict, and torch keeps the groups it is given as its param_groups. torch.compile
        # (MMEngine's ``compile=True`` traces the optimizer step) fails on param groups that are
        # not plain dicts (dynamo: "'UserDefinedDictVariable' object has no attribute 'items'").
        optimizer_cfg = dict(self.optimizer_cfg)
        optimizer_cls = optimizer_cfg["type"]
        if isinstance(optimizer_cls, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_cls)
        parameters = inspect.signature(optimizer_cls).parameters
        first_arg = next(iter(parameters))
        foreign = [k for k in optimizer_cfg if k != "type" and k not in parameters]
        if foreign and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            raise ConfigMergeError(  # a merged dict: another optimizer's arguments kept from the inherited config
                f"optim_wrapper.optimizer is {optimizer_cls.__name__}, which takes no {', '.join(foreign)} (kept from "
                f"the inherited config's optimizer by MMEngine's dict merge): write "
                f"optim_wrapper = dict(_delete_=True, type='OptimWrapper', constructor='HieraDetLayerDecayConstructor', "
                f"optimizer=dict(type='{optimizer_cls.__name__}', ...), paramwise_cfg=...) to replace it")
        optimizer_cfg[first_arg] = self.build_param_groups(model)
        optimizer = OPTIMIZERS.build(optimizer_cfg)

        wrapper_cfg = self.optim_wrapper_cfg.copy()
        wrapper_cfg.setdefault("type", "OptimWrapper")
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))
