"""Reading HieraDet weights from the checkpoint forms users hold, into this package's key names.

Forms (told apart by content, not by file name):

* birder ``.pt`` (``{"state": ..., "signature": ..., "class_to_idx": ..., "rgb_stats": ...}``) and
  birder ``.safetensors`` (the same metadata as JSON strings in the safetensors header);
* SAM2 / SAM2.1 checkpoints (``{"model": {"image_encoder.trunk.*": ...}}``) or a bare trunk
  state dict with a ``trunk.`` prefix;
* MMDetection checkpoints of a detector on this backbone (``{"state_dict": {"backbone.*": ...}}``);
* plain state dicts in our names, with or without a ``backbone.`` prefix;
* a published weights name or an http(s) URL (see :mod:`hieradet_mmdet.pretrained`).

Files are only ever read with ``torch.load(weights_only=True)`` or safetensors, so a
checkpoint cannot run code. Loading into a model is strict: everything the trunk needs must be
there with the right shape (only the global ``pos_embed`` grid is resized), or nothing loads.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .hieradet import ARCH_SETTINGS
from .pretrained import PretrainedWeights, resolve_source

logger = logging.getLogger(__name__)

try:  # MMDetection checkpoints carry numpy / HistoryBuffer objects that must be allowlisted
    from .safe_load import register_safe_globals

    register_safe_globals()
except ImportError:  # without mmengine there are no such checkpoints to read
    pass

CLASSIFIER_PREFIXES = ("norm.", "head.")  # the classification head on top of the trunk
_BIRDER_BLOCK = re.compile(r"body\.stage(\d)\.(\d+)\.(.*)")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
# SAM2's module names inside a block / the trunk, and ours.
_SAM2_RENAMES = ((re.compile(r"^patch_embed\.proj\."), "patch_embed."),
                 (re.compile(r"\.mlp\.layers\.0\."), ".mlp.fc1."),
                 (re.compile(r"\.mlp\.layers\.1\."), ".mlp.fc2."))
# birder names its files '<network>_<tag>[_<epoch>].pt', e.g. hieradet_d_small_dino-v2-imagenet12k.pt
_BIRDER_FILE_NAME = re.compile(
    r"^(hieradet_(?:d_)?(?:%s))(?:[_.-]|$)" % "|".join(sorted(ARCH_SETTINGS, key=len, reverse=True)))

Source = Union[str, os.PathLike, "LoadedCheckpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or does not fit the model; always names the file."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint in this package's key names.

    ``state_dict`` holds the trunk keys (``patch_embed.*``, ``pos_embed``, ``blocks.N.*``, ...)
    and, when the file has a classification head, ``norm.*`` and ``head.*``. ``metadata`` has
    ``format`` and whatever the file says about itself: ``class_to_idx``, ``rgb_stats``,
    ``signature``, ``size`` (h, w), ``num_classes``, ``network`` (birder's name), ...
    """

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory state dict>"

    @property
    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict.items() if not k.startswith(CLASSIFIER_PREFIXES)}

    @property
    def has_head(self) -> bool:
        return "head.weight" in self.state_dict and "norm.weight" in self.state_dict

    @property
    def arch(self) -> Optional[str]:
        """Our arch name when the checkpoint states its network (published weights, birder file
        names); None when only the weights are known (their layout cannot be seen in them)."""
        network = self.metadata.get("network")
        return network[len("hieradet_"):] if network else None


# ---------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(source: Source, *, progress: bool = True) -> LoadedCheckpoint:
    """Read any supported checkpoint (path, published name, URL) into our key names."""
    if isinstance(source, LoadedCheckpoint):
        return source
    path, weights = resolve_source(source, progress=progress)
    content, file_metadata = _read_file(path)
    try:
        state, metadata = _unwrap(content, file_metadata)
        state = to_our_names(state)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if weights is not None:
        metadata = {**_published_metadata(weights), **metadata}
    elif metadata.get("format", "").startswith("birder"):
        match = _BIRDER_FILE_NAME.match(path.name)
        if match:
            metadata["network"] = match.group(1)
    return LoadedCheckpoint(state, metadata, path)


def _published_metadata(weights: PretrainedWeights) -> dict:
    return dict(weights=weights.name, network=weights.network, size=weights.resolution,
                num_classes=weights.num_classes)


