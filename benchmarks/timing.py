"""The timing loop every benchmark here uses: CUDA events around each step on a GPU, the host
clock on the CPU; warm-up; several steps (models) taking turns, so that load changing over time
hits them alike."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import torch

from .reference import sync


def time_steps(step: Callable[[], Any], n: int, device: str,
               after_each: Optional[Callable[[], Any]] = None) -> list[float]:
    """Milliseconds of each of ``n`` calls of ``step``. On a GPU CUDA events around each (the calls
    queue without waiting for one another, unless ``after_each`` is given), else the host clock
    around the call and a synchronisation. ``after_each`` runs after each timed call has finished,
    untimed (e.g. to read a BackboneClock)."""
    if torch.device(device).type == "cuda":
        events = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
            if after_each is not None:
                end.synchronize()
                after_each()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if after_each is not None:
            after_each()
    return times


def warm_up(step: Callable[[], Any], n: int, device: str) -> None:
    """``n`` untimed calls, then wait for them to finish."""
    for _ in range(n):
        step()
    sync(device)


def interleaved(steps: Mapping[str, Callable[[], Any]], iters: int, device: str, rounds: int = 1,
                after_each: Optional[Callable[[str], Any]] = None) -> dict[str, list[list[float]]]:
    """Milliseconds of ``rounds`` rounds in which every step, one after the other, makes ``iters``
    timed calls: name -> one list per round. ``iters=1`` with many rounds makes them take turns
    call by call (A B C A B C ...). ``after_each(name)`` runs after each call, untimed."""
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            each = (lambda name=name: after_each(name)) if after_each is not None else None
            times[name].append(time_steps(step, iters, device, each))
    return times
