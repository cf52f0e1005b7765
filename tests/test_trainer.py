"""The training loop on its own: it learns, evaluates correctly, and stops on a NaN loss."""
import pytest
import torch
from torch import nn

from bnntrain.engine import Trainer
from bnntrain.errors import TrainingDiverged
from bnntrain.losses import Objective


def batches(n=8, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * bs, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n * bs, bs)]


def test_trainer_learns_and_logs():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    trainer = Trainer(model, Objective(model), torch.optim.Adam(model.parameters(), 0.05),
                      torch.device("cpu"), log_every=4)
    logged = []
    first = trainer.evaluate(batches())
    for _ in range(5):
        out = trainer.train_epoch(batches(), on_log=lambda step, loss: logged.append(step))
    last = trainer.evaluate(batches())
    assert out["steps"] == 8 and logged[:2] == [4, 8] and trainer.step == 40
    assert last["top1"] > 95 and last["loss"] < first["loss"]
    assert last["top5"] == 100.0  # top-5 of 2 classes


def test_logged_loss_is_the_mean_over_the_logging_interval():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = batches()
    with torch.no_grad():  # lr 0: the model stays as it is, so each batch's loss is known up front
        step_losses = torch.stack([nn.functional.cross_entropy(model(x), y) for x, y in data])
    trainer = Trainer(model, Objective(model), torch.optim.SGD(model.parameters(), 0.0), torch.device("cpu"),
                      log_every=4)
    logged = []
    out = trainer.train_epoch(data, on_log=lambda step, loss: logged.append((step, loss)))
    assert [s for s, _ in logged] == [4, 8]
    assert [loss for _, loss in logged] == pytest.approx([step_losses[:4].mean().item(), step_losses[4:].mean().item()])
    assert out["loss"] == pytest.approx(step_losses.mean().item())


def test_evaluate_counts_exactly():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 2])
    m = Trainer(model, Objective(model), torch.optim.SGD(model.parameters(), 0.1),
                torch.device("cpu")).evaluate([(x, y)])
    assert m["top1"] == 50.0


def test_nan_loss_stops_training():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    trainer = Trainer(model, Objective(model), torch.optim.Adam(model.parameters()), torch.device("cpu"))
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        trainer.train_epoch(batches())