def _read_file(path: Path) -> tuple[Any, Optional[dict]]:
    """The file's content and, for safetensors, its header metadata. Never runs code."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty.")
    with open(path, "rb") as f:
        head = f.read(9)
    if _looks_like_safetensors(head, size) or path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as err:
        unsafe_global = re.search(r"GLOBAL ([\w.]+)", str(err))
        if unsafe_global:
            raise CheckpointError(
                f"{path}: refused to load: unpickling it would import and call {unsafe_global.group(1)}, "
                "which a checkpoint of tensors never needs. Checkpoints are only read with "
                "torch.load(weights_only=True), so a file can never run code here.") from None
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), type(err).__name__)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint that can be read safely "
                              f"({reason}; the file starts with {head[:8]!r}).") from None
    except Exception as err:  # truncated zip, text, random bytes: torch raises many types
        raise CheckpointError(f"{path}: not a readable PyTorch or safetensors checkpoint; it may be truncated "
                              f"or another kind of file (starts with {head[:8]!r}): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install safetensors).") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {err}") from None
    return state, metadata


def _unwrap(content: Any, file_metadata: Optional[dict]) -> tuple[dict, dict]:
    """(state dict, metadata) from the checkpoint container, for each supported form."""
    if not isinstance(content, Mapping):
        raise CheckpointError(f"not a checkpoint: it holds a {type(content).__name__}, not a dict.")
    if file_metadata is not None:
        return dict(content), _birder_metadata(file_metadata, from_json=True)
    if isinstance(content.get("state"), Mapping) and "signature" in content:
        return dict(content["state"]), _birder_metadata(content, from_json=False)
    if isinstance(content.get("model"), Mapping):
        return dict(content["model"]), {"format": "sam2"}
    if isinstance(content.get("state_dict"), Mapping):
        return dict(content["state_dict"]), {"format": "mmdet"}
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return dict(content), {"format": "state_dict"}
    raise CheckpointError("no state dict found (expected a birder, SAM2 or MMDetection checkpoint or a plain "
                          f"state dict); top-level keys: {_preview(list(content))}.")


def _birder_metadata(raw: Mapping, from_json: bool) -> dict:
    if from_json and "signature" not in raw:
        return {"format": "safetensors"}
    metadata: dict[str, Any] = {"format": "birder-safetensors" if from_json else "birder"}
    try:
        for key, value in raw.items():
            if key == "state":
                continue
            if from_json and key in ("class_to_idx", "signature", "rgb_stats", "config", "backbone_config"):
                value = json.loads(value) if value else None
            metadata[key] = value
        signature = metadata.get("signature")
        if signature:
            metadata["size"] = tuple(int(x) for x in signature["inputs"][0]["data_shape"][2:4])
            metadata["num_classes"] = int(signature.get("num_labels", signature["outputs"][0]["data_shape"][1]))
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f"its birder metadata (signature, class_to_idx, ...) is malformed: {err!r}") from None
    return metadata


# ---------------------------------------------------------------------------------------------
# Key names


def to_our_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Find the HieraDet trunk in a state dict of any supported naming and rename it to ours.

    The trunk is located by its ``pos_embed`` key; its prefix (``image_encoder.trunk.``,
    ``backbone.``, ``trunk.``, ...) is stripped and everything outside it (necks, heads,
    SAM2's memory modules) is left out."""
    prefixes = [key[:-len("pos_embed")] for key in state if key == "pos_embed" or key.endswith(".pos_embed")]
    prefixes = [p for p in prefixes if any(k.startswith((p + "blocks.", p + "body.stage")) for k in state)]
    if not prefixes:
        raise CheckpointError(f"no HieraDet trunk found (no 'pos_embed' next to 'blocks.*' or birder's "
                              f"'body.stage*'); keys: {_preview(list(state))}.")
    if len(prefixes) > 1:
        raise CheckpointError(f"several HieraDet trunks found, under the prefixes {prefixes}.")
    prefix = prefixes[0]
    trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "stem.proj.weight" in trunk or any(k.startswith("body.stage") for k in trunk):
        return remap_birder_keys(trunk, birder_depths(trunk))
    out = {}
    for key, value in trunk.items():
        for pattern, new in _SAM2_RENAMES:
            key = pattern.sub(new, key)
        out[key] = value
    return out


