"""``tools/benchmark.py --compile``'s measurement of one case (benchmarks.compiled),
in this process and with ``aot_eager`` (inductor's C++ code generation takes minutes on 2 cores):
eager, eager on the reference path and compiled steps each timed, graph breaks counted, the row
in the table."""

from __future__ import annotations

import pytest
import torch


def test_a_compile_case_times_the_fast_path_the_reference_path_and_the_compiled_one(monkeypatch):
    import torch._dynamo

    from benchmarks.compiled import run_one, table
    from hieradet_mmdet.models import fast_path

    fast_calls = []
    real_fast_forward = fast_path.fast_forward
    monkeypatch.setattr(fast_path, "fast_forward", lambda *a: fast_calls.append(1) or real_fast_forward(*a))
    case = dict(case="backbone-infer", size=[64, 64], device="cpu", threads=1, iters=2, warmup=1,
                count_breaks=True, compile=dict(backend="aot_eager"))
    suppress_errors = torch._dynamo.config.suppress_errors
    row = run_one(case)
    assert torch._dynamo.config.suppress_errors == suppress_errors  # the run's settings were put back
    assert row["breaks"]["graph_breaks"] == 0 and row["breaks"]["graphs"] == 1, row["breaks"]
    assert all(row[key] > 0 for key in ("eager_ms", "reference_ms", "compiled_ms", "compile_s")), row
    # the warm-up and the eager steps took the fast path; the reference and compiled steps did not
    assert len(fast_calls) == case["warmup"] + case["iters"]

    row.update(status="ok", compile_cold_s=row["compile_s"], compile_warm_s=row["compile_s"],
               warm_eager_ms=row["eager_ms"], warm_reference_ms=row["reference_ms"],
               warm_compiled_ms=row["compiled_ms"])
    line = table([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "backbone-infer" and float(cells[2]) == round(row["reference_ms"], 1), line
    assert cells[5] == f"{row['reference_ms'] / row['compiled_ms']:.2f}x" and cells[8] == "1", line


def test_the_compile_table_comes_from_a_cold_and_a_warm_process_with_the_given_compile_config(capsys):
    """``tools/benchmark.py --compile``: each case in a cold process and a warm one on its inductor
    cache, with ``--compile-config`` (a config's ``compile`` dict) and ``--dtype`` reaching both."""
    import json

    from benchmarks.cli import main

    report = main(["--compile", "--compile-cases", "backbone-infer", "--sizes", "64x64", "--threads", "1",
                   "--iters", "1", "--warmup", "1", "--dtype", "bf16",
                   "--compile-config", json.dumps(dict(backend="aot_eager"))])
    (row,) = report["compile"]
    assert row["status"] == "ok" and row["compile"] == {"backend": "aot_eager"} and row["dtype"] == "bf16", row
    assert row["compile_cold_s"] > 0 and row["compile_warm_s"] > 0 and row["warm_compiled_ms"] > 0, row
    assert "| backbone-infer bf16 |" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compile_cases_run_under_the_autocast_of_their_dtype(dtype, monkeypatch):
    """The backbone under torch.autocast, the detector under ``--amp``'s autocast (whatever this
    CPU would choose: both dtypes are forced here)."""
    from benchmarks import cases
    from benchmarks.compiled import _setup

    _, _, run, _, _ = _setup(dict(case="backbone-infer", size=[64, 64], device="cpu", dtype=dtype))
    with torch.no_grad():
        assert (torch.bfloat16 in {o.dtype for o in run()}) == (dtype == "bf16")
    asked = []
    real = cases.detector_autocast
    monkeypatch.setattr(cases, "detector_autocast", lambda model, d: asked.append(d) or real(model, d))
    _, parts, run, _, _ = _setup(dict(case="detector-infer", size=[64, 64], device="cpu", dtype=dtype))
    with torch.no_grad():
        run()
    assert asked == [dtype] and len(parts) == 2


@pytest.mark.parametrize("amp_dtype, expected", [(torch.bfloat16, ["fp32", "bf16"]), (None, ["fp32"])])
def test_compile_measures_bf16_where_amp_chooses_it(amp_dtype, expected, monkeypatch):
    from benchmarks.compiled import chosen_dtypes
    from hieradet_mmdet.engine import amp

    monkeypatch.setattr(amp, "choose_mixed_precision", lambda mode, cuda: (amp_dtype, "forced by the test"))
    assert chosen_dtypes("cpu") == expected
