"""Deployment: HieraDet backbones, the classifier and whole detectors as ONNX or torch.export
programs with dynamic batch and image size (tools/export.py), and running exported files with
onnxruntime (tools/onnx_infer.py, tools/classify.py --onnx). docs/export.md says how to use them.

    ops            NMS and RoIAlign as the standard ONNX ops NonMaxSuppression and RoiAlign; the
                   NMS settings of a test_cfg
    boxes          priors, box decoding, per-image selection for a whole batch
    single_stage   RetinaNet, FCOS            } MMDetection's test-time maths around its own
    two_stage      Faster / Mask / Cascade    } modules, exportable
    query_based    DINO, Deformable DETR      }
    exporting      writing ONNX / .pt2 files and running them (ExportTarget)
    metadata       the JSON written beside an exported file: written and read here only
    compare        comparing an exported detector's output with MMDetection's
    classifier     the classifier's graph, its export and check
    detector       a config's detector (or its backbone) exported and checked against MMDetection
    config         MMDetection glue: preprocessing, classes, test settings, batches as the
                   config's test pipeline makes them
    runtime        running exported detectors without MMDetection (NumPy, OpenCV) and the
                   exported classifier

The modules that hold the maths import no OpenMMLab code: they use the modules and settings of the
detector they are given (query_based also swaps mmcv's deformable attention kernel for its own
while its graph runs). torchvision provides the eager NMS and RoIAlign kernels. Nothing here
imports hieradet_mmdet.engine (training).
"""
