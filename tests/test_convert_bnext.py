"""BNext's official checkpoints (hpi-xnor/BNext, as `train_assistant_group_amp.py` saves them:
DDP's `module.` keys under `state_dict`, beside `epoch`, `best_top1_acc`, `optimizer`, ...)
through `bnntrain.tools.convert`: every key of the four sizes accounted for, and the converted
network's logits the official network's in float64."""
import pytest
import torch

from test_bnext import COUNTS, OfficialBNext, randomized

from bnntrain.errors import ConfigError
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.tools.convert import convert, map_keys
from bnntrain.tools.official_keys import BNEXT_RULES
from test_config import make

KEYS = {"tiny": 661, "small": 661, "middle": 997, "large": 1333}  # the code's state dicts, counted


@pytest.mark.parametrize("size", KEYS)
def test_every_official_key_of_each_size_is_accounted_for(size):
    with torch.device("meta"):  # 326M parameters for large: shapes only
        official = OfficialBNext(1000, size).state_dict()
        ours = build_model(make(f"model=bnext_{size}", "data=imagenet").model, num_classes=1000, in_channels=3)
    assert len(official) == KEYS[size]
    mapped = map_keys(official, BNEXT_RULES, ours.state_dict())  # raises on a key left over either side
    assert mapped.keys() == ours.state_dict().keys()
    dropped = [k for k in official if k.endswith("binary_activation.temperature")]
    assert len(official) - len(dropped) == len(mapped)  # one to one, but the HardSign temperatures
    assert sum(v.numel() for k, v in mapped.items() if not k.endswith(("running_mean", "running_var",
               "num_batches_tracked", "temperature"))) == COUNTS[size][0]


def save_as_the_training_script(net, path, epoch=41):
    """What `save_checkpoint` of the BNext script writes, from a DDP-wrapped student."""
    torch.save({"epoch": epoch, "train_loss": [2.0], "test_top1": [71.0], "best_top1_acc": 72.4,
                "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}, "temp": 0.9 ** epoch, "alpha": 0.5}, path)


@pytest.mark.parametrize("temperature, classes", [(0.9 ** 5, 1000), (1e-8, 1000), (1e-8, 10)])
def test_a_converted_checkpoint_gives_the_official_logits(temperature, classes, tmp_path):
    torch.manual_seed(0)
    net = randomized(OfficialBNext(classes, "tiny", 0.25), temperature)  # 10 classes: the code's stride-1 stem
    save_as_the_training_script(net, tmp_path / "bnext.pth.tar")
    ckpt, zeros = convert(tmp_path / "bnext.pth.tar", tmp_path / "ours.pt", ["model=bnext_tiny", "model.width=0.25"])
    assert (ckpt["stage"], ckpt["epoch"], ckpt["best_top1"], zeros) == ("stage2", 42, 72.4, 0)
    assert ckpt["config"]["model"]["stem"] == ("imagenet" if classes == 1000 else "cifar")
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).double().eval()
    x = torch.randn(2, 3, 64 if classes == 1000 else 32, 64 if classes == 1000 else 32, dtype=torch.float64)
    with torch.no_grad():
        want = net.double().eval()(x)
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert want.abs().max() > 1e-3


def test_a_bnext_checkpoint_is_stage_2_and_another_size_is_named(tmp_path):
    torch.manual_seed(0)
    save_as_the_training_script(OfficialBNext(1000, "tiny", 0.25), tmp_path / "bnext.pth.tar")
    with pytest.raises(ConfigError, match="trains in one step"):
        convert(tmp_path / "bnext.pth.tar", tmp_path / "a.pt", ["model=bnext_tiny", "model.width=0.25"], "1")
    with pytest.raises(Exception, match=r"feature\.0\.conv1\.weight has shape \(8, 3, 3, 3\), where stem\.0\.weight"):
        convert(tmp_path / "bnext.pth.tar", tmp_path / "b.pt", ["model=bnext_small", "model.width=0.25"])
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()
