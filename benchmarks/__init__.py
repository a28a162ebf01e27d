"""The measuring tools and the reference the tests compare with, kept out of the installed package
``hieradet_mmdet`` (which never imports them): one timing and reporting harness for the benchmark
(``tools/benchmark.py``, on the CPU or a GPU) and the ONNX benchmark (``tools/onnx_benchmark.py``),
fault injection (``tools/fault_injection.py``), and birder's numbers.

    timing          the timing loop: CUDA events on a GPU, the host clock on the CPU; warm-up,
                    steps taking turns (paired models, interleaved rounds)
    memory          peak memory of a region (CUDA allocator statistics, or the resident set)
    flops           FLOPs of one step (torch's counter, plus flash attention and fused linears)
    cases           the benchmark's models and steps, running a case or models paired
    parity          its --checks: correctness on the device against birder
    report          tables as text or Markdown, JSON files, comparisons, the machine
    cli             the benchmark's command line (``python -m benchmarks`` from the repository)
    onnx_cases      onnxruntime against eager PyTorch
    coco_results    a generated COCO-val-sized ground truth and result set
    coco_eval       seconds of COCO bbox / segm evaluation, pycocotools against the faster backends
    compiled        torch.compile against eager (--compile)
    resume_cost     what resuming costs, our loop against MMEngine's (--resume-cost)
    fault_injection killing training at random moments, checking that resuming loses nothing
                    (tools/fault_injection.py)
    reference       relative errors, autocast by name, and birder, the reference the tests and the
                    --checks compare with
"""
