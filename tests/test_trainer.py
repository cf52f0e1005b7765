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


def test_accumulated_windows_step_like_one_batch_of_their_size():
    """SGD over windows of 3 batches (and the epoch's last window of 2) moves the weights
    exactly as one step per window on the concatenated batches."""
    data = batches(n=5, bs=8)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    reference = nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    trainer = Trainer(model, Objective(model), torch.optim.SGD(model.parameters(), 0.5), torch.device("cpu"),
                      accumulate=3)
    out = trainer.train_epoch(data)
    assert out["steps"] == 5 and trainer.step == 2  # ceil(5 / 3) optimizer steps
    ref_trainer = Trainer(reference, Objective(reference), torch.optim.SGD(reference.parameters(), 0.5),
                          torch.device("cpu"))
    windows = [data[:3], data[3:]]
    ref_trainer.train_epoch([(torch.cat([x for x, _ in w]), torch.cat([y for _, y in w])) for w in windows])
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # nothing left over for the next epoch


def test_grad_clip_bounds_the_update():
    """With SGD at lr 1, the step is minus the gradient: clipped, its norm is the clip value."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = batches(n=1, bs=16)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x) * 100, y)  # a steep loss: a gradient norm far above 0.01
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.cat([g.flatten() for g in grads]).norm() > 1.0

    class Steep(Objective):
        def forward(self, model, images, targets):
            return nn.functional.cross_entropy(model(images) * 100, targets)

    trainer = Trainer(model, Steep(model), torch.optim.SGD(model.parameters(), 1.0), torch.device("cpu"),
                      grad_clip=0.01)
    trainer.train_epoch([(x, y)])
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    expected = torch.cat([g.flatten() for g in grads])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)
    assert torch.allclose(step / step.norm(), -expected / expected.norm(), atol=1e-5)  # same direction
