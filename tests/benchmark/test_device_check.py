"""tools/device_check.sh (hieradet_mmdet.benchmark.device_check): the GPU check's CPU dry run end
to end, and its checks catching broken models (a check that cannot fail would prove nothing on
the GPU either)."""

import json
import sys
import time
import zipfile

import pytest
import torch

from helpers import ROOT, fail_text, run_tool

from hieradet_mmdet.benchmark import device_check as dc
from hieradet_mmdet.benchmark.detector_steps import amp_steps
from hieradet_mmdet.benchmark.parity import check_autocast, check_parity, check_with_cp
from hieradet_mmdet.reference import make_pair


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    proc = run_tool("bash", ROOT / "tools" / "device_check.sh", "--dry-run", "--out", out, timeout=600,
                    env={"PYTHON": sys.executable})
    return proc, out


def test_dry_run_runs_every_part_and_writes_json_and_markdown(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, fail_text(proc)
    report = json.loads((out / "device_check.json").read_text())
    assert report["mode"].startswith("dry-run")
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(
        ["machine", "peaks", "checks", "flops", "timings", "new_size", "detector"], "ok")
    parts = {name: part["result"] for name, part in report["parts"].items()}

    checks = parts["checks"]["rows"]
    assert all(r["ok"] for r in checks) and parts["checks"]["all_ok"]
    names = " / ".join(r["name"] for r in checks)
    for what in ("float64 outputs", "float64 gradients", "fp32 outputs vs birder's float64",
                 "fp32 gradients vs birder's float64",
                 "bf16 autocast", "fp16 autocast", "with_cp outputs and gradients vs without (fp32",
                 "with_cp outputs and gradients vs without (bf16", "index plan cached"):
        assert what in names, what
    bf16 = next(r for r in checks if r["name"].startswith("bf16 autocast"))
    assert 0 < bf16["value"] <= bf16["bound"] and "bfloat16" in bf16["dtypes"]  # autocast took effect
    assert all(r["value"] <= r["bound"] for r in checks if isinstance(r["value"], float))

    # FLOPs of birder's and our steps: the same work but the windows' pad tokens (which we skip)
    flops = parts["flops"]
    for mode in ("forward", "forward+backward"):
        assert 0.8 * flops[f"small/birder/{mode}"] < flops[f"small/ours/{mode}"] <= flops[f"small/birder/{mode}"]
    assert flops["small/ours/forward+backward"] > 2 * flops["small/ours/forward"]

    rows = {(r["mode"], r["model"]): r for r in parts["timings"]["rows"]}
    assert set(rows) == {("forward", "ours"), ("forward", "birder"), ("forward", "ours reference path"),
                         ("forward+backward", "ours"), ("forward+backward", "birder"),
                         ("forward+backward", "ours with_cp"), ("forward+backward", "ours reference path")}
    for row in rows.values():
        assert row["status"] == "ok" and row["median_ms"] > 0 and len(row["round_medians_ms"]) == 2
        assert row["tflops"] > 0
    assert rows["forward", "ours"]["fp32_rel_diff_vs_birder"] <= 1e-5

    assert parts["new_size"]["first_forward_ms"] > 0 and parts["new_size"]["plans_cached"] >= 1

    det = parts["detector"]
    assert [r["model"] for r in det["rows"]] == ["hieradet_small", "swin_t"]
    assert all(r["status"] == "ok" and r["losses_finite"] and r["median_ms"] > 0 for r in det["rows"])
    # what `tools/train.py --amp` picks without a GPU, run for two steps: bf16 exactly where this
    # CPU's measured bf16 speed passes the threshold (both ways: test_amp_steps_follow_the_choice)
    run = det["amp"]
    fast = run["bf16_speedup"] >= run["fast_bf16"]
    assert run["wrapper"] == ("AutocastOptimWrapper" if fast else "OptimWrapper"), run
    assert run["backbone_dtype"] == (["torch.bfloat16"] if fast else ["torch.float32"]), run
    assert run["losses_finite"]

    md = (out / "device_check.md").read_text()
    assert "## Checks" in md and "| check | arch | value | bound | ok |" in md and "**NO**" not in md
    assert "## Backbone steps" in md and "## Mask R-CNN train step" in md
    assert "times are not measurements" in md and "## Against birder" not in md  # no claims from a dry run
    assert md.strip() in proc.stdout  # the table is printed too
    assert "[device-check] checks: ok" in (out / "device_check.log").read_text()


def test_the_summary_is_read_off_the_measured_rows(dry_run):
    """On a GPU the report sums up ours against birder, with_cp memory and throughput; computed
    from the rows, here from the dry run's."""
    _, out = dry_run
    report = json.loads((out / "device_check.json").read_text())
    report["mode"] = "gpu"
    md = dc.markdown(report)
    rows = {(r["mode"], r["model"]): r for r in report["parts"]["timings"]["result"]["rows"]}
    ratio = rows["forward", "birder"]["median_ms"] / rows["forward", "ours"]["median_ms"]
    assert f"- small fp32 forward: birder / ours = {ratio:.3f}" in md
    reference = rows["forward", "ours reference path"]["median_ms"] / rows["forward", "ours"]["median_ms"]
    use = "fast_path=True" if reference > 1 else "the default (reference path)"
    assert f"- small fp32 forward: reference path / fast path = {reference:.3f}: use {use} here" in md
    assert "backbone achieved up to" in md
    for row in report["parts"]["timings"]["result"]["rows"]:  # as a GPU reports memory
        row["peak_above_start_gib"] = {"ours": 8.0, "ours with_cp": 2.0}.get(row["model"], 7.0)
    assert "- small fp32 with_cp peak memory: 0.25x of without (<= 0.5)" in dc.markdown(report)


@pytest.mark.parametrize("speedup", [3.2, 0.01], ids=["fast-bf16", "emulated-bf16"])
def test_amp_steps_follow_the_choice(speedup, monkeypatch):
    """The detector part's `--amp` steps on a CPU whose bf16 is fast (AMX) and on one where it is
    emulated (AVX2 only): bf16 autocast in the first case, float32 in the second."""
    from mmdet.utils import register_all_modules

    from hieradet_mmdet.engine import amp

    register_all_modules(init_default_scope=True)
    monkeypatch.setattr(amp, "bf16_speedup", lambda device="cpu": speedup)
    ctx = dc.Context(dc.DRY_RUN, deadline=time.time() + 600)
    run = amp_steps(ctx)
    fast = speedup >= amp.FAST_BF16
    assert run["wrapper"] == ("AutocastOptimWrapper" if fast else "OptimWrapper")
    assert run["backbone_dtype"] == (["torch.bfloat16"] if fast else ["torch.float32"])
    assert run["bf16_speedup"] == speedup and run["losses_finite"]
    assert ("staying in float32" in run["message"]) is not fast


# The dry run above passes these checks with these models and this input (make_pair's seed, the
# dry run's check input); here each check meets a model with a bug it exists to catch.
@pytest.fixture(scope="module")
def pair():
    ours, ref = make_pair("small", (64, 96))
    return ours, ref, torch.randn(*dc.DRY_RUN.check_shape, generator=torch.Generator().manual_seed(1))


def test_parity_check_catches_unzeroed_window_padding(pair, monkeypatch):
    """'small' at 64x96 pads its stage-3/4 windows; birder zeroes the pads after norm1. A fast
    path that forgot to (here: zero_slots doing nothing) must fail the fp32 and float64 checks."""
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


def _tiny_wheel(directory):
    path = directory / "carried_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("carried_probe.py", "VALUE = 42\n")
        whl.writestr("carried_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: carried-probe\nVersion: 1.0\n")
        whl.writestr("carried_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                           "Tag: py3-none-any\n")
        whl.writestr("carried_probe-1.0.dist-info/RECORD", "")
    return path


def test_run_installs_the_carried_wheels_then_needs_a_gpu(tmp_path):
    """What the GPU machine runs first: the carried wheels into their own folder on PYTHONPATH. Here
    (no GPU) it must then stop and say so, not measure the CPU."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _tiny_wheel(wheels)
    site = tmp_path / "site"
    proc = run_tool("bash", ROOT / "tools" / "device_check.sh", "--out", tmp_path / "out",
                    env={"PYTHON": sys.executable, "DEVICE_CHECK_WHEELS": str(wheels), "DEVICE_CHECK_SITE": str(site)})
    assert proc.returncode == 2, fail_text(proc)
    assert "installing 1 carried wheels" in proc.stdout and (site / "carried_probe.py").read_text() == "VALUE = 42\n"
    assert "no mmcv sdist" in proc.stdout
    assert "no CUDA device here" in proc.stderr + proc.stdout


def test_only_runs_the_parts_asked_for(tmp_path):
    proc = run_tool("bash", ROOT / "tools" / "device_check.sh", "--dry-run", "--only", "new_size", "--out", tmp_path,
                    env={"PYTHON": sys.executable})
    assert proc.returncode == 0, fail_text(proc)
    assert list(json.loads((tmp_path / "device_check.json").read_text())["parts"]) == ["machine", "new_size"]
    proc = run_tool("bash", ROOT / "tools" / "device_check.sh", "--dry-run", "--only", "check", "--out", tmp_path,
                    env={"PYTHON": sys.executable})
    assert proc.returncode == 2 and "unknown parts ['check']" in proc.stderr + proc.stdout


def test_shell_script_parses_and_documents_itself():
    assert run_tool("bash", "-n", ROOT / "tools" / "device_check.sh").returncode == 0
    proc = run_tool("bash", ROOT / "tools" / "device_check.sh", "--help")
    assert proc.returncode == 0 and "--fetch-wheels" in proc.stdout and "--dry-run" in proc.stdout
    proc = run_tool("bash", ROOT / "tools" / "device_check.sh", "--bogus")
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
