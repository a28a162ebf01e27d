"""HieraDet's sizes and layouts as plain data, and turning an ``arch`` argument into a checked dict.

Nothing here imports torch or the rest of the package: the model (:mod:`.models.hieradet`) and the
weight loading (:mod:`.weights`) both read these tables.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

NUM_STAGES = 4

# Sizes (SAM2's names); global_att_blocks is SAM2's high-resolution layout.
ARCH_SETTINGS: dict[str, dict] = {
    "tiny": dict(depths=(1, 2, 7, 2), embed_dim=96, num_heads=1, global_pos_size=(7, 7),
                 global_att_blocks=(5, 7, 9)),
    "small": dict(depths=(1, 2, 11, 2), embed_dim=96, num_heads=1, global_pos_size=(7, 7),
                  global_att_blocks=(7, 10, 13)),
    "base": dict(depths=(2, 3, 16, 3), embed_dim=96, num_heads=1, global_pos_size=(14, 14),
                 global_att_blocks=(12, 16, 20)),
    "base_plus": dict(depths=(2, 3, 16, 3), embed_dim=112, num_heads=2, global_pos_size=(14, 14),
                      global_att_blocks=(12, 16, 20)),
    "large": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, global_pos_size=(7, 7),
                  global_att_blocks=(23, 33, 43)),
}
ARCH_ALIASES = {"t": "tiny", "s": "small", "b": "base", "b+": "base_plus", "l": "large"}
# Window sizes per stage (0 = global). "" is SAM2's layout; "d_" is birder's hieradet_d_*, the
# layout the DINOv2 weights were trained with. Same parameters, so both load one file.
LAYOUTS = {"": (8, 4, 14, 7), "d_": (8, 4, 0, 0)}
ARCH_KEYS = ("depths", "embed_dim", "num_heads", "global_pos_size", "global_att_blocks", "window_spec")
ARCH_NAMES = tuple(prefix + name for prefix in LAYOUTS for name in ARCH_SETTINGS)


def resolve_arch(arch: Union[str, Mapping], window_spec: Optional[Sequence[int]] = None,
                 global_att_blocks: Optional[Sequence[int]] = None) -> dict:
    """``arch`` (a name such as 'small', 'd_small', 's', or a dict with ARCH_KEYS) as a checked dict."""
    if isinstance(arch, str):
        prefix = "d_" if arch.startswith("d_") else ""
        size = ARCH_ALIASES.get(arch[len(prefix):], arch[len(prefix):])
        if size not in ARCH_SETTINGS:
            raise ValueError(f"Unknown HieraDet arch {arch!r}; choose one of {', '.join(ARCH_NAMES)} "
                             f"or pass a dict with the keys {', '.join(ARCH_KEYS)}.")
        cfg = dict(ARCH_SETTINGS[size], window_spec=LAYOUTS[prefix])
    elif isinstance(arch, Mapping):
        missing = [k for k in ARCH_KEYS if k not in arch]
        unknown = [k for k in arch if k not in ARCH_KEYS]
        if missing or unknown:
            raise ValueError(f"HieraDet arch dict must have exactly the keys {', '.join(ARCH_KEYS)}; "
                             f"missing: {missing or 'none'}, unknown: {unknown or 'none'}.")
        cfg = dict(arch)
    else:
        raise TypeError(f"HieraDet arch must be a name or a dict, got {type(arch).__name__}")
    if window_spec is not None:
        cfg["window_spec"] = window_spec
    if global_att_blocks is not None:
        cfg["global_att_blocks"] = global_att_blocks

    cfg = {k: (tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)) for k, v in cfg.items()}
    if len(cfg["depths"]) != NUM_STAGES or min(cfg["depths"]) < 1:
        raise ValueError(f"HieraDet depths must be four positive numbers, got {cfg['depths']}")
    if len(cfg["window_spec"]) != NUM_STAGES or min(cfg["window_spec"]) < 0:
        raise ValueError(f"HieraDet window_spec must be four sizes >= 0 (0 = global), got {cfg['window_spec']}")
    if len(cfg["global_pos_size"]) != 2:
        raise ValueError(f"HieraDet global_pos_size must be (h, w), got {cfg['global_pos_size']}")
    depth = sum(cfg["depths"])
    bad = [b for b in cfg["global_att_blocks"] if not 0 <= b < depth]
    if bad:
        raise ValueError(f"HieraDet global_att_blocks {bad} are outside the {depth} blocks of this arch")
    return cfg


def arch_name(arch: Mapping) -> str:
    """The name of a resolved arch dict ('small', 'd_small', ...), or 'custom'."""
    return next((name for name in ARCH_NAMES if resolve_arch(name) == dict(arch)), "custom")
