"""The trunk traced and exported: ONNX files run by onnxruntime and torch.export programs give the
eager fast path's numbers at sizes other than the traced one, not only at the traced one."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import ours_from_birder, rel_err
from hieradet_mmdet.export.exporting import export_onnx, export_program, onnx_session, run_onnx
from hieradet_mmdet.models import HieraDet

# Every block kind (q-pool, windows that tile and that need padding, global) in few channels.
NARROW = dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=1, global_pos_size=(7, 7), global_att_blocks=(3,),
              window_spec=(8, 4, 14, 7))
BACKBONE_DYNAMIC = {"input": {0: "N", 2: "H", 3: "W"}}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def small_onnx(birder_small, tmp_path_factory):
    """HieraDet-S (SAM2 windows, birder's weights) through the TorchScript exporter, traced at 256x256."""
    model = ours_from_birder(birder_small, "small")
    path = tmp_path_factory.mktemp("onnx") / "hieradet_small.onnx"
    export_onnx(model, (torch.randn(1, 3, 256, 256),), path, ["input"], STAGES, BACKBONE_DYNAMIC)
    return model, onnx_session(path)


@pytest.mark.parametrize("shape", [(1, 3, 200, 328), (2, 3, 160, 224), (2, 3, 77, 45)])
def test_backbone_onnx_equals_eager_at_other_sizes(small_onnx, shape, birder_small):
    """Sizes that are and are not multiples of 8 after the stem, batch 1 and 2; 200x328 is a size
    where birder itself fails, so the reference is our eager fast path."""
    model, session = small_onnx
    x = torch.randn(*shape)
    outs = run_onnx(session, {"input": x.numpy()})
    with torch.no_grad():
        refs = model(x)
    assert [o.shape for o in outs] == [tuple(r.shape) for r in refs]
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) <= 1e-4
    if shape[0] == 2:  # the bound can fail: the other image's outputs are far outside it
        assert rel_err(outs[-1][:1], refs[-1][1:]) > 0.1


def test_traced_graph_generalises_to_other_sizes():
    """torch.jit.trace records the window padding, the tiled position embedding and the window
    counts as computations on the input's size, so the trace is right at other sizes too."""
    model = perturbed(HieraDet(NARROW))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(1, 3, 256, 256), check_trace=False)
        for shape in [(1, 3, 200, 328), (2, 3, 29, 29), (1, 3, 64, 256), (1, 3, 256, 64)]:
            x = torch.randn(*shape)
            for out, ref in zip(traced(x), model(x)):
                assert out.shape == ref.shape and rel_err(out, ref) <= 1e-5


def test_onnx_at_a_traced_size_that_needs_padding_runs_at_one_that_does_not(tmp_path):
    """Traced where every window pads and the 8x8 position tile is cropped (stem 50x82), run
    where nothing pads (stem 64x64), and the other way round: no size of the trace survives."""
    model = perturbed(HieraDet(NARROW), seed=1)
    for traced, other in [((200, 328), (256, 256)), ((256, 256), (200, 328))]:
        path = tmp_path / f"narrow_{traced[0]}.onnx"
        export_onnx(model, (torch.randn(1, 3, *traced),), path, ["input"], STAGES, BACKBONE_DYNAMIC)
        session = onnx_session(path)
        x = torch.randn(2, 3, *other)
        with torch.no_grad():
            refs = model(x)
        for out, ref in zip(run_onnx(session, {"input": x.numpy()}), refs):
            assert rel_err(out, ref) <= 1e-4


def test_torch_export_program_is_dynamic_in_batch_height_and_width(tmp_path):
    """A .pt2 saved and loaded runs at batches 1-3 and sizes down to one window across a stage
    (no guard on a size being 1), and refuses what the eager model refuses."""
    model = perturbed(HieraDet(NARROW), seed=2)
    path = tmp_path / "narrow.pt2"
    export_program(model, (torch.randn(1, 3, 96, 128),), path, ["input"], BACKBONE_DYNAMIC)
    loaded = torch.export.load(str(path))
    ops = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in op for op in ops), "the fast path's oneDNN linears were exported"
    program = loaded.module()
    for shape in [(1, 3, 29, 29), (3, 3, 200, 328), (2, 3, 77, 45)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            for out, ref in zip(program(x), model(x)):
                assert out.shape == ref.shape and rel_err(out, ref) <= 1e-5
    with pytest.raises(Exception):
        program(torch.randn(1, 3, 28, 28))  # below HieraDet's smallest input, as the eager model
