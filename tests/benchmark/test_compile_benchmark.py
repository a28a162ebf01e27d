"""``tools/benchmark.py --compile``'s measurement of one case (benchmarks.compiled),
in this process and with ``aot_eager`` (inductor's C++ code generation takes minutes on 2 cores):
eager, eager on the reference path and compiled steps each timed, graph breaks counted, the row
in the table."""

from __future__ import annotations


def test_a_compile_case_times_the_fast_path_the_reference_path_and_the_compiled_one(monkeypatch):
    from benchmarks.compiled import run_one, table
    from hieradet_mmdet.models import fast_path

    fast_calls = []
    real_fast_forward = fast_path.fast_forward
    monkeypatch.setattr(fast_path, "fast_forward", lambda *a: fast_calls.append(1) or real_fast_forward(*a))
    case = dict(case="backbone-infer", size=[64, 64], device="cpu", threads=1, iters=2, warmup=1,
                count_breaks=True, backend="aot_eager")
    row = run_one(case)
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
