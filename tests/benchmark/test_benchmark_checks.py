"""tools/benchmark.py --checks (benchmarks.parity): correctness on the device before
the timings, the trunk's two paths timed side by side with the choice between them, and each
check catching the bug it exists for (a check that cannot fail would prove nothing on a GPU either)."""

import runpy
import sys

import pytest
import torch

from helpers import ROOT

from benchmarks import cli as tool
from benchmarks import parity
from benchmarks.cases import build_backbone
from benchmarks.parity import check_autocast, check_parity, check_with_cp
from benchmarks.reference import make_pair

CHECK_SHAPE = (1, 3, 64, 96)  # 'small' pads its stage-3/4 windows at this size
EXPECTED_CHECKS = ("float64 outputs", "float64 gradients", "fp32 outputs vs birder's float64",
                   "fp32 gradients vs birder's float64", "bf16 autocast", "fp16 autocast",
                   "with_cp outputs and gradients vs without (fp32", "with_cp outputs and gradients vs without (bf16",
                   "index plan cached")


def benchmark_with_checks(tmp_path):
    return tool.main(["--checks", "--check-size", "64x96", "--models", "hieradet_small", "hieradet_small_reference",
                      "--mode", "backbone", "backbone-train", "--sizes", "64x96", "--iters", "2", "--warmup", "1",
                      "--threads", "1", "--no-isolate", "--no-flops", "--no-accuracy",
                      "--out", str(tmp_path / "bench.json")])


def test_checks_run_first_and_both_paths_are_timed_with_the_choice_between_them(tmp_path, capsys):
    report = benchmark_with_checks(tmp_path)
    printed = capsys.readouterr().out

    checks = report["checks"]
    assert report["checks_failed"] == 0 and all(r["ok"] for r in checks)
    names = " / ".join(r["name"] for r in checks)
    for what in EXPECTED_CHECKS:
        assert what in names, what
    assert {r["arch"] for r in checks} == {"small"}  # the archs of the HieraDet models asked for
    bf16 = next(r for r in checks if r["name"].startswith("bf16 autocast"))
    assert 0 < bf16["value"] <= bf16["bound"] and "bfloat16" in bf16["dtypes"]  # autocast took effect
    assert printed.index("checks on cpu, input 1x3x64x96") < printed.index("median ms")  # before the timings
    assert f"checks on cpu: {len(checks)} of {len(checks)} passed" in printed

    rows = {(r["model"], r["mode"]): r for r in report["results"]}
    for mode in ("backbone", "backbone-train"):
        fast, reference = rows["hieradet_small", mode], rows["hieradet_small_reference", mode]
        assert fast["status"] == reference["status"] == "ok"
        assert fast["first_step_ms"] > 0 and len(fast["times_ms"]) == 2
        ratio = reference["median_ms"] / fast["median_ms"]
        use = "fast_path=True" if ratio > 1 else "fast_path=False"
        assert (f"{mode} 64x96 small fp32: reference path / fast path = {ratio:.3f}x -> on cpu use {use} "
                "(the default here is the fast path)") in report["comparisons"]
    assert report["machine"]["amp"].startswith("--amp on CPU: ")


def test_the_reference_models_run_the_reference_path():
    x = torch.randn(1, 3, 64, 96)
    fast, _ = build_backbone("hieradet_small", (64, 96), with_cp=False)
    reference, _ = build_backbone("hieradet_small_reference", (64, 96), with_cp=False)
    assert fast.takes_fast_path(x) and not reference.takes_fast_path(x)
    with torch.no_grad():  # the same weights: the same numbers
        for a, b in zip(fast(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_failed_check_is_counted_and_sets_the_exit_status(tmp_path, monkeypatch, capsys):
    real = parity.check_plumbing

    def broken(arch, ours, x):
        return [dict(row, ok=False) for row in real(arch, ours, x)]

    monkeypatch.setattr(parity, "check_plumbing", broken)
    for passing in ("check_parity", "check_autocast"):  # (the slow ones; they pass above)
        monkeypatch.setattr(parity, passing, lambda arch, ours, ref, x: [])
    report = tool.main(["--checks", "--check-size", "64x96", "--models", "hieradet_small", "--mode", "backbone",
                        "--sizes", "32x32", "--iters", "1", "--warmup", "0", "--threads", "1", "--no-isolate",
                        "--no-flops", "--no-accuracy"])
    failed = [r["name"] for r in report["checks"] if not r["ok"]]
    assert report["checks_failed"] == len(failed) == 1 and failed[0].startswith("index plan cached")
    assert f"{len(report['checks']) - 1} of {len(report['checks'])} passed" in capsys.readouterr().out

    monkeypatch.setattr(tool, "main", lambda argv=None: report)
    monkeypatch.setattr(sys, "argv", ["tools/benchmark.py"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "tools" / "benchmark.py"), run_name="__main__")
    assert stop.value.code == 1


@pytest.fixture(scope="module")
def pair():
    ours, ref = make_pair("small", CHECK_SHAPE[2:])
    return ours, ref, torch.randn(*CHECK_SHAPE, generator=torch.Generator().manual_seed(1))


def test_parity_check_catches_unzeroed_window_padding(pair, monkeypatch):
    """birder zeroes the windows' pads after norm1. A fast path that forgot to (here: zero_slots
    doing nothing) must fail the fp32 and float64 checks."""
    from hieradet_mmdet.models import fast_path

    ours, ref, x = pair
    monkeypatch.setattr(fast_path, "zero_slots", lambda x, runs, mask: x)
    failed = [r["name"] for r in check_parity("small", ours, ref, x) if not r["ok"]]
    assert any(name.startswith("float64 outputs") for name in failed)
    assert any(name.startswith("fp32 outputs") for name in failed)
    assert any(name.startswith("fp32 gradients") for name in failed)


def test_with_cp_check_catches_a_checkpoint_that_does_not_replay_the_random_state(monkeypatch):
    from hieradet_mmdet.models import HieraDet, fast_path

    mini = HieraDet(dict(depths=(1, 2, 3, 2), embed_dim=32, num_heads=1, global_pos_size=(7, 7),
                         global_att_blocks=(4,), window_spec=(8, 4, 14, 7))).eval()
    x = torch.randn(1, 3, 64, 96)
    assert all(r["ok"] and r["bitwise_identical"] for r in check_with_cp("mini", mini, x))
    real = fast_path.checkpoint
    monkeypatch.setattr(fast_path, "checkpoint", lambda *a, **k: real(*a, **dict(k, preserve_rng_state=False)))
    rows = check_with_cp("mini", mini, x)
    assert not any(r["ok"] for r in rows), rows


def test_autocast_check_catches_a_residual_stream_turned_low_precision(pair, monkeypatch):
    """A residual add written in place into the bf16 branch output (instead of promoting to the
    fp32 stream, as birder's `x + y` does) makes stage 1 a bf16 map: the dtypes differ from birder's."""
    from hieradet_mmdet.models import fast_path, fused_linear

    ours, ref, x = pair

    def in_place(x, layer, residual, fused, rate=0.0, training=False):
        y = fused_linear.linear(x, layer, None)
        return y.add_(residual) if not torch.is_grad_enabled() else residual + y

    monkeypatch.setattr(fast_path, "linear_residual", in_place)
    rows = check_autocast("small", ours, ref, x)
    assert not any(r["ok"] for r in rows)
    assert rows[0]["dtypes"][0] == "bfloat16" and rows[0]["birder_dtypes"][0] == "float32"
