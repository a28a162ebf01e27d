"""tools/benchmark.py on a tiny input, and the trunk's fast paths (token layouts, fused oneDNN
linears, the autograd path) against each other and against birder."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hieradet_mmdet import fused_linear as hd
from hieradet_mmdet import hieradet as hd_model
from hieradet_mmdet.hieradet import HieraDet
from hieradet_mmdet.token_layout import TokenLayout

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", REPO / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def birder_ok():
    return importlib.util.find_spec("birder") is not None


def test_benchmark_writes_the_documented_fields(tmp_path):
    tool = load_tool()
    out = tmp_path / "bench.json"
    report = tool.main(["--models", "hieradet_small", "birder_small", "--mode", "backbone", "--dtype", "fp32",
                        "bf16", "--sizes", "64x96", "--iters", "1", "--warmup", "0", "--threads", "1",
                        "--no-isolate", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert {"command", "machine", "threads", "load_before", "load_after", "results", "targets"} <= set(saved)
    assert saved["machine"]["gemm_gflops"]["fp32"] > 0 and saved["machine"]["gemm_gflops"]["bf16"] > 0
    rows = {(r["model"], r["dtype"]): r for r in saved["results"]}
    assert len(rows) == 4
    ours32, ours16 = rows["hieradet_small", "fp32"], rows["hieradet_small", "bf16"]
    for row in (ours32, ours16):
        assert row["status"] == "ok"
        assert len(row["times_ms"]) == 1 and row["p90_ms"] >= row["median_ms"] > 0
        assert row["images_per_s"] == pytest.approx(1e3 / row["median_ms"])
        assert row["peak_mem_mb"] > 0 and "peak_delta_mb" in row and row["mem_kind"]
        assert row["gflops"] > 1.0  # matmuls + attention: ~3.9 GFLOPs at 64x96
        assert row["size"] == [64, 96] and row["batch"] == 1
    assert ours16["err_vs_fp32"]["norm_rel"] < 5e-2
    if birder_ok():
        assert ours32["parity_vs_birder"]["max_rel"] <= 1e-5
        assert rows["birder_small", "fp32"]["status"] == "ok"
        # The same attention and MLPs; birder also runs attn.proj on window padding, we don't.
        assert 0.8 * rows["birder_small", "fp32"]["gflops"] < ours32["gflops"] <= rows["birder_small", "fp32"]["gflops"]
        assert any("small fp32" in line for line in saved["targets"])
    else:
        assert rows["birder_small", "fp32"]["status"] == "skipped"
        assert "birder" in ours32["parity_vs_birder"]


def test_isolated_case_reports_memory_of_its_own_process():
    tool = load_tool()
    case = dict(model="hieradet_d_small", mode="backbone-train", dtype="fp32", size=[64, 64], batch=1,
                with_cp=True, device="cpu", threads=1, iters=1, warmup=0, flops=False, accuracy=False)
    (result,) = tool._run_isolated([case], paired=False, timeout=120)
    assert result["status"] == "ok", result.get("reason")
    assert result["peak_mem_mb"] > result["peak_delta_mb"] > 0
    assert "gflops" not in result


def test_exact_malloc_shows_the_memory_checkpointing_saves(capsys):
    """With every tensor its own mapping the RSS peak follows live tensors: with_cp must save."""
    tool = load_tool()
    report = tool.main(["--models", "hieradet_small", "--mode", "backbone-train", "--sizes", "256x256", "--batch",
                        "2", "--with-cp", "both", "--iters", "1", "--warmup", "1", "--threads", "1", "--no-flops",
                        "--no-accuracy", "--malloc", "exact"])
    off, on = sorted(report["results"], key=lambda r: r["with_cp"])
    assert off["status"] == on["status"] == "ok" and on["malloc"] == "exact"
    assert on["peak_delta_mb"] < 0.75 * off["peak_delta_mb"], (on["peak_delta_mb"], off["peak_delta_mb"])
    assert "malloc exact" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="isolated"):
        tool.main(["--models", "hieradet_small", "--malloc", "exact", "--no-isolate", "--sizes", "64x64"])


def test_paired_runs_interleave_models_in_one_process():
    tool = load_tool()
    report = tool.main(["--models", "hieradet_small", "hieradet_d_small", "--mode", "backbone", "--sizes", "32x64",
                        "--iters", "2", "--warmup", "0", "--threads", "1", "--no-isolate", "--paired", "--no-flops",
                        "--no-accuracy"])
    rows = report["results"]
    assert [r["model"] for r in rows] == ["hieradet_small", "hieradet_d_small"]
    for r in rows:
        assert r["status"] == "ok" and len(r["times_ms"]) == 2 and r["median_ms"] > 0
        assert r["paired_with"] == ["hieradet_small", "hieradet_d_small"] and "peak_mem_mb" not in r


def test_cli_rejects_bad_sizes():
    tool = load_tool()
    with pytest.raises(SystemExit):
        tool.build_parser().parse_args(["--sizes", "800by1344"])


# --- the trunk's fast paths --------------------------------------------------------------------

def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# Small and quick, but with every kind of block HieraDet-S has: windows that tile (8, 4), windows
# that need padding (14, 7), q-pools in tiling and padded windows, global blocks.
MINI = dict(depths=(1, 2, 3, 2), embed_dim=32, num_heads=1, global_pos_size=(7, 7), global_att_blocks=(4,),
            window_spec=(8, 4, 14, 7))


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module", params=[(8, 4, 14, 7), (8, 4, 0, 0)], ids=["windowed", "global"])
def mini(request):
    return perturbed(HieraDet(dict(MINI, window_spec=request.param)))


def test_fused_plain_and_autograd_paths_agree(mini):
    x = torch.randn(2, 3, 200, 136)  # stage 3 (13 x 8) pads windows of 14 in both directions
    previous = hd.set_fused_linear(False)
    try:
        with torch.no_grad():
            plain = mini(x)
    finally:
        hd.set_fused_linear(previous)
    with torch.no_grad():
        fused = mini(x)
    grad = mini(x.requires_grad_())  # autograd path: plain ops, no in-place tricks
    for a, b, c in zip(fused, plain, grad):
        assert a.shape == b.shape == c.shape
        assert rel(a, b) < 1e-5 and rel(c, b) < 1e-5
    sum(o.square().mean() for o in grad).backward()
    assert torch.isfinite(x.grad).all()


def test_bf16_autocast_fused_matches_plain_autocast(mini):
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        ref = mini(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = mini(x)
            previous = hd.set_fused_linear(False)
            try:
                plain = mini(x)
            finally:
                hd.set_fused_linear(previous)
    for f, p, r in zip(fused, plain, ref):
        assert f.dtype == p.dtype
        assert ((f.float() - r).norm() / r.norm()).item() < 5e-2
        assert ((p.float() - r).norm() / r.norm()).item() < 5e-2
    assert fused[-1].dtype == torch.bfloat16  # as under autocast, the stream is bf16 after the first q-pool


def test_bf16_autocast_trains_with_checkpointing(mini):
    model = HieraDet(mini.arch, with_cp=True, drop_path_rate=0.1).train()
    model.load_state_dict(mini.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 96))
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_tokens_and_lone_blocks_match_forward(mini):
    x = torch.randn(1, 3, 112, 144)
    with torch.no_grad():
        outs = mini(x)
        tokens = dict(mini.forward_tokens(x))
        for out, end in zip(outs, mini.stage_ends):
            assert rel(tokens[end].permute(0, 3, 1, 2), out) == 0
        # Every block also runs alone on a (B, H, W, C) map, the way birder's blocks do.
        t = mini.patch_embed(x).permute(0, 2, 3, 1) + mini.position_embedding(28, 36)
        for i, block in enumerate(mini.blocks):
            t = block(t)
            assert rel(t, tokens[i]) < 1e-5, i


@pytest.mark.parametrize("h,w,window,levels", [(50, 84, 14, 1), (25, 42, 7, 0), (200, 336, 8, 2), (7, 9, 0, 2)])
def test_token_layouts_hold_every_position_once(h, w, window, levels):
    layout = TokenLayout(h, w, window, levels)
    real = torch.ones(layout.n, dtype=torch.bool)
    if layout.has_pad:
        real[layout.pad_mask[:, 0]] = False
    assert sorted(layout.src[real].tolist()) == list(range(h * w))
    assert torch.equal(layout.src[layout.inv], torch.arange(h * w))
    assert sum(b - a for a, b in layout.pad_runs) == layout.n - h * w
    if levels:  # the first plane level pools exactly the floor-mode 2x2 cells
        pooled = layout.pooled()
        m = layout.pooled_per_group()
        grid = torch.arange(h * w, dtype=torch.float).view(1, h * w, 1)
        cells = torch.nn.functional.max_pool2d(grid.view(1, 1, h, w), 2).flatten()
        slots = grid[0, layout.src, 0].view(layout.groups, -1)[:, :4 * m].view(layout.groups, 4, m).amax(1)
        real = ~pooled.pad_mask[:, 0] if pooled.has_pad else torch.ones(pooled.n, dtype=torch.bool)
        assert torch.equal(slots.flatten()[pooled.inv], cells)
        assert real.sum() == cells.numel()


def test_q_pool_needs_even_windows():
    with pytest.raises(ValueError, match="odd"):
        HieraDet(dict(MINI, window_spec=(7, 4, 14, 7)))
    HieraDet(dict(MINI, window_spec=(8, 4, 14, 7)))  # the last stage's window may be odd


def test_gradients_match_birder(birder_small):
    """The autograd path (gathers with gather backward, max-with-index q-pool) against birder."""
    from test_backbone import ours_from_birder

    from hieradet_mmdet.checkpoint import remap_birder_keys

    ours = ours_from_birder(birder_small, "small").train()
    x = torch.randn(1, 3, 128, 192)  # stage 3: 8 x 12 tokens in windows of 14, stage 4: 4 x 6 in 7
    grads = []
    for forward, model in ((ours, ours), (lambda t: list(birder_small.detection_features(t).values()), birder_small)):
        xg = x.clone().requires_grad_()
        outs = forward(xg)
        sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
        grads.append(dict(model.named_parameters(), input=xg))
    ref = remap_birder_keys({k: p for k, p in grads[1].items()}, ours.arch["depths"])
    try:
        for name, p in grads[0].items():
            assert rel(p.grad, ref[name].grad) < 1e-4, name
    finally:
        birder_small.zero_grad(set_to_none=True)
        birder_small.eval()


def test_plan_cache_keeps_the_sizes_used_last(mini):
    """Multi-scale training meets many input sizes: the per-size plans must not pile up."""
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        first = mini(x)
        for i in range(hd_model.PLAN_CACHE_SIZE + 4):
            mini(torch.randn(1, 3, 64 + 32 * (i % 5), 160 + 32 * (i // 5)))
        assert len(mini._plans) == hd_model.PLAN_CACHE_SIZE
        assert (96 // 4, 128 // 4, "cpu") not in mini._plans  # evicted, rebuilt on the next call
        again = mini(x)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
