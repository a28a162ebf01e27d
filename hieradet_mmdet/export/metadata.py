"""The JSON written beside an exported file (``model.onnx`` -> ``model.onnx.json``): what it holds
and how it is written and read. docs/export.md describes its content for users.

``format`` (onnx | pt2), ``model`` (detector | backbone | classifier), ``architecture``,
``versions``, ``inputs`` / ``outputs`` (name, shape, dtype, description), ``preprocess``,
``classes``, ``check`` (the numbers of the check against the eager model), for detectors also
``postprocess`` (the test thresholds the graph baked in) and ``source`` (config, checkpoint).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

LOAD_PT2 = "import hieradet_mmdet.export.ops; torch.export.load(path).module()"


def metadata_path(model_path) -> str:
    return str(model_path) + ".json"


def read_metadata(model_path) -> dict:
    """The JSON written beside an exported model."""
    path = Path(metadata_path(model_path))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: tools/export.py writes it beside {Path(model_path).name}")
    return json.loads(path.read_text())


def write_metadata(model_path, metadata: dict) -> str:
    """Write ``metadata`` beside ``model_path``; returns the JSON's path."""
    path = metadata_path(model_path)
    Path(path).write_text(metadata_json(metadata))
    return path


def metadata_json(metadata: dict) -> str:
    """Indented JSON with lists of plain values on one line (shapes, mean, std, class names)."""
    text = json.dumps(metadata, indent=2)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def tensor_spec(name: str, shape: Sequence[Any], dtype: str, description: str) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, "description": description}


def base_metadata(file_format: str, exporter: str, kind: str, architecture: str) -> dict:
    """What every JSON starts with: the file's format, the kind of model, and the versions that
    wrote it (with the opset and exporter of an ONNX file, or how to load a .pt2 program)."""
    import onnx
    import onnxruntime
    import torch

    from .. import __version__
    from .ops import OPSET

    versions = {"torch": torch.__version__, "hieradet_mmdet": __version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if kind != "classifier":
        import mmdet

        versions["mmdet"] = mmdet.__version__
    if file_format == "onnx":
        versions.update(opset=OPSET, exporter=exporter)
    else:
        versions["load_with"] = LOAD_PT2
    return {"format": file_format, "model": kind, "architecture": architecture, "versions": versions}
