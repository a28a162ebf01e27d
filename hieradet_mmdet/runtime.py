"""What ``tools/train.py`` and ``tools/test.py`` need around MMEngine's ``Runner``.

* :func:`enforce_safe_loading` / :func:`check_checkpoint`: every ``torch.load`` in the process
  runs with ``weights_only=True`` (only the types :mod:`hieradet_mmdet.safe_load` allows on top of
  torch's own), and a checkpoint that would need anything else is refused up front with
  :class:`UnsafeCheckpointError` naming the file, instead of a stack trace from deep inside the
  runner.
* :func:`init_distributed` / :func:`prepare_config` / :func:`finish_distributed`: data-parallel
  runs on machines without a GPU. MMEngine's ``init_dist`` always calls ``torch.cuda.set_device``
  and uses NCCL, and its default DDP wrapper passes ``device_ids=[LOCAL_RANK]``; both fail on
  CPU. Without CUDA we set up a gloo process group ourselves (``Runner.setup_env`` skips
  ``init_dist`` once a group exists) and wrap the model in DDP with ``device_ids=None``. With
  CUDA nothing changes.
* ``CheckedLoadImageFromFile``: mmcv's ``LoadImageFromFile`` with errors that name the image
  file when it is missing, truncated or not an image (mmcv's decoder gives ``None`` or a
  cryptic OpenCV error, or silently decodes half a JPEG).
  :func:`prepare_config` swaps it in for every ``LoadImageFromFile`` in the config.
"""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
from typing import Any, Optional

import torch
import torch.distributed as dist

from .safe_load import register_safe_globals

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


# ---- safe checkpoint loading ----------------------------------------------------------------

class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs Python objects outside the weights-only allowlist; it was not loaded."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file is missing, truncated or not a PyTorch checkpoint."""


