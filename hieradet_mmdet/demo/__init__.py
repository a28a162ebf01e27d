"""What shows the project at work on generated data, on a CPU: the demo (``make demo``) and the
tools and tests built on the same pieces. Needs MMDetection (and pycocotools, OpenCV).

    synthetic_coco   a deterministic COCO-format dataset of coloured shapes
    synthetic_panoptic  the same shapes as COCO-panoptic things, with wall and floor as stuff
    small_run        config entries for short CPU training runs, their COCO metrics
    features         PCA pictures of a backbone's feature maps
    run              the demo: dataset, training, evaluation before and after, pictures
"""
