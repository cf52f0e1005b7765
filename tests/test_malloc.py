"""trainer.malloc: glibc keeps freed memory for the next step, so a step that allocates what
the last one freed touches no new pages; the trainer sets it on the CPU by default."""
import platform
import subprocess
import sys

import pytest
import torch

from bnntrain.engine.setup import configure_malloc
from conftest import TINY, cli_in_process, run_cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A binary conv's training step, as the presets run it: the tensors it allocates are those
# the step before freed, which glibc by default has handed back to the OS.
STEPS = """
import resource
import sys

import torch

from bnntrain.engine.malloc import tune_glibc_malloc
from bnntrain.nn.layers import BinaryConv2d

if sys.argv[1] == "keep":
    assert tune_glibc_malloc()
torch.set_num_threads(1)
conv = BinaryConv2d(32, 32, 3, padding=1, input_quantizer="approx_sign", learnable_threshold=True)
x = torch.randn(8, 32, 56, 56, requires_grad=True)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(8):
    if step == 3:
        start = faults()
    conv(x).sum().backward()
print(faults() - start)
"""


# Blocks above glibc's largest mmap threshold (32 MiB), as a 224 px network's widest
# activations are: each used to get a fresh mapping, and its page faults, every step.
LARGE_BLOCKS = """
import resource
import sys

import torch

from bnntrain.engine.malloc import tune_glibc_malloc

if sys.argv[1] == "keep":
    assert tune_glibc_malloc()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(24):
    # The heap grows for a few steps first, by a block at a time (an aligned block asks a
    # little more than it frees, so a freed block fits the next only once merged with another).
    if step == 8:
        start = faults()
    torch.empty(48 * 2**20 // 4).fill_(1.0)  # 48 MiB, freed at once
print(faults() - start)
"""


def page_faults(setting: str, script: str = STEPS) -> int:
    out = subprocess.run([sys.executable, "-c", script, setting], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    release, keep = page_faults("release"), page_faults("keep")  # five steps each
    assert keep < release / 3, (keep, release)  # measured: 0-1,600 against 16,000-25,000


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_blocks_over_the_largest_mmap_threshold_are_kept_too():
    release, keep = page_faults("release", LARGE_BLOCKS), page_faults("keep", LARGE_BLOCKS)  # 16 blocks each
    assert release > 16 * 12_000, release  # 12,288 pages a block, faulted in anew each time
    assert keep < release / 4, (keep, release)  # measured: 0 (one block's worth once, counting fewer steps)


def test_auto_keeps_memory_on_the_cpu_only():
    assert configure_malloc("release", torch.device("cpu")) is False
    assert configure_malloc("auto", torch.device("cuda", 0)) is False
    assert configure_malloc("auto", torch.device("cpu")) is GLIBC
    assert configure_malloc("keep", torch.device("cuda", 0)) is GLIBC


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_trainer_keeps_memory_on_the_cpu_by_default(tmp_path):
    for setting, said in (("auto", True), ("release", False)):
        out = run_cli([*TINY, "stage=1", "trainer.device=cpu", f"trainer.malloc={setting}", "hydra.verbose=bnntrain"],
                      tmp_path / setting)
        assert out.returncode == 0, out.stderr
        assert ("glibc keeps freed memory" in out.stdout + out.stderr) is said, setting
    bad = cli_in_process([*TINY, "trainer.malloc=always"], tmp_path / "bad")  # refused before the run
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "trainer.malloc" in bad.stderr and "release" in bad.stderr
