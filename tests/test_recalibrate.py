"""Re-estimating BatchNorm statistics: it restores what stale statistics cost, touches no
weight and no random stream (resume stays exact), and ranks agree on the result."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from bnntrain.data import build_loaders
from bnntrain.engine import save_checkpoint
from bnntrain.engine.recalibrate import recalibrate_batchnorm
from bnntrain.tools.evaluate import evaluate
from bnntrain.models import build_model
from bnntrain.run import pipeline
from conftest import run_cli
from test_config import make
from test_resume import ENV, assert_same, crash_run


@pytest.mark.slow
def test_recalibration_restores_a_checkpoint_whose_statistics_are_wrong(tmp_path):
    run = tmp_path / "run"
    pipeline.run(["stage=1", "model.width=0.25", "schedule.epochs=3", "trainer.progress=plain"], run)  # the CLI's run
    state = torch.load(run / "stage1/last.pt", weights_only=True)
    good = state["metrics"]["top1"]
    g = torch.Generator().manual_seed(0)
    for key, value in state["model"].items():  # statistics of some other network
        if key.endswith("running_mean"):
            value.add_(torch.randn(value.shape, generator=g) * 3)
        elif key.endswith("running_var"):
            value.mul_(torch.rand(value.shape, generator=g) * 20 + 5)
    save_checkpoint(state, tmp_path / "stale.pt")  # with its new checksum
    stale = evaluate(tmp_path / "stale.pt", ["trainer.progress=plain"])
    fixed = evaluate(tmp_path / "stale.pt", ["trainer.progress=plain", "trainer.bn_recalibrate=10"])
    assert good > 80 and stale["top1"] < good - 30, (good, stale["top1"])  # measured: 94.7 and 10.3
    assert fixed["top1"] > good - 3 and fixed["before_recalibration"]["top1"] == stale["top1"]


def test_recalibration_touches_no_weight_and_no_random_stream():
    cfg = make("model.width=0.125")
    model = build_model(cfg.model, num_classes=10, in_channels=1)
    loaders = build_loaders(cfg.data, cfg.augment)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    seconds = recalibrate_batchnorm(model, loaders.train.unmixed(), 3)
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(after[key], value), key  # re-estimated
        else:
            assert torch.equal(after[key], value), key  # weights, and the batch counter training goes on from
    assert [bn.momentum for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d)][0] == 0.2


def test_the_statistics_are_the_exact_average_over_the_batches_used():
    """A cumulative average of each batch's mean and (unbiased) variance over the first
    `count` batches, not a moving average that weighs the last batches more."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.1))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 6, 6, generator=g) * (1 + i) + i, None) for i in range(4)]  # unlike each other
    recalibrate_batchnorm(model, batches, 3)  # the fourth is not used
    with torch.no_grad():
        outs = [model[0](x).transpose(0, 1).flatten(1) for x, _ in batches[:3]]
    mean = torch.stack([o.mean(1) for o in outs]).mean(0)
    var = torch.stack([o.var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.1


@pytest.mark.slow
def test_resume_is_exact_with_recalibration(tmp_path):
    args = ["data=synthetic", "data.image_size=16", "data.train_size=128", "data.batch_size=16", "model.width=0.125",
            "schedule.epochs=3", "stage=1", "trainer.bn_recalibrate=2", "seed=7"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    pipeline.run(args, straight)  # the reference, by what the CLI runs, in this process
    crash_run(args, broken, "stage1/last.pt", epoch=1)
    out = run_cli([f"resume={broken}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "BN statistics re-estimated from 2 batches" in out.stdout
    a, b = (torch.load(r / "stage1/last.pt", weights_only=True) for r in (straight, broken))
    for key in ("model", "optimizer", "trainer", "metrics", "best_top1"):
        assert_same(a[key], b[key], key)


SETUP = """
import torch
from torch import nn

from bnntrain.engine.recalibrate import recalibrate_batchnorm

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(8, 3, 6, 6, generator=g) * (1 + i), None) for i in range(4)]
"""
RANKS = SETUP + """
import json
import sys

from bnntrain.engine import distributed

distributed.init("cpu")
recalibrate_batchnorm(model, batches[distributed.rank()::2], 2)  # two batches each
stats = torch.cat([model[1].running_mean, model[1].running_var]).tolist()
with open(f"{sys.argv[1]}/rank{distributed.rank()}.json", "w") as f:  # a file each: ranks' stdout lines interleave
    json.dump(stats, f)
distributed.shutdown()
"""


@pytest.mark.slow
def test_ranks_average_their_statistics_as_one_process_would(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, env=ENV)
    assert out.returncode == 0, out.stderr
    ranks = [torch.tensor(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    alone = {}
    exec(SETUP + "recalibrate_batchnorm(model, batches, 4)", alone)  # one process, all four
    single = torch.cat([alone["model"][1].running_mean, alone["model"][1].running_var])
    assert len(ranks) == 2 and torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], single, rtol=1e-5, atol=1e-6)
