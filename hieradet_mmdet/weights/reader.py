"""Reading checkpoint files safely, into this package's key names (forms: docs/checkpoints.md).

Files are only ever read with ``torch.load(weights_only=True)`` (on torch < 2.4 our restricted
unpickler with the same allowlist, :mod:`.restricted_loading`) or safetensors, so a checkpoint
cannot run code; MMEngine's own checkpoints need a few more types, allowed by :mod:`.safe_globals`. What a file is (birder, SAM2, MMDetection, a plain state dict) is told by
its content, not its name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .convert import CLASSIFIER_PREFIXES, to_our_names
from .errors import CheckpointError
from .published import PretrainedWeights, resolve_source
from .restricted_loading import safe_load

# birder names its files '<network>_<tag>[_<epoch>].pt', e.g. hieradet_d_small_dino-v2-imagenet12k.pt
_BIRDER_FILE_NAME = re.compile(r"^(hieradet_(?:d_)?(?:base_plus|small|tiny|base|large))(?:[_.-]|$)")

Source = Union[str, os.PathLike, "LoadedCheckpoint"]


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


def read_checkpoint(source: Source, *, progress: bool = True) -> LoadedCheckpoint:
    """Read any supported checkpoint (path, published name, URL) into our key names."""
    if isinstance(source, LoadedCheckpoint):
        return source
    path, weights = resolve_source(source, progress=progress)
    content, file_metadata = load_file(path)
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


def load_file(path: Union[str, Path], *, mmap: bool = False) -> tuple[Any, Optional[dict]]:
    """The content of a checkpoint file and, for safetensors, its header metadata; never runs
    code. ``mmap`` maps tensors instead of reading them (a cheap check that a file loads)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot read checkpoint {path}: there is no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(9)
    if _looks_like_safetensors(head, size) or path.suffix == ".safetensors":
        return _read_safetensors(path)
    allow_mmengine_types()
    try:
        try:
            return safe_load(str(path), map_location="cpu", mmap=mmap), None  # torch < 2.2 maps only str paths
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if not mmap or "mmap" not in str(err):
                raise
            return safe_load(path, map_location="cpu"), None
    except pickle.UnpicklingError as err:
        text = str(err)
        unsafe = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"refusing (getattr\([^)]*\))", text)
        if unsafe:
            raise CheckpointError(
                f"refusing to load checkpoint {path}: unpickling it would import and call {unsafe.group(1)}, "
                "which a checkpoint of tensors never needs and which could run arbitrary code. Checkpoints "
                "are read with torch.load(weights_only=True): tensors, plain containers, numpy arrays and "
                "MMEngine's log buffers only.") from None
        reason = next((line.strip() for line in text.splitlines() if "Unsupported" in line), type(err).__name__)
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint that can be read "
                              f"safely ({reason}; the file starts with {head[:8]!r})") from None
    except Exception as err:  # truncated zip, text, random bytes: torch raises many types
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: not a readable PyTorch or safetensors file; "
                              f"truncated, or another kind of file (it starts with {head[:8]!r}): "
                              f"{type(err).__name__}: {first_line}") from None


def allow_mmengine_types() -> None:
    """Let the weights-only loader read MMEngine's checkpoints (numpy arrays, log buffers)."""
    try:
        from .safe_globals import register_safe_globals
    except ImportError:  # without mmengine there are no such checkpoints to read
        return
    register_safe_globals()


def _published_metadata(weights: PretrainedWeights) -> dict:
    return dict(weights=weights.name, network=weights.network, size=weights.resolution,
                num_classes=weights.num_classes)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"cannot read checkpoint {path}: .safetensors files need the safetensors "
                              "package (pip install safetensors)") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: not a readable safetensors file "
                              f"(truncated?): {err}") from None
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
    keys = list(content)
    raise CheckpointError("no state dict found (expected a birder, SAM2 or MMDetection checkpoint or a plain "
                          f"state dict); top-level keys: {', '.join(map(str, keys[:12])) or 'none'}.")


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
