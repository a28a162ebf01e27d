"""Deployment: HieraDet backbones, the classifier and whole detectors as ONNX or torch.export
programs with dynamic batch and image size (tools/export.py), and running an exported detector
without MMDetection (tools/onnx_infer.py). docs/export.md says how to use them.

    ops            NMS and RoIAlign as the standard ONNX ops NonMaxSuppression and RoiAlign
    boxes          priors, box decoding, per-image selection for a whole batch
    single_stage   RetinaNet, FCOS            } MMDetection's test-time maths around its own
    two_stage      Faster / Mask / Cascade    } modules, exportable
    detector       which of the two a detector is
    graphs         the classifier's exported computation
    exporting      writing ONNX / .pt2 files and running them
    checks         comparing an exported detector's output with MMDetection's
    runtime        pre- and post-processing without MMDetection (NumPy, OpenCV)
    config         MMDetection glue: detector from config + checkpoint, preprocessing, classes

The modules that hold the maths import no OpenMMLab code: they use the modules and settings of the
detector they are given. torchvision provides the eager NMS and RoIAlign kernels.
"""