def birder_depths(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Blocks per stage, read off birder's ``body.stageS.J.*`` keys."""
    depths = [0, 0, 0, 0]
    for key in state:
        m = _BIRDER_BLOCK.match(key)
        if m:
            stage = int(m.group(1)) - 1
            depths[stage] = max(depths[stage], int(m.group(2)) + 1)
    return depths


def remap_birder_keys(state: Mapping[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """birder names (stem.proj, pos_embed_win, body.stageS.J.*, mlp.0/3, features.0, classifier)
    -> ours (patch_embed, pos_embed_window, blocks.N.*, mlp.fc1/fc2, norm, head)."""
    starts = [sum(depths[:i]) for i in range(len(depths))]
    out = {}
    for key, value in state.items():
        new = key.replace("stem.proj.", "patch_embed.").replace("pos_embed_win", "pos_embed_window")
        new = new.replace("features.0.", "norm.").replace("classifier.", "head.")
        m = _BIRDER_BLOCK.match(new)
        if m:
            rest = m.group(3).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            new = f"blocks.{starts[int(m.group(1)) - 1] + int(m.group(2))}.{rest}"
        out[new] = value
    return out


def trunk_dims(state: Mapping[str, torch.Tensor]) -> Optional[tuple[tuple[int, ...], int, tuple[int, ...]]]:
    """(depths, embed_dim, global_pos_size) of a trunk state dict in our names; None if incomplete.

    Stages are delimited by the blocks that carry a ``proj`` (the first block of stages 2-4)."""
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, state) if m}
    stage_starts = sorted(i for i in blocks if f"blocks.{i}.proj.weight" in state)
    if not blocks or len(stage_starts) != 3 or "pos_embed" not in state or state["pos_embed"].ndim != 4:
        return None
    bounds = [0, *stage_starts, max(blocks) + 1]
    depths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    return depths, int(state["pos_embed"].shape[1]), tuple(state["pos_embed"].shape[2:])


def trunk_size(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """'tiny', 'small', ... for a trunk state dict in our names (the layout is not visible)."""
    dims = trunk_dims(state)
    return arch_size_of(*dims) if dims else None


def describe_trunk(state: Mapping[str, torch.Tensor]) -> str:
    """e.g. "'small' (depths 1-2-11-2, embed_dim 96)", as far as the state dict shows."""
    dims = trunk_dims(state)
    if dims is None:
        return "an incomplete HieraDet"
    size = arch_size_of(*dims)
    return (f"{repr(size) if size else 'an unknown HieraDet'} "
            f"(depths {'-'.join(map(str, dims[0]))}, embed_dim {dims[1]})")


def arch_size_of(depths: Sequence[int], embed_dim: int, pos_size: Sequence[int]) -> Optional[str]:
    """The ARCH_SETTINGS size ('tiny', 'small', ...) with these dimensions, if any."""
    for name, cfg in ARCH_SETTINGS.items():
        if (tuple(cfg["depths"]), cfg["embed_dim"], tuple(cfg["global_pos_size"])) == (
                tuple(depths), embed_dim, tuple(pos_size)):
            return name
    return None


def _preview(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "") if keys else "none"


# ---------------------------------------------------------------------------------------------
# Loading into a model


def load_backbone_weights(model: nn.Module, source: Source, *, progress: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint's trunk weights into a :class:`~hieradet_mmdet.hieradet.HieraDet`.

    ``source``: a published weights name, an http(s) URL, a file path, or a LoadedCheckpoint.
    Classifier keys are ignored; a missing trunk key, a key the model does not have or a shape
    mismatch raises :class:`CheckpointError` listing them, and nothing is loaded. A global
    position embedding of another grid size is resized bicubically. Returns the checkpoint."""
    checkpoint = read_checkpoint(source, progress=progress)
    state = fit_trunk_state(model, checkpoint)
    model.load_state_dict(state, strict=True)
    logger.info("Loaded HieraDet trunk weights from %s (%s)", checkpoint.name, checkpoint.metadata.get("format"))
    return checkpoint


def fit_trunk_state(model: nn.Module, checkpoint: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's trunk weights, checked against ``model`` key by key and shape by shape."""
    expected = model.state_dict()
    state = checkpoint.trunk_state_dict
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = []
    fitted = {}
    for key, target in expected.items():
        if key not in state:
            continue
        value = state[key]
        if key == "pos_embed" and value.ndim == 4 and value.shape[:2] == target.shape[:2] \
                and value.shape != target.shape:
            logger.info("Resizing pos_embed of %s from %s to %s", checkpoint.name,
                        tuple(value.shape[2:]), tuple(target.shape[2:]))
            value = resize_pos_embed(value, tuple(target.shape[2:]))
        if value.shape != target.shape:
            mismatched.append((key, tuple(value.shape), tuple(target.shape)))
        fitted[key] = value

    if missing or unexpected or mismatched:
        lines = [f"Cannot load HieraDet weights from {checkpoint.name}: the checkpoint is "
                 f"{describe_trunk(state)}, the model is {describe_trunk(expected)}. Nothing was loaded."]
        if mismatched:
            lines.append(f"Shape mismatch ({len(mismatched)} keys; checkpoint shape vs model shape):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched[:20]]
            if len(mismatched) > 20:
                lines.append(f"    ... and {len(mismatched) - 20} more")
        if missing:
            lines.append(f"Missing from the checkpoint ({len(missing)} keys): "
                         f"{_preview(_group_by_block(missing, expected), 20)}")
        if unexpected:
            lines.append(f"In the checkpoint but not in the model ({len(unexpected)} keys): "
                         f"{_preview(_group_by_block(unexpected, state), 20)}")
        raise CheckpointError("\n".join(lines))
    return fitted


def _group_by_block(keys: Sequence[str], all_keys: Sequence[str]) -> list[str]:
    """Keys, with 'blocks.N.*' standing for all of a block's keys when all of them are listed."""
    listed = set(keys)
    out = []
    for key in keys:
        m = _BLOCK.match(key)
        block = m.group(0) if m else None
        if block and all(k in listed for k in all_keys if k.startswith(block)):
            if block + "*" not in out:
                out.append(block + "*")
        else:
            out.append(key)
    return out


def resize_pos_embed(pos_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, C, h, w) global position embedding bicubically, as birder and SAM2 do."""
    return F.interpolate(pos_embed.float(), size=size, mode="bicubic").to(pos_embed.dtype)
