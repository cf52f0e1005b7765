"""Timing runtimes against each other on equal terms.

PyTorch's OpenMP threads and OpenVINO's keep spinning for a while after a call returns,
waiting for the next one; `bnntrain.infer`'s numba kernels run on PyTorch's threads (numba's
OpenMP layer binds to PyTorch's libgomp, with PyTorch imported first). Timed call by call,
one runtime after another, the runtime that ran last takes cores from the next one's call,
while a call of the runtime that ran last finds its threads awake: on 2 cores that made
OpenVINO's times at batch 1 up to a third longer. `alternating_blocks` times each runtime in
its own steady state, as a process serving with it alone would see it, and still lets drift
hit all alike.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable


def alternating_blocks(fns: dict[str, Callable[[], object]], seconds: float, block_seconds: float = 0.1,
                       idle: float = 0.05, min_rounds: int = 5, max_rounds: int = 400) -> dict[str, list[float]]:
    """Seconds per call of each function, one median per block of back-to-back calls.

    Each round runs every function in a block of its own, in an order drawn anew each round,
    after `idle` seconds with nothing running: the block's first call untimed (its threads
    wake), then calls for about `block_seconds` (at least two). Rounds go on until `seconds`
    have passed, at least `min_rounds` and at most `max_rounds` of them.

    Args:
        fns: {name: a function to time}.
        seconds: the time budget for the rounds.
        block_seconds: the timed part of a block, about.
        idle: the pause before each block.
        min_rounds: rounds at least, whatever the budget.
        max_rounds: rounds at most.

    Returns:
        {name: the median seconds per call of each round's block}, the rounds in order.
    """
    calls = {}
    for name, fn in fns.items():  # warm-up, and how many calls fill a block
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(2, round(block_seconds / max(time.perf_counter() - start, 1e-6)))
    medians: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    begin = time.perf_counter()
    for rounds in range(1, max_rounds + 1):
        for name in order.sample(list(fns), len(fns)):
            time.sleep(idle)
            fns[name]()
            times = []
            for _ in range(calls[name]):
                start = time.perf_counter()
                fns[name]()
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
        if rounds >= min_rounds and time.perf_counter() - begin > seconds:
            break
    return medians


def paired_ratio(base: list[float], ours: list[float]) -> float:
    """The median over rounds of ours / base: a round's two timings share the machine's state.

    Args:
        base: the baseline's seconds per round.
        ours: the candidate's seconds per round, the same rounds.

    Returns:
        The median of the rounds' ours / base (below 1: the candidate takes less time).
    """
    return statistics.median(o / b for o, b in zip(ours, base))
