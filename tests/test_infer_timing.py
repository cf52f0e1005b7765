"""bnntrain.infer.timing: runtimes timed in blocks of back-to-back calls, each block after an
idle pause, so that no runtime's spinning threads take cores from another's calls. The checks
hold on a loaded machine: the order of the calls and the pauses' lower bound (a sleep never
ends early), not the lengths of busy calls."""
import time

from bnntrain.infer.cli import bench_line
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

    # block_seconds far below a call: every block is one untimed call and two timed ones.
    medians = alternating_blocks({"short": timed("short", 0.001), "long": timed("long", 0.01)}, seconds=0.0,
                                 block_seconds=1e-9, idle=0.03, min_rounds=3)
    assert [len(v) for v in medians.values()] == [3, 3]
    assert all(m >= 0.001 for m in medians["short"]) and all(m >= 0.01 for m in medians["long"])
    assert paired_ratio(medians["short"], medians["long"]) > 1
    # After the warm-up (two calls each, back to back): six blocks of three calls of one
    # function, each block after a pause of at least `idle`.
    assert [name for name, _, _ in calls[:4]] == ["short", "short", "long", "long"]
    blocks = [calls[i:i + 3] for i in range(4, len(calls), 3)]
    assert len(blocks) == 6 and all(len({name for name, _, _ in b}) == 1 for b in blocks)
    assert sorted(b[0][0] for b in blocks) == ["long"] * 3 + ["short"] * 3
    ends = [calls[3]] + [b[-1] for b in blocks[:-1]]
    assert all(b[0][1] - end[2] >= 0.03 for b, end in zip(blocks, ends))


def test_paired_ratio_is_ours_over_the_baseline_per_round():
    assert paired_ratio([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]) == 1.0  # ratios 2, 1, 0.5: the median
    assert paired_ratio([1.0, 1.0, 1.0], [3.0, 3.0, 9.0]) == 3.0


def test_the_bench_line_gives_the_speed_up_and_the_time_against_openvino():
    times = {"packed": [0.001, 0.001, 0.002], "float": [0.004, 0.004, 0.008], "openvino": [0.002, 0.002, 0.004]}
    line = bench_line(16, times, binary=16)
    assert line.startswith("batch  16:     1.00 ms (XNOR-popcount),     4.00 ms (PyTorch float convs), 4.00x; ")
    assert "OpenVINO 2.00 ms (16 BinaryConvolution): 0.50x its time; medians of 3 blocks" in line
    assert "OpenVINO" not in bench_line(1, {k: v for k, v in times.items() if k != "openvino"})
