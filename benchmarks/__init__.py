"""One timing and reporting harness for every measurement here: the benchmark
(``tools/benchmark.py``, on the CPU or a GPU) and the ONNX benchmark (``tools/onnx_benchmark.py``).

    timing          the timing loop: CUDA events on a GPU, the host clock on the CPU; warm-up,
                    steps taking turns (paired models, interleaved rounds)
    memory          peak memory of a region (CUDA allocator statistics, or the resident set)
    flops           FLOPs of one step (torch's counter, plus flash attention and fused linears)
    cases           the benchmark's models and steps, running a case or models paired
    parity          its --checks: correctness on the device against birder
    report          tables as text or Markdown, JSON files, comparisons, the machine
    cli             the benchmark's command line (``python -m hieradet_mmdet.benchmark``)
    onnx_cases      onnxruntime against eager PyTorch
    coco_results    a generated COCO-val-sized ground truth and result set
    coco_eval       seconds of COCO bbox / segm evaluation, pycocotools against the faster backends

The numbers compared (relative errors, birder's reference pair): :mod:`hieradet_mmdet.reference`.
Nothing here is imported by ``import hieradet_mmdet``.
"""
