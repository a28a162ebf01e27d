"""Resumable data (hieradet_mmdet/engine/resumable_data.py) without training: from the state after any
batch, a new batch sampler hands out exactly the batches and seeds the uninterrupted one would have,
without drawing the trained part again; samples load under their own seed."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from mmdet.datasets.samplers import AspectRatioBatchSampler  # noqa: F401  (registers it)
from mmengine.dataset import DefaultSampler, InfiniteSampler
from mmengine.registry import DefaultScope

from hieradet_mmdet import mmengine_adapter as mmengine_api
from hieradet_mmdet.engine import resumable_data as rd


@pytest.fixture(autouse=True)
def _mmdetection_scope():
    """Samplers built as a Runner of an MMDetection config builds them, in MMDetection's scope: a
    scope another test left current ('mmengine') does not know AspectRatioBatchSampler."""
    with DefaultScope.overwrite_default_scope("mmdet"):
        yield


class Images:
    """A dataset of portrait and landscape images (what AspectRatioBatchSampler sorts by)."""

    def __init__(self, n: int = 23) -> None:
        self.shapes = [(40, 60) if i % 3 else (60, 40) for i in range(n)]  # (w, h)

    def __len__(self) -> int:
        return len(self.shapes)

    def get_data_info(self, i):
        return dict(width=self.shapes[i][0], height=self.shapes[i][1])

    def __getitem__(self, i):
        return dict(index=int(i), flip=np.random.rand(), scale=random.random(), noise=torch.rand(1).item())


def make(sampler_kind="default", batch_sampler="aspect", world=1, rank=0, seed=3, n=23):
    dataset = rd.SeededSamples(Images(n))
    if sampler_kind == "default":
        sampler = DefaultSampler(dataset, shuffle=True, seed=seed)
    else:
        sampler = InfiniteSampler(dataset, shuffle=True, seed=seed)
    sampler.world_size, sampler.rank = world, rank
    if sampler_kind == "default":  # what DefaultSampler.__init__ derives from them
        sampler.num_samples = -(-n // world)
        sampler.total_size = sampler.num_samples * world
    else:
        sampler.indices = sampler._indices_of_rank()
    cfg = dict(type="AspectRatioBatchSampler") if batch_sampler == "aspect" else None
    return rd.ResumableBatchSampler(sampler, batch_size=4, batch_sampler=cfg, seed=seed, rank=rank)


def batches(sampler, pass_index=0, limit=None):
    sampler.pass_index = pass_index
    out = []
    for batch in itertools.islice(iter(sampler), limit):
        out.append([(int(i), i.seed) for i in batch])
    return out


@pytest.mark.parametrize("batch_sampler", ["aspect", "plain"])
@pytest.mark.parametrize("world,rank", [(1, 0), (3, 1)])
def test_resuming_after_any_batch_gives_the_rest_of_the_pass(batch_sampler, world, rank):
    whole = batches(make(batch_sampler=batch_sampler, world=world, rank=rank), pass_index=2)
    assert len({i for b in whole for i, _ in b}) > 3
    for k in range(len(whole) + 1):
        first = make(batch_sampler=batch_sampler, world=world, rank=rank)
        first.pass_index = 2
        it = iter(first)
        for _ in range(k + 2):  # handed out ahead of training, as a prefetching DataLoader does
            next(it, None)
        state = first.state(2, k)
        again = make(batch_sampler=batch_sampler, world=world, rank=rank)
        again.resume_at(state)
        assert batches(again, pass_index=2) == whole[k:], k


@pytest.mark.parametrize("batch_sampler", ["aspect", "plain"])
def test_a_resume_at_the_end_of_a_pass_can_be_saved_before_any_new_batch(batch_sampler):
    """A checkpoint written after a pass's last batch, before the epoch ended: the resumed process
    hands out nothing more of that pass, and the epoch's own checkpoint is taken right away."""
    whole = batches(make(batch_sampler=batch_sampler), pass_index=1)
    first = make(batch_sampler=batch_sampler)
    first.pass_index = 1
    list(iter(first))
    state = first.state(1, len(whole))
    for replay in (False, True):
        again = make(batch_sampler=batch_sampler)
        again.resume_at(state, replay=replay)
        assert batches(again, pass_index=1) == []
        assert again.state(1, len(whole)) == state


def test_an_infinite_sampler_is_positioned_without_drawing_the_skipped_indices(monkeypatch):
    """At batch 100,000 of 4 images from 23: only the 17,392 permutations before it are drawn, each in
    one call; none of the 400,000 skipped indices goes through Python."""
    whole = batches(make("infinite", "plain"), limit=40)
    first = make("infinite", "plain")
    first.pass_index = 0
    it = iter(first)
    for _ in range(30):
        next(it)
    again = make("infinite", "plain")
    again.resume_at(first.state(0, 30))
    assert batches(again, limit=10) == whole[30:40]

    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(1) or real(*a, **k))
    sampler = make("infinite", "plain").stream.sampler
    stream = mmengine_api.infinite_sampler_indices(sampler, 400_000)
    next(stream)
    assert len(calls) == 400_000 // 23 + 1


def test_a_tail_of_leftover_buckets_resumes_by_replaying_indices_only():
    """After the sampler's last index AspectRatioBatchSampler hands out its buckets' leftovers from a
    list of its own: that state is reached again by drawing the pass's indices, loading nothing."""
    whole = batches(make())
    first = make()
    first.pass_index = 0
    handed = list(iter(first))
    tail = [k for k in range(1, len(whole) + 1) if first.state(0, k)["tail"]]
    assert tail and tail[-1] == len(whole)
    for k in tail:
        again = make()
        again.resume_at(first.state(0, k))
        assert batches(again) == whole[k:]
    assert len(handed) == len(whole)


def test_every_sample_has_a_seed_of_its_own_and_loads_the_same_wherever_it_loads():
    sampler = make()
    seeds = [s for b in batches(sampler) for _, s in b]
    assert len(set(seeds)) == len(seeds)
    dataset = sampler.stream.sampler.dataset
    index = rd.SeededIndex(5, seeds[0])
    state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = dataset[index]
    assert torch.equal(torch.get_rng_state(), state[0]) and (np.random.get_state()[1] == state[1]).all()
    assert random.getstate() == state[2]  # the caller's random states are left as they were
    np.random.rand(), random.random(), torch.rand(3)  # whatever else happened in between
    assert dataset[index] == first
    assert dataset[rd.SeededIndex(5, seeds[1])] != first
    assert dataset.get_data_info(0) == Images().get_data_info(0)  # the rest is the wrapped dataset's


def test_the_dataloader_leaves_the_models_random_state_alone():
    from torch.utils.data import DataLoader

    cfg = rd.resumable_dataloader_config(dict(dataset=Images(), batch_size=4), seed=0, rank=0)
    sampler = DefaultSampler(cfg["dataset"], shuffle=True, seed=0)
    batch_sampler = rd.ResumableBatchSampler(sampler, 4, seed=0)
    loader = DataLoader(cfg["dataset"], batch_sampler=batch_sampler, generator=cfg["generator"],
                        collate_fn=lambda x: x)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    list(loader)
    assert torch.equal(torch.get_rng_state(), before)
