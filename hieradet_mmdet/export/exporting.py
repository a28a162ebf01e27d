"""Writing a module as ONNX or as a ``torch.export`` program with dynamic shapes, and running the
written file (plain PyTorch, no MMDetection). :class:`ExportTarget` is one file to write: the
classifier, backbone and detector exports (:mod:`.classifier`, :mod:`.detector`) write through it."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .ops import OPSET, dynamo_translations

EXPORTERS = ("torchscript", "dynamo")
FORMATS = ("onnx", "pt2")
DynamicAxes = Mapping[str, Mapping[int, str]]  # input or output name -> {axis: symbolic name}
Feeds = Mapping[str, np.ndarray]


def export_onnx(module: nn.Module, example: Sequence[torch.Tensor], path: Path, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: DynamicAxes, exporter: str = "torchscript") -> None:
    """Write ``module`` (in eval mode, run on ``example``) as one ONNX file at ``path``.

    'torchscript' is torch's tracing exporter (``dynamo=False``): seconds for HieraDet-S. 'dynamo'
    goes through ``torch.export`` with every dynamic axis ``Dim.AUTO`` (minutes on 2 cores)."""
    module.eval()
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python ints, the exporter's deprecation
        if exporter == "torchscript":
            torch.onnx.export(module, tuple(example), str(path), dynamo=False, opset_version=OPSET,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()})
        elif exporter == "dynamo":
            with _size_oblivious(), contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(module, tuple(example), dynamo=True, input_names=list(input_names),
                                            output_names=list(output_names),
                                            dynamic_shapes=_dims(example, input_names, dynamic_axes),
                                            custom_translation_table=dynamo_translations(), optimize=False)
            program.save(str(path), external_data=False)
        else:
            raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")


def export_program(module: nn.Module, example: Sequence[torch.Tensor], path: Path, input_names: Sequence[str],
                   dynamic_axes: DynamicAxes) -> torch.export.ExportedProgram:
    """Write ``module`` as a ``torch.export`` program (.pt2) whose dynamic axes stay symbolic."""
    module.eval()
    with torch.no_grad(), _size_oblivious():
        program = torch.export.export(module, tuple(example), dynamic_shapes=_dims(example, input_names, dynamic_axes))
    torch.export.save(program, str(path))
    return program


@dataclass(frozen=True)
class ExportTarget:
    """The file to write: ``path`` (.onnx or .pt2), its ``format`` ('onnx' or 'pt2') and, for ONNX,
    the ``exporter`` ('torchscript' or 'dynamo', see :func:`export_onnx`)."""

    path: str
    format: str = "onnx"
    exporter: str = "torchscript"

    def write(self, module: nn.Module, example: Sequence[torch.Tensor], input_names: Sequence[str],
              output_names: Sequence[str], dynamic_axes: DynamicAxes) -> Callable[[Feeds], list[np.ndarray]]:
        """Export ``module``; returns a function from a feed dict to the NumPy outputs of the written
        file (onnxruntime, or the loaded program)."""
        if self.format == "onnx":
            export_onnx(module, example, self.path, input_names, output_names, dynamic_axes, self.exporter)
            session = onnx_session(self.path)
            return lambda feeds: run_onnx(session, feeds)
        if self.format != "pt2":
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        export_program(module, example, self.path, input_names, dynamic_axes)
        program = torch.export.load(self.path).module()

        def run(feeds: Feeds) -> list[np.ndarray]:
            with torch.no_grad():
                outs = program(*(torch.from_numpy(feeds[name]) for name in input_names))
            return [o.numpy() for o in outs]

        return run

    @property
    def runtime_name(self) -> str:
        """What runs the written file, for the check's report."""
        if self.format == "pt2":
            return "the loaded torch.export program"
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"


@contextlib.contextmanager
def _size_oblivious():
    """Sizes are not specialised on being 0 or 1: a batch of 1 or a map one window wide at export
    time must not freeze a branch that other sizes would not take."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True):
        yield


def _dims(example, input_names, dynamic_axes):
    from torch.export import Dim

    return tuple({axis: Dim.AUTO for axis in dynamic_axes.get(name, {})} or None
                 for name, _ in zip(input_names, example))


def onnx_session(path: Path, threads: int = 0):
    """An onnxruntime CPU session (``threads`` 0: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return session.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})

