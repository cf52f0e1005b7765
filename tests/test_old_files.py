"""Files written by an earlier release still load and compute what they computed then.

The fixtures were written by bnntrain 0.1.0 (a ReActNet-18 at 1/16 width, one epoch per stage
on the digits): a stage-2 checkpoint, its packed export, and the logits both gave on a fixed
input. Any change to a layer's parameter names, a quantizer's forward or the packed format
shows up here as a load error or a different logit.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnntrain.tools import export
from bnntrain.engine import load_checkpoint
from bnntrain.models import model_from_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
NAME = "reactnet18_w0.0625_v0.1"
EXPECTED = json.loads((FIXTURES / f"{NAME}.json").read_text())


def fixed_input() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_an_old_checkpoint_rebuilds_the_same_model():
    model = model_from_checkpoint(load_checkpoint(FIXTURES / f"{NAME}.pt")).eval()
    with torch.no_grad():
        logits = model(fixed_input())
    torch.testing.assert_close(logits, torch.tensor(EXPECTED["checkpoint_logits"]), rtol=0, atol=1e-5)


def test_an_old_packed_export_runs_the_same():
    model = export.load(FIXTURES / f"{NAME}.bnn").eval()
    with torch.no_grad():
        logits = model(fixed_input())
    torch.testing.assert_close(logits, torch.tensor(EXPECTED["packed_logits"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tool", ["evaluate", "export", "convert", "summary"])
def test_a_tools_former_command_still_runs_it_with_a_note(tool):
    out = subprocess.run([sys.executable, "-m", f"bnntrain.{tool}", "no_such_argument=1"], capture_output=True, text=True)
    note, *rest = out.stderr.splitlines()
    assert note == f"note: bnntrain.{tool} is now bnntrain.tools.{tool}; the old name goes in the next release"
    assert out.returncode == 2 and len(rest) == 1 and rest[0].startswith("error: ")  # the tool's own usage error