def allow_mmengine_checkpoints() -> None:
    """Allow what MMEngine's own checkpoints hold (:func:`hieradet_mmdet.safe_load.register_safe_globals`).

    A checkpoint's ``HistoryBuffer`` objects pickle their statistics methods, which the
    allowlist accepts if they are in ``HistoryBuffer._statistics_methods``; MMEngine fills that
    class-level table only when the first buffer is created, so in a fresh process (``test.py``
    or ``--resume`` reading a checkpoint before any logging) it is empty and our own
    checkpoints would be refused. Creating one buffer registers exactly the four built-in
    statistics (min, max, current, mean).
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    HistoryBuffer()
    register_safe_globals()


def enforce_safe_loading() -> None:
    """Make every ``torch.load`` in this process weights-only, whatever its caller passes.

    torch honours ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` even over an explicit ``weights_only=False``;
    an inherited ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is dropped (torch refuses both at once).
    """
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    allow_mmengine_checkpoints()


def check_checkpoint(path: str) -> None:
    """Unpickle ``path`` with ``weights_only=True`` (tensors memory-mapped, so it is cheap).

    Raises :class:`UnsafeCheckpointError` if the file needs anything the allowlist does not
    cover (e.g. a pickle whose ``__reduce__`` runs a command) and :class:`CheckpointReadError`
    if it is missing or unreadable. URLs and other non-local paths are left to the loader,
    which runs under :func:`enforce_safe_loading` too.
    """
    if "://" in path:
        return
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"checkpoint {path} does not exist")
    allow_mmengine_checkpoints()
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("\n")
        reason = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line),
                      detail[0].strip())
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {path}: it contains Python objects that torch's safe "
            f"(weights_only) loader does not allow, and unpickling them could run arbitrary code. "
            f"Only tensors, plain containers, numpy arrays and mmengine's log buffers are accepted. "
            f"({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointReadError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''} "
                                  "(truncated download or not a PyTorch file?)") from None


# ---- distributed setup ----------------------------------------------------------------------

def _scheduler_env(launcher: str) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR for slurm) from the launcher's variables."""
    env = os.environ
    if launcher == "slurm":
        out = dict(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
        if "MASTER_ADDR" not in env:
            nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
            out["MASTER_ADDR"] = nodes[0]
        return out
    if launcher == "mpi":
        return dict(RANK=env["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=env["OMPI_COMM_WORLD_SIZE"],
                    LOCAL_RANK=env["OMPI_COMM_WORLD_LOCAL_RANK"])
    return {}  # torchrun sets them itself


def init_distributed(launcher: str, timeout_s: int = 1800) -> None:
    """Create the CPU (gloo) process group for ``launcher`` when there is no GPU.

    With a GPU this does nothing and MMEngine's ``init_dist`` (NCCL) runs as usual inside the
    runner. Without one, the group is created here from the launcher's environment
    (``torchrun``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so MMEngine finds it already
    initialised and never reaches its ``torch.cuda.set_device`` call.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "none" or torch.cuda.is_available() or dist.is_initialized():
        return
    for key, value in _scheduler_env(launcher).items():
        os.environ.setdefault(key, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--launcher {launcher} needs {', '.join(missing)} in the environment; start the "
                           "processes with tools/dist_train.sh / tools/dist_test.sh (torchrun), srun or mpirun")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])  # MMEngine reads it
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))


def finish_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, the gloo group's threads can still be joinable when its
    destructor runs, and the process aborts ("terminate called without an active exception")
    after its work is done: about one 2-process CPU run in five failed that way.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _replace_image_loader(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") in ("LoadImageFromFile", "mmdet.LoadImageFromFile", "mmcv.LoadImageFromFile"):
            node["type"] = "CheckedLoadImageFromFile"
        for value in node.values():
            _replace_image_loader(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _replace_image_loader(value)


def prepare_config(cfg, launcher: str = "none"):
    """Adapt a loaded MMDetection config to this machine; returns ``cfg`` (changed in place).

    * ``cfg.launcher = launcher``;
    * distributed without CUDA: DDP with ``device_ids=None`` (keeps a configured
      ``model_wrapper_cfg`` and only replaces its devices), gloo in ``env_cfg.dist_cfg``;
    * image loading through ``CheckedLoadImageFromFile`` in every pipeline.
    """
    cfg.launcher = launcher
    if launcher != "none" and not torch.cuda.is_available():
        wrapper = cfg.get("model_wrapper_cfg") or dict(
            type="MMDistributedDataParallel", broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False))
        wrapper["device_ids"] = None
        wrapper.pop("output_device", None)
        cfg.model_wrapper_cfg = wrapper
        env_cfg = cfg.get("env_cfg") or {}
        env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
        cfg.env_cfg = env_cfg
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(key) is not None:
            _replace_image_loader(cfg[key])
    return cfg


def small_run_overrides(max_iters: int, batch_size: int = 2, lr: float = 1e-4, warmup_iters: int = 50,
                        log_interval: int = 10, num_workers: int = 0, num_classes: Optional[int] = None,
                        rcnn_samples: int = 128, max_dets: int = 50, proposals: int = 300,
                        with_mask: bool = True) -> dict:
    """``cfg.merge_from_dict`` entries for short CPU runs of a two-stage MMDetection config.

    Iteration-based schedule of ``max_iters`` (linear warmup, then cosine to 1% of ``lr``), the
    config's optimizer at a fixed ``lr`` (``auto_scale_lr`` off), one checkpoint at the end, a
    log line every ``log_interval`` iterations, no validation during training, and fewer
    proposals / sampled RoIs / kept detections than COCO's defaults so a step is cheap.
    Keys that a config does not have (e.g. RoI settings for RetinaNet) are still set, so use
    it with Faster R-CNN (``with_mask=False``) or Mask R-CNN style configs.
    """
    warmup_iters = max(1, min(warmup_iters, max_iters // 2))
    loader = dict(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)
    over = {
        "train_cfg": dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1),
        "param_scheduler": [
            dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
            dict(type="CosineAnnealingLR", by_epoch=False, begin=warmup_iters, end=max(max_iters, warmup_iters + 1),
                 T_max=max(1, max_iters - warmup_iters), eta_min=lr * 0.01),
        ],
        "optim_wrapper.optimizer.lr": lr,
        "auto_scale_lr.enable": False,
        "train_dataloader": dict(loader, sampler=dict(type="DefaultSampler", shuffle=True)),
        "val_dataloader": dict(batch_size=1, num_workers=num_workers, persistent_workers=num_workers > 0),
        "test_dataloader": dict(batch_size=1, num_workers=num_workers, persistent_workers=num_workers > 0),
        "default_hooks.logger.interval": log_interval,
        "default_hooks.checkpoint": dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=2),
        "log_processor": dict(type="LogProcessor", window_size=log_interval, by_epoch=False),
        "model.train_cfg.rpn_proposal.nms_pre": 4 * proposals,
        "model.train_cfg.rpn_proposal.max_per_img": proposals,
        "model.train_cfg.rcnn.sampler.num": rcnn_samples,
        "model.test_cfg.rpn.nms_pre": 4 * proposals,
        "model.test_cfg.rpn.max_per_img": proposals,
        "model.test_cfg.rcnn.max_per_img": max_dets,
    }
    if num_classes is not None:
        over["model.roi_head.bbox_head.num_classes"] = num_classes
        if with_mask:
            over["model.roi_head.mask_head.num_classes"] = num_classes
    return over


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a (MM)DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else model


def check_built_detector(model: torch.nn.Module) -> None:
    """Run :func:`hieradet_mmdet.validate.check_detector` on a built (possibly wrapped) model."""
    try:
        from .validate import check_detector
    except ImportError:
        return
    check_detector(unwrap(model))


def _contiguous_features(module, args):
    feats, *rest = args
    return (feats.contiguous(), *rest) if isinstance(feats, torch.Tensor) and not feats.is_contiguous() else None


def guard_roi_ops(model: torch.nn.Module) -> int:
    """Give mmcv's RoI ops contiguous NCHW feature maps; returns how many ops were guarded.

    mmcv's RoIAlign / RoIPool kernels index the feature map as contiguous NCHW memory and
    silently return wrong features for any other layout: with channels-last FPN maps every RoI
    feature of a Faster/Mask R-CNN is scrambled (measured: a linear probe on RoIAlign features
    at ground-truth boxes is at chance level, 33% for 3 classes, while the same FPN maps
    mean-pooled in the box give 100%). ``HieraDetBackbone`` already returns contiguous maps;
    this covers any other source of channels-last maps in the tools (e.g. a model converted
    with ``memory_format=torch.channels_last``). A forward pre-hook copies such maps to
    contiguous memory right before each RoI op; contiguous inputs pass untouched.
    """
    try:
        from mmcv.ops import RoIAlign, RoIPool
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, (RoIAlign, RoIPool)) and not getattr(module, "_hieradet_contiguous_guard", False):
            module.register_forward_pre_hook(_contiguous_features)
            module._hieradet_contiguous_guard = True
            count += 1
    return count


def build_runner(cfg):
    """The runner the config asks for (``runner_type``) or MMEngine's ``Runner``, model checked
    and its RoI ops guarded (:func:`guard_roi_ops`)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    check_built_detector(runner.model)
    guard_roi_ops(runner.model)
    return runner


# ---- image loading that names the file ------------------------------------------------------

def _looks_truncated(data: bytes) -> Optional[str]:
    """End-of-file checks for JPEG and PNG (OpenCV decodes a cut-off file without complaint,
    filling the rest grey); None if the file looks complete.

    Only when the end marker is not near the end (trailing data after it is legal) is the
    file fully decoded by Pillow, which tells a truncated file from one with a long trailer."""
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-1024:]:
        kind = "JPEG without its end-of-image marker (truncated)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        kind = "PNG without its IEND chunk (truncated)"
    else:
        return None
    try:
        import io

        from PIL import Image, ImageFile

        if ImageFile.LOAD_TRUNCATED_IMAGES:
            return kind
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except ImportError:
        return kind
    except Exception:  # noqa: BLE001 - any decoder complaint confirms it
        return kind
    return None


try:
    import mmcv
    from mmcv.transforms import LoadImageFromFile as _LoadImageFromFile
    from mmengine import fileio
    from mmdet.registry import TRANSFORMS
except ImportError:  # mmcv / mmdet not installed: the pure-PyTorch parts stay importable
    _LoadImageFromFile = None

if _LoadImageFromFile is not None:

    @TRANSFORMS.register_module()
    class CheckedLoadImageFromFile(_LoadImageFromFile):
        """``LoadImageFromFile`` whose errors name the file (missing, truncated, undecodable)."""

        def transform(self, results: dict) -> Optional[dict]:
            filename = results["img_path"]
            try:
                data = fileio.get(filename, backend_args=self.backend_args)
            except FileNotFoundError:
                if self.ignore_empty:
                    return None
                raise FileNotFoundError(f"image file {filename} does not exist") from None
            problem = "empty file" if not data else _looks_truncated(data)
            img = None
            if problem is None:
                try:
                    img = mmcv.imfrombytes(data, flag=self.color_type, backend=self.imdecode_backend)
                except Exception as err:  # noqa: BLE001 - decoders raise anything; we add the file name
                    problem = f"{type(err).__name__}: {err}"
                if img is None and problem is None:
                    problem = "not a decodable image"
            if problem is not None:
                if self.ignore_empty:
                    return None
                raise ValueError(f"cannot read image {filename} ({len(data)} bytes): {problem}")
            if self.to_float32:
                img = img.astype("float32")
            results["img"] = img
            results["img_shape"] = img.shape[:2]
            results["ori_shape"] = img.shape[:2]
            return results
