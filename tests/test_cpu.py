"""An AVX2-only CPU emulated on this one (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): the caps
take effect, and the tools choose float32 there and say why. `make test` also runs the precision,
fused-kernel, fast-path and benchmark tests under these caps (docs/testing.md)."""

from __future__ import annotations

import pytest

from helpers import fail_text, run_tool, tiny_detector_config
from hieradet_mmdet import cpu

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_the_caps_take_effect_in_a_new_process():
    proc = run_tool(cpu.sys.executable, "-m", "hieradet_mmdet.cpu", "--expect", "avx2", env=AVX2_ONLY)
    assert proc.returncode == 0, fail_text(proc)
    assert "ATen CPU capability: AVX2" in proc.stdout and "oneDNN ISA: Intel AVX2" in proc.stdout


def test_an_uncapped_vector_unit_is_not_taken_for_avx2():
    proc = run_tool(cpu.sys.executable, "-m", "hieradet_mmdet.cpu", "--expect", "avx2",
                    env={"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 1 and "does not run as an AVX2-only CPU" in proc.stderr, fail_text(proc)


@pytest.mark.parametrize("isa,capability,avx2_only", [
    ("Intel AVX2", "AVX2", True),
    ("Intel AVX2 with Intel DL Boost", "AVX2", False),  # AVX-VNNI (Alder Lake on)
    ("Intel AVX-512 with AVX512BW, AVX512VL, and AVX512DQ extensions", "AVX512", False),
    ("Intel AVX-512 with Intel DL Boost and bfloat16 support and Intel AMX with bfloat16 and 8-bit integer support",
     "AVX512", False),
    ("Intel AVX2", "AVX512", False),  # oneDNN capped, ATen not
])
def test_what_counts_as_avx2_only(isa, capability, avx2_only):
    assert cpu.is_avx2_only(capability, isa) is avx2_only


def test_train_amp_stays_in_float32_on_an_avx2_only_cpu_and_says_why(tmp_path):
    """No bf16 instructions: bf16 matrix products are emulated, tens of times slower than float32."""
    config, _ = tiny_detector_config(tmp_path, iters=1, size=64, narrow=True, num_train=2, num_val=1)
    proc = run_tool("tools/train.py", config, "--work-dir", tmp_path / "work", "--amp", env=AVX2_ONLY, timeout=600)
    assert proc.returncode == 0, fail_text(proc)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("--amp on CPU:")), "")
    assert "staying in float32" in line and "no AMX or full-rate AVX-512 BF16" in line, fail_text(proc)
