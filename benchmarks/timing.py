"""Wall-clock timing of forward and backward passes: warm-up, repetitions, median and spread."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How often to repeat: at least ``min_repeats``, at most ``max_repeats``, stopping early once ``seconds`` are spent."""

    warmup: int
    min_repeats: int
    max_repeats: int
    seconds: float


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the repetitions."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    repeats: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        q25, _, q75 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
        return cls(statistics.median(samples), q25, q75, min(samples), max(samples), len(samples))


class Clock:
    """Time stamps: perf_counter on the CPU, CUDA events on a GPU (read after one synchronize)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, stamps: list) -> list[float]:
        """Durations between consecutive stamps."""
        if not self.cuda:
            return [b - a for a, b in zip(stamps, stamps[1:])]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(stamps, stamps[1:])]


def repeat(phases: Callable[[Clock], list[float]], clock: Clock, budget: Budget) -> list[list[float]]:
    """Run ``phases`` (one call returning the duration of each phase) under ``budget``; samples per phase."""
    for _ in range(budget.warmup):
        phases(clock)
    samples: list[list[float]] = []
    start = time.perf_counter()
    while len(samples) < budget.max_repeats:
        samples.append(phases(clock))
        if len(samples) >= budget.min_repeats and time.perf_counter() - start > budget.seconds:
            break
    return [list(column) for column in zip(*samples)]


def forward_phase(fn: Callable[[], torch.Tensor]) -> Callable[[Clock], list[float]]:
    """One timed forward call without autograd: its wall seconds, then the process's CPU seconds
    over it (every thread of the process, those spinning between parallel regions included)."""

    def phases(clock: Clock) -> list[float]:
        with torch.no_grad():
            cpu = time.process_time()
            stamps = [clock.stamp()]
            fn()
            stamps.append(clock.stamp())
            cpu = time.process_time() - cpu
        return [*clock.seconds(stamps), cpu]

    return phases


def forward_backward_phases(
    fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], weights: torch.Tensor
) -> Callable[[Clock], list[float]]:
    """A timed forward call with autograd, then a timed backward of the loss ⟨weights, output⟩:
    the wall seconds of each, then the process's CPU seconds over both (as ``forward_phase``)."""

    def phases(clock: Clock) -> list[float]:
        for leaf in leaves:
            leaf.grad = None
        cpu = time.process_time()
        stamps = [clock.stamp()]
        out = fn()
        stamps.append(clock.stamp())
        (out * weights).sum().backward()
        stamps.append(clock.stamp())
        cpu = time.process_time() - cpu
        return [*clock.seconds(stamps), cpu]

    return phases
