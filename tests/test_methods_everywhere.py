"""Every binarization method, as its paper pairs them, through everything a network goes
through: both stages of the recipe in one run (the stage-1 checkpoint, quantizer parameters
included, loads strictly into stage 2; Bop, which needs binary weights, in the one-stage
recipe), the cost report's bit widths, and the packed export with outputs equal to the trained
network's, or the export's one-line refusal. bnntrain.infer runs what the export writes for
any quantizer alike (the packed signs and one scale per channel; test_infer.py): it is run
here for one method."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bnntrain.engine import load_checkpoint
from bnntrain.errors import UserError
from bnntrain.models import model_from_checkpoint
from bnntrain.run.pipeline import run
from bnntrain.tools import export
from conftest import need

PAIRS = {  # name: input quantizer, weight quantizer, other overrides
    "BNN": ("{name:ste_sign}", "{name:sign}", []),
    "XNOR-Net": ("{name:xnor_sign}", "{name:xnor_weight}", []),
    "XNOR-Net, K": ("{name:xnor_sign,scale:box}", "{name:xnor_weight}", []),
    "XNOR-Net++": ("{name:ste_sign}", "{name:xnor_plus_plus}", []),
    "DoReFa": ("{name:ste_sign}", "{name:dorefa_sign}", []),
    "IR-Net": ("{name:ede_sign}", "{name:irnet_libra_pb}", []),
    "ReCU": ("{name:recu_sign}", "{name:recu}", []),
    "FDA": ("{name:fda_sign,noise:true,reduction:4}", "{name:fda,noise:true,reduction:4}", []),
    "AdaBin": ("{name:adabin_sign}", "{name:adabin}", ["model.activation=maxout"]),
    "SteHeaviside": ("{name:ste_heaviside}", "{name:magnitude_aware_sign}", []),
    "Bop, one stage": ("{name:ste_sign}", "{name:sign}", ["stage=2", "stage.needs_init=false", "optimizer=bop",
                                                         "optimizer.lr=1e-2", "optimizer.weight_decay=0",
                                                         "optimizer.threshold=1e-6", "optimizer.gamma=1e-3"]),
}
TINY = ["data=synthetic", "data.image_size=16", "data.train_size=16", "data.test_size=8", "data.batch_size=8",
        "model.width=0.125", "schedule.epochs=1", "trainer.device=cpu", "trainer.progress=plain"]


@pytest.mark.slow
@pytest.mark.parametrize("method", PAIRS)
def test_a_method_runs_both_stages_reports_its_costs_and_exports_or_is_refused(method, tmp_path: Path):
    activations, weights, extra = PAIRS[method]
    overrides = [*TINY, "~model.input_quantizer", f"+model.input_quantizer={activations}",
                 "~model.weight_quantizer", f"+model.weight_quantizer={weights}", *extra]
    results = run(overrides, tmp_path / "run")
    stages = ["stage2"] if method.startswith("Bop") else ["stage1", "stage2"]
    assert list(results) == stages  # stage 2 started from stage 1's weights, loaded strictly
    last = tmp_path / "run" / "stage2" / "last.pt"
    if len(stages) == 2:
        assert torch.load(last, weights_only=True)["init_from"] == str(tmp_path / "run" / "stage1" / "last.pt")
    cost = OmegaConf.load(tmp_path / "run" / "stage2" / "cost.json")
    binary = [layer for layer in cost.layers if layer.input_bits == 1 and layer.weight_bits == 1]
    assert binary and cost.totals.bops > 0
    out = tmp_path / "model.bnn"
    refused = ("XNOR-Net, K", "XNOR-Net++", "AdaBin", "SteHeaviside")
    if method in refused:
        with pytest.raises(UserError, match="cannot run it as trained$"):
            export.export_checkpoint(last, out)
        assert not out.exists()
        return
    export.export_checkpoint(last, out)
    trained = model_from_checkpoint(load_checkpoint(last)).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(export.load(out)(x), trained(x), rtol=1e-4, atol=1e-4)
        if method == "IR-Net":  # signs not those of the latent weights, a scale per channel
            need("numba", extra="infer")
            from bnntrain import infer

            assert torch.equal(infer.load(out, channels_last=False)(x), export.load(out)(x))
