"""Training data that can be resumed at any batch, at once and exactly.

Three pieces, put around a dataloader's own dataset, sampler and batch sampler by the resumable
training loops (:mod:`.loops`):

* :class:`ResumableBatchSampler` wraps the configured batch sampler (MMDetection's
  ``AspectRatioBatchSampler``, or the plain batching of ``batch_size``). It numbers the passes and
  batches it hands out and remembers, for the last batches, where the sampler's index stream stood
  after each and what the batch sampler held back (the aspect-ratio buckets). A checkpoint stores
  that state for the last batch trained; resuming starts the index stream right there
  (:func:`index_stream`: ``DefaultSampler`` recomputes its epoch's order, ``InfiniteSampler`` draws
  only the permutations before the position) instead of loading every trained batch again.
* Every index it hands out is a :class:`SeededIndex`: the batch's sample index plus a seed made of
  the run's seed, the process rank, the pass, the batch and the place in the batch.
* :class:`SeededSamples` wraps the dataset: each sample's pipeline (random flips, crops, scales)
  runs with Python's, NumPy's and torch's random state seeded from its SeededIndex, and those states
  are put back afterwards. A sample is therefore augmented the same way whichever worker process
  loads it and whatever was loaded before it: after a resume, with any ``num_workers`` and
  persistent workers or not, the remaining batches are the uninterrupted run's, and loading data in
  the main process (``num_workers=0``) leaves the model's random state alone.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
from mmengine.logging import print_log
from torch.utils.data import BatchSampler, Dataset, Sampler

from .. import mmengine_adapter as mmengine_api
from ..torch_compat import SeededGenerator

REMEMBERED_BATCHES = 512  # states kept for batches handed out ahead of training (prefetching)


class SeededIndex(int):
    """A sample index that carries the seed its sample is loaded with."""

    def __new__(cls, index: int, seed: int) -> "SeededIndex":
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self):  # to worker processes and back
        return SeededIndex, (int(self), self.seed)


def sample_seed(run_seed: int, rank: int, pass_index: int, batch: int, slot: int) -> int:
    """A 32-bit seed of its own for every sample the run loads."""
    return int(np.random.SeedSequence([run_seed & 0xFFFFFFFF, rank, pass_index, batch, slot]).generate_state(1)[0])


@contextmanager
def preserved_randomness():
    """Python's, NumPy's and torch's (CPU and CUDA) global random states as they were before, after
    the block: what runs inside takes nothing from the training's random streams."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def seeded_randomness(seed: int):
    """Python's, NumPy's and torch's global random state seeded with ``seed``, restored afterwards."""
    with preserved_randomness():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield


class SeededSamples(Dataset):
    """A dataset whose samples load under their own seed (module docstring); everything else is the
    wrapped dataset's (``metainfo``, ``get_data_info``, ...)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, SeededIndex):
            with seeded_randomness(index.seed):
                return self.dataset[int(index)]
        return self.dataset[index]

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def real_sampler(dataloader) -> Optional[Sampler]:
    """The sampler a dataloader's indices come from (through ResumableBatchSampler and batch samplers)."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    if isinstance(batch_sampler, ResumableBatchSampler):
        return batch_sampler.stream.sampler
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else None
    return sampler if sampler is not None else getattr(dataloader, "sampler", None)


# ---- index streams that start anywhere -----------------------------------------------------------

def index_stream(sampler, start: int) -> Iterator[int]:
    """The indices ``iter(sampler)`` gives from its ``start``-th one on, without going through the
    ones before where the sampler's order can be computed directly: a ``DefaultSampler``'s epoch is
    one list; an ``InfiniteSampler`` needs only the permutations before ``start`` drawn. Any other
    sampler is iterated up to ``start`` (indices only: no data is loaded)."""
    if start == 0:
        return iter(sampler)
    if mmengine_api.is_infinite_sampler(sampler):
        return mmengine_api.infinite_sampler_indices(sampler, start)
    if mmengine_api.is_default_sampler(sampler):
        return iter(list(sampler)[start:])
    return itertools.islice(iter(sampler), start, None)


