"""What resuming costs: the time from the start of a resumed run's training loop to its first new
step, at iteration k, for the resumable loop (the data stream starts at k) against MMEngine's
``IterBasedTrainLoop`` (which loads, decodes and augments the k batches already trained on).

The data is synthetic but real work per sample: a PNG decoded with OpenCV, as ``LoadImageFromFile``
does, and a random flip; the model is one linear layer, so the time is the data's. Batches of
``batch_size`` from an ``InfiniteSampler``, in one process (``num_workers=0``; workers would load in
parallel, but every trained batch again all the same).
"""

from __future__ import annotations

import itertools
import time
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

_RUNS = itertools.count()


class DecodedImages(Dataset):
    """``size`` samples, each a PNG decoded from memory and flipped at random. ``loads`` counts the
    samples loaded in this process, by every copy of the dataset (the runner copies its config)."""

    loads = 0

    def __init__(self, size: int = 1000, side: int = 128) -> None:
        import cv2

        rng = np.random.default_rng(0)
        image = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        self.png = np.frombuffer(cv2.imencode(".png", image)[1].tobytes(), np.uint8)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        import cv2

        DecodedImages.loads += 1
        image = cv2.imdecode(self.png, cv2.IMREAD_COLOR)
        if np.random.rand() < 0.5:
            image = image[:, ::-1]
        return dict(inputs=torch.from_numpy(np.ascontiguousarray(image)).float().mean((0, 1)))


class _FirstStep(Exception):
    pass


def resume_to_first_step(loop_type: str, k: int, batch_size: int = 2, work_dir: Optional[str] = None) -> dict:
    """Seconds from the start of the training loop to its first new step when resuming at
    iteration ``k`` (and the samples loaded meanwhile), for ``loop_type`` 'resumable' or 'mmengine'."""
    import tempfile

    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    import hieradet_mmdet.engine  # noqa: F401  (registers the resumable loops)

    dataset = DecodedImages()
    clock: dict = {}

    class Model(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, inputs, data_samples=None, mode="tensor"):
            return {"loss": self.linear(torch.stack(inputs)).square().mean()}

        def train_step(self, data, optim_wrapper):
            clock["first_step"] = time.perf_counter()
            raise _FirstStep

    class AtIterationK(Hook):
        priority = "VERY_HIGH"

        def before_train(self, runner) -> None:
            loop = runner.train_loop
            loop._iter = k
            if loop_type == "resumable":  # the data state a checkpoint written at iteration k holds
                state = {"pass": 0, "batch": k, "consumed": k * batch_size, "held_back": None, "tail": False,
                         "batch_size": batch_size, "seed": 0}
                loop.resume_data([state], 1)
            DecodedImages.loads = 0
            clock["start"] = time.perf_counter()

    types = {"resumable": "ResumableIterBasedTrainLoop", "mmengine": "IterBasedTrainLoop"}
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(
            model=Model(), work_dir=work_dir or tmp, experiment_name=f"resume_cost_{next(_RUNS)}",
            train_dataloader=dict(dataset=dataset, sampler=dict(type="InfiniteSampler", shuffle=True),
                                  batch_size=batch_size, num_workers=0, collate_fn=dict(type="pseudo_collate")),
            train_cfg=dict(type=types[loop_type], max_iters=k + 10),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)), custom_hooks=[AtIterationK()],
            default_hooks=dict(logger=None, checkpoint=None), default_scope="mmdet", randomness=dict(seed=0))
        try:
            runner.train()
        except _FirstStep:
            pass
    return dict(loop=loop_type, k=k, seconds=clock["first_step"] - clock["start"], samples_loaded=DecodedImages.loads)


def measure(ks=(10, 1_000, 100_000), batch_size: int = 2) -> list[dict]:
    for loop_type in ("resumable", "mmengine"):  # imports and first-use costs, not measured
        resume_to_first_step(loop_type, 1, batch_size)
    rows = []
    for k in ks:
        for loop_type in ("resumable", "mmengine"):
            rows.append(resume_to_first_step(loop_type, k, batch_size))
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["k"], r["loop"]): r for r in rows}
    lines = ["| resumed at iteration k | ours: s to the first new step | samples loaded | MMEngine's replay: s | "
             "samples loaded | replay / ours |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k in sorted({r["k"] for r in rows}):
        ours, theirs = by[(k, "resumable")], by[(k, "mmengine")]
        lines.append(f"| {k:,} | {ours['seconds']:.3f} | {ours['samples_loaded']} | {theirs['seconds']:.2f} | "
                     f"{theirs['samples_loaded']:,} | {theirs['seconds'] / ours['seconds']:.1f}x |")
    return "\n".join(lines)
