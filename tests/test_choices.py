"""One owner per choice list: a registry or a tuple in the code that uses the value. The
builders raise a plain UnknownChoice (a ValueError); the config check turns it into the
one-line ConfigError with the same words."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnntrain.run.checks import RULES
from bnntrain.run.config import plan
from bnntrain.data import BATCH_AUGMENT
from bnntrain.data.samples import BAD_IMAGES
from bnntrain.data.transforms import DECODERS
from bnntrain.engine.trainer import AMP_DTYPES
from bnntrain.errors import ConfigError, UserError
from bnntrain.tools.evaluate import eval_config, evaluate
from bnntrain.nn import ACTIVATION_MODES, WEIGHT_MODES
from bnntrain.optim import DECAYED, OPTIMIZERS
from bnntrain.registry import Registry, UnknownChoice, choose

OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "reactnet18_w0.0625_v0.1.pt"  # written by 0.1.0


def test_composing_a_config_imports_no_torch():
    """The checks find the owned choices when they check a value, not when they are imported."""
    code = "import sys, bnntrain.run.cli; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_an_unknown_name_is_a_plain_error_naming_the_choices():
    table = Registry("x.name")
    table.register("b")(1)
    table.register("a")(2)
    with pytest.raises(UnknownChoice, match=r"^unknown x.name 'c'; expected one of: a, b$") as error:
        table.get("c")
    assert isinstance(error.value, ValueError) and not isinstance(error.value, UserError)
    assert choose("y", None, ("auto", None)) is None
    with pytest.raises(UnknownChoice, match=r"^unknown y 'z'; expected one of: auto, null$"):
        choose("y", "z", ("auto", None))


def test_the_config_check_turns_it_into_a_config_error_with_the_same_words():
    with pytest.raises(UnknownChoice) as plain:
        OPTIMIZERS.get("lion")
    with pytest.raises(ConfigError) as checked:
        plan(["stage=1", "optimizer.name=lion", "optimizer.lr=1e-3", "optimizer.weight_decay=0"])
    assert str(checked.value) == str(plain.value)


@pytest.mark.parametrize("key, owner", [
    ("stage.activations", ACTIVATION_MODES), ("stage.switch.activations", ACTIVATION_MODES),
    ("stage.weights", WEIGHT_MODES), ("optimizer.weight_decay_on", tuple(DECAYED)),
    ("trainer.amp", ("auto", *AMP_DTYPES, None)), ("data.bad_images", BAD_IMAGES), ("data.decoder", DECODERS),
    ("data.batch_augment", BATCH_AUGMENT),
])
def test_the_checked_choices_are_those_the_code_owns(key, owner):
    ok, what = RULES[key]
    assert all(ok(choice) for choice in owner) and not ok("nope"), key
    assert what.count(",") == len(owner) - 1, what  # no choice the code lacks


def test_a_checkpoint_saved_before_a_data_key_existed_takes_the_presets_value():
    state = torch.load(OLD_CHECKPOINT, map_location="cpu", weights_only=False)
    assert "decoder" not in state["config"]["data"]
    data = eval_config(state, []).data
    assert (data.decoder, data.bad_images, data.train_limit, data.verify) == ("auto", "error", None, False)
    assert data.batch_size == state["config"]["data"]["batch_size"]  # the checkpoint's own values stay


def test_evaluating_with_an_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^unknown data.name 'nope'; expected one of: cifar10, cifar100, digits"):
        evaluate(OLD_CHECKPOINT, ["data.name=nope", "trainer.device=cpu"])
