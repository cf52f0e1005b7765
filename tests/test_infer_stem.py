"""bnntrain.infer's stem run a few samples at a time (infer/stem.py): the batched stem's outputs bit
for bit, checked on the first batch of each size, and left batched where they would differ."""
import torch
from torch import nn

from bnntrain.tools import export
from conftest import need
from test_infer_fused import exported

need("numba", extra="infer")
from bnntrain import infer  # noqa: E402  (needs numba)
from bnntrain.infer import stem as stem_module  # noqa: E402


def largest_output(layers: nn.Sequential, x: torch.Tensor) -> int:
    """Bytes of the largest output of the stem's layers, per sample."""
    sizes = []
    for layer in layers:
        x = layer(x)
        sizes.append(x[:1].numel() * x.element_size())
    return max(sizes)


def test_the_chunked_stem_gives_the_exports_outputs(tmp_path, monkeypatch):
    path = exported(tmp_path, "birealnet18")
    model = infer.load(path)
    assert isinstance(model.stem, stem_module.ChunkedStem)
    assert not isinstance(infer.load(path, fuse=False).stem, stem_module.ChunkedStem)
    with torch.no_grad():
        per_sample = largest_output(model.stem.stem, torch.randn(1, 3, 32, 32))
    monkeypatch.setattr(stem_module, "CHUNK_BYTES", 2 * per_sample)  # chunks of two samples
    reference = export.load(path).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for n in (5, 1, 5, 2):
            x = torch.randn(n, 3, 32, 32)
            assert torch.equal(model(x), reference(x.contiguous(memory_format=torch.channels_last)))
    by_batch = {shape[0]: size for (shape, _, _), size in model.stem.chunk.items()}
    assert by_batch == {5: 2, 1: 1, 2: 2}  # two samples a chunk; a batch of 1 or 2 is one chunk
    with torch.no_grad():  # another image size is checked anew, not given the chunks chosen at 32 px
        x = torch.randn(5, 3, 64, 64)
        assert torch.equal(model(x), reference(x.contiguous(memory_format=torch.channels_last)))
    assert len(model.stem.chunk) == 4 and min(model.stem.chunk.values()) == 1  # 4x the bytes: one sample a chunk


def test_a_stem_whose_chunks_differ_stays_batched(monkeypatch):
    """Batch statistics (BN in training mode) differ chunk by chunk: the stem is not chunked."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))
    monkeypatch.setattr(stem_module, "CHUNK_BYTES", 2 * 16 * 16 * 16 * 4)  # two samples a chunk
    chunked = stem_module.ChunkedStem(layers).eval()
    layers[1].train()  # the BN alone: the stem's forward is the chunked one, the BN's statistics the batch's
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        first = chunked(x)
        assert list(chunked.chunk.values()) == [6] and torch.equal(first, layers(x))
        chunked.eval()  # per-sample now: the next new batch size is chunked
        y = torch.randn(4, 3, 16, 16)
        assert torch.equal(chunked(y), layers(y)) and list(chunked.chunk.values()) == [6, 2]
        assert torch.equal(chunked(y), layers(y))  # the chunked path itself
        chunked.train()  # in training, the batch whole whatever was chosen: its statistics are the batch's
        assert torch.equal(chunked(y), nn.Sequential(*layers)(y))
