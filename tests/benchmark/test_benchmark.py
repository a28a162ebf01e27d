"""tools/benchmark.py (benchmarks) on tiny inputs: the fields it documents, memory
per isolated case, paired runs."""

import json

import pytest

from benchmarks import cli as tool
from benchmarks.cases import case_detector, detection_agreement, detector_batch


def test_benchmark_writes_the_documented_fields(tmp_path):
    out = tmp_path / "bench.json"
    report = tool.main(["--models", "hieradet_small", "birder_small", "--mode", "backbone", "--dtype", "fp32",
                        "bf16", "--sizes", "64x96", "--iters", "1", "--warmup", "0", "--threads", "1",
                        "--no-isolate", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert {"command", "machine", "threads", "load_before", "load_after", "results", "comparisons"} <= set(saved)
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
    assert ours32["parity_vs_birder"]["max_rel"] <= 1e-5
    assert rows["birder_small", "fp32"]["status"] == "ok"
    # The same attention and MLPs (the fused oneDNN linears counted too); birder also runs
    # attn.proj on window padding, we don't.
    assert 0.8 * rows["birder_small", "fp32"]["gflops"] < ours32["gflops"] <= rows["birder_small", "fp32"]["gflops"]
    assert any("small fp32" in line for line in saved["comparisons"])


def test_isolated_case_reports_memory_of_its_own_process():
    case = dict(model="hieradet_d_small", mode="backbone-train", dtype="fp32", size=[64, 64], batch=1,
                with_cp=True, device="cpu", threads=1, iters=1, warmup=0, flops=False, accuracy=False)
    (result,) = tool.run_isolated([case], paired=False, timeout=120)
    assert result["status"] == "ok", result.get("reason")
    assert result["peak_mem_mb"] > result["peak_delta_mb"] > 0
    assert "gflops" not in result


def test_exact_malloc_shows_the_memory_checkpointing_saves(capsys):
    """With every tensor its own mapping the RSS peak follows live tensors: with_cp must save."""
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
    report = tool.main(["--models", "hieradet_small", "hieradet_d_small", "--mode", "backbone", "--sizes", "32x64",
                        "--iters", "2", "--warmup", "0", "--threads", "1", "--no-isolate", "--paired", "--no-flops",
                        "--no-accuracy"])
    rows = report["results"]
    assert [r["model"] for r in rows] == ["hieradet_small", "hieradet_d_small"]
    for r in rows:
        assert r["status"] == "ok" and len(r["times_ms"]) == 2 and r["median_ms"] > 0
        assert r["paired_with"] == ["hieradet_small", "hieradet_d_small"] and "peak_mem_mb" not in r


def test_cli_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        tool.build_parser().parse_args(["--sizes", "800by1344"])


def test_neutral_heads_give_every_backbone_the_same_boxes():
    """The detector cases compare backbones by the work around them: with neutral heads every
    model's RoI ops see the same proposals and the mask head the same detections."""
    import torch

    results = {}
    for name in ("hieradet_small", "swin_t"):
        model = case_detector(name, with_cp=False, heads="neutral").eval()
        inputs, samples = detector_batch(model, 1, (128, 192), False, "cpu")
        with torch.no_grad():
            results[name] = model(inputs, samples, mode="predict")[0].pred_instances
    a, b = results["hieradet_small"], results["swin_t"]
    assert len(a) == len(b) == 100  # max_per_img detections, as with trained weights
    assert torch.equal(a.bboxes, b.bboxes) and torch.equal(a.labels, b.labels)


def test_detector_cases_split_the_time_at_the_backbone():
    report = tool.main(["--models", "hieradet_small", "--mode", "detector-infer", "detector-train", "--sizes",
                        "128x192", "--iters", "1", "--warmup", "0", "--threads", "1", "--no-isolate", "--no-accuracy"])
    for row in report["results"]:
        assert row["status"] == "ok", row.get("reason")
        assert 0 < row["backbone_median_ms"] < row["median_ms"]
        assert row["outside_median_ms"] == pytest.approx(row["median_ms"] - row["backbone_median_ms"])
        assert row["gflop_per_s"] > 0 and 0 < row["of_linear_peak"]


@pytest.mark.parametrize("detector", ["dino", "mask2former"])
def test_query_based_detectors_cost_the_same_outside_the_backbone(detector):
    """DINO and Mask2Former with HieraDet-S and with Swin-T, whose stages have the same channels:
    with neutral heads the rest of the detector does the same work, so the FLOPs counted outside
    the backbone agree, and the backbone's share is what differs."""
    # DINO selects its 900 queries among the encoder's tokens: 1,360 at 256 x 256 (strides 8-64)
    size = "256x256" if detector == "dino" else "128x128"
    common = ["--sizes", size, "--iters", "1", "--warmup", "0", "--threads", "1", "--no-isolate",
              "--no-accuracy"]
    flops = {}
    for mode in ("backbone", "detector-infer"):
        report = tool.main(["--models", "hieradet_small", "swin_t", "--mode", mode, "--detector", detector, *common])
        for row in report["results"]:
            assert row["status"] == "ok", row.get("reason")
            flops[row["model"], mode] = row["gflops"]
    outside = {m: flops[m, "detector-infer"] - flops[m, "backbone"] for m in ("hieradet_small", "swin_t")}
    assert outside["hieradet_small"] > 0
    assert outside["hieradet_small"] == pytest.approx(outside["swin_t"], rel=1e-3), flops


def test_detection_agreement_compares_two_predictions():
    """MMDetection's predict writes into the data samples it is given and returns them; the
    reduced-precision results must be kept before the float32 call, or fp32 is compared with itself."""
    import torch
    from mmengine.structures import InstanceData
    from mmdet.structures import DetDataSample

    samples = [DetDataSample()]

    def predict(shift):
        def run(inputs, given, mode):
            for s in given:  # as MMDetection does
                s.pred_instances = InstanceData(bboxes=torch.tensor([[10.0 + shift, 10.0, 30.0, 30.0]]),
                                                scores=torch.tensor([0.9]), labels=torch.tensor([1]))
            return given
        return run

    prep = dict(inputs=None, samples=samples, model=predict(0.0), step=lambda: predict(2.0)(None, samples, "predict"))
    result = detection_agreement({}, prep)
    assert result["fp32_detections"] == result["matched"] == 1
    assert result["min_box_iou"] == pytest.approx(18 * 20 / (20 * 20))  # the 2 px shift is seen


def test_resume_cost_compares_the_resumable_loop_with_mmengines_replay(tmp_path, capsys):
    """What is counted, not timed: resuming at iteration k, the resumable loop loads only the batch
    it trains next; MMEngine's loop loads the k trained batches again first."""
    out = tmp_path / "resume.json"
    report = tool.main(["--resume-cost", "5", "40", "--out", str(out)])
    rows = {(r["loop"], r["k"]): r for r in report["resume_cost"]}
    for k in (5, 40):
        assert rows["resumable", k]["samples_loaded"] == 2
        assert rows["mmengine", k]["samples_loaded"] == 2 * (k + 1)
        assert rows["resumable", k]["seconds"] > 0 and rows["mmengine", k]["seconds"] > 0
    assert json.loads(out.read_text())["resume_cost"] == json.loads(json.dumps(report["resume_cost"]))
    assert "| 40 |" in capsys.readouterr().out


def test_coco_eval_compares_every_backend_with_pycocotools(tmp_path, capsys):
    """What is reported, not how fast: every backend's 12 stats against pycocotools', in one run."""
    out = tmp_path / "coco_eval.json"
    report = tool.main(["--coco-eval", "20", "--coco-eval-data", str(tmp_path / "data"), "--out", str(out)])
    rows = report["coco_eval"]["rows"]
    assert [(r["iou_type"], r["backend"]) for r in rows] == [
        (t, b) for t in ("bbox", "segm") for b in ("pycocotools", "hotcoco", "faster_coco_eval")]
    for row in rows:
        assert row["seconds"] > 0 and row["max_stat_diff"] <= 1e-4 and len(row["stats"]) == 12
    assert report["coco_eval"]["set"]["images"] == 20
    assert json.loads(out.read_text())["coco_eval"]["rows"][0]["backend"] == "pycocotools"
    assert "| segm | hotcoco |" in capsys.readouterr().out
