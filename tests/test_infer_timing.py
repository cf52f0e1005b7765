"""bnntrain.infer.timing: runtimes timed in blocks of back-to-back calls, each block after an
idle pause, so that no runtime's spinning threads take cores from another's calls."""
import time

from bnntrain.infer.timing import alternating_blocks, paired_ratio


def test_blocks_follow_an_idle_pause_and_time_each_function_alone():
    calls: list[tuple[str, float, float]] = []

    def timed(name: str, seconds: float):
        def fn():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:  # busy, as a runtime's call is
                pass
            calls.append((name, start, time.perf_counter()))
        return fn

    medians = alternating_blocks({"short": timed("short", 0.002), "long": timed("long", 0.006)}, seconds=0.0,
                                 block_seconds=0.01, idle=0.03, min_rounds=3)
    assert [len(v) for v in medians.values()] == [3, 3]
    assert all(0.002 <= m < 0.005 for m in medians["short"]) and all(0.006 <= m < 0.012 for m in medians["long"])
    assert 1.5 < paired_ratio(medians["short"], medians["long"]) < 4.5
    # After the warm-up (two calls each, back to back): six blocks, each one function's calls
    # back to back (one untimed, at least two timed), each after a pause of at least `idle`.
    after = calls[4:]
    gaps = [b[1] - a[2] for a, b in zip(after, after[1:])]
    assert all(g < 0.01 or g >= 0.03 for g in gaps)
    blocks, block = [], [after[0]]
    for call, gap in zip(after[1:], gaps):
        if gap >= 0.03:
            blocks.append(block)
            block = []
        block.append(call)
    blocks.append(block)
    assert len(blocks) == 6 and all(len(b) >= 3 and len({c[0] for c in b}) == 1 for b in blocks)
    assert calls[4][1] - calls[3][2] >= 0.03  # the first block too