class _CountingStream(Sampler):
    """The batch sampler's view of the real sampler: the same indices (from a resume position when
    one is set), counted. Attributes other than iteration are the real sampler's (``dataset``,
    ``set_epoch``, ``seed``, ...)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.consumed = 0
        self._start = 0

    def start_at(self, position: int) -> None:
        self._start = position

    def __iter__(self):
        start, self._start = self._start, 0
        self.consumed = start
        for index in index_stream(self.sampler, start):
            self.consumed += 1
            yield index

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name):
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


class ResumableBatchSampler(BatchSampler):
    """The configured batch sampler (``batch_sampler``: a config or None for plain batches of
    ``batch_size``), numbered, seeded and resumable (module docstring)."""

    def __init__(self, sampler, batch_size: int, batch_sampler: Optional[dict] = None, drop_last: bool = False,
                 seed: int = 0, rank: int = 0) -> None:
        from mmdet.registry import DATA_SAMPLERS

        self.stream = self.sampler = _CountingStream(sampler)  # .sampler: where MMEngine sets the epoch
        if batch_sampler is None:
            self.inner = BatchSampler(self.stream, batch_size, drop_last)
        else:
            self.inner = DATA_SAMPLERS.build(batch_sampler, default_args=dict(sampler=self.stream,
                                                                              batch_size=batch_size))
        self.batch_size, self.drop_last = batch_size, drop_last
        self.seed, self.rank = int(seed), int(rank)
        self.pass_index = 0          # of the pass the next __iter__ hands out (the loops set it)
        self._resume: Optional[dict] = None
        self._states: OrderedDict[tuple[int, int], dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def kind(self) -> str:
        return type(self.inner).__name__

    def __iter__(self):
        pass_index, first = self.pass_index, 0
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["pass"] == pass_index:
            first = resume["batch"]
            if self._restorable() and not resume.get("replay") and not resume.get("tail"):
                self.stream.start_at(resume["consumed"])
                mmengine_api.set_held_back(self.inner, resume.get("held_back"))
                if first > 0:  # a checkpoint before the next batch (a resume at a pass's end) stands here
                    self._states[(pass_index, first - 1)] = {k: resume[k] for k in ("consumed", "tail", "held_back")}
            else:  # state not restorable: replay the batch sampler's indices (no data is loaded)
                skip = first
                if not resume.get("tail"):
                    print_log(f"resuming the {self.kind} at batch {first} of its pass by drawing the indices of "
                              "the batches before it (no data is loaded)", logger="current", level=30)
        batches = iter(self.inner)
        for number in range(skip):
            skipped = next(batches)
            if number == skip - 1:
                self._remember(pass_index, number, skipped)
        for number, batch in enumerate(batches, first):
            self._remember(pass_index, number, batch)
            yield [SeededIndex(i, sample_seed(self.seed, self.rank, pass_index, number, slot))
                   for slot, i in enumerate(batch)]

    def _restorable(self) -> bool:
        return type(self.inner) is BatchSampler or mmengine_api.held_back(self.inner) is not None

    def _remember(self, pass_index: int, number: int, batch: list) -> None:
        """Where the index stream stands, and what the batch sampler holds back, after this batch."""
        # After the sampler's last index, AspectRatioBatchSampler hands out what its buckets held from
        # a list of its own: such a "tail" position is resumed by replaying the pass's indices.
        tail = not mmengine_api.is_infinite_sampler(self.stream.sampler) and self.stream.consumed >= len(self.stream)
        self._states[(pass_index, number)] = dict(consumed=self.stream.consumed, tail=tail,
                                                  held_back=mmengine_api.held_back(self.inner, batch))
        while len(self._states) > REMEMBERED_BATCHES:
            self._states.popitem(last=False)

    # -- the state a checkpoint keeps --

    def state(self, pass_index: int, trained: int) -> dict:
        """The position right after ``trained`` batches of pass ``pass_index`` (0: its start)."""
        out = {"pass": pass_index, "batch": trained, "consumed": 0, "held_back": None, "tail": False, "kind": self.kind,
               "batch_size": self.batch_size, "sampler": type(self.stream.sampler).__name__, "seed": self.seed}
        if trained > 0:
            remembered = self._states.get((pass_index, trained - 1))
            if remembered is None:
                raise RuntimeError(f"no record of batch {trained - 1} of pass {pass_index}: it was handed out more "
                                   f"than {REMEMBERED_BATCHES} batches ago")
            out.update(remembered)
        return out

    def resume_at(self, state: dict, replay: bool = False) -> None:
        """Start the next pass where ``state`` (from :meth:`state`) stood; ``replay``: get there by
        drawing the pass's indices up to it (a state of another data layout)."""
        self._resume = dict(state, replay=replay)
        self.pass_index = state["pass"]


def resumable_dataloader_config(dataloader_cfg: dict, seed: Optional[int], rank: int) -> dict:
    """A train dataloader config whose dataset, batch sampler and DataLoader random generator are
    the resumable ones (module docstring), from the config MMDetection's dataloaders use."""
    from mmdet.registry import DATASETS

    cfg = copy.copy(dataloader_cfg)
    dataset = cfg["dataset"]
    if isinstance(dataset, dict):
        dataset = DATASETS.build(dataset)
        if hasattr(dataset, "full_init"):
            dataset.full_init()
    cfg["dataset"] = dataset if isinstance(dataset, SeededSamples) else SeededSamples(dataset)
    batch_sampler = cfg.pop("batch_sampler", None)
    if not (isinstance(batch_sampler, dict) and batch_sampler.get("type") is ResumableBatchSampler):
        cfg["batch_sampler"] = dict(type=ResumableBatchSampler, batch_sampler=batch_sampler,
                                    drop_last=bool(cfg.pop("drop_last", False)), seed=seed or 0, rank=rank)
    else:
        cfg["batch_sampler"] = batch_sampler
    # The DataLoader draws its workers' base seed from here, not from torch's global generator, which
    # is the model's alone (samples are seeded one by one above).
    cfg["generator"] = SeededGenerator(seed or 0)
    return cfg
