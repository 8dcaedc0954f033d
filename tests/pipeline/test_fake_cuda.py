"""The CUDA path without a GPU: training, validation, resume and captioning on a fake ``cuda`` device.

PyTorch's ``FakeTensorMode`` gives tensors a device and a shape but no data, and raises
``FakeTensorDeviceMismatchError`` when a CPU tensor meets a CUDA one -- the error a real
GPU run would hit. :class:`FakeCuda` narrows it to what a GPU run needs:

* only CUDA tensors are fake; work on real CPU tensors runs for real (so CPU-side maths
  such as cutting captions to length gives true numbers);
* a read of a CUDA value on the host (``.item()``, ``bool()``, ``.tolist()`` after
  ``.cpu()``) is counted in ``host_reads`` and answered with a placeholder (True, 1 or
  0.5): a beam search then runs to ``max_len``, and the captions are placeholders.

Two things do not work under the mode and are isolated here: ``Module.to`` on fake
parameters (models are built on the fake device instead, and ``.to`` of a model already
there is a no-op, as it is on a GPU), and autograd's backward, which asks the CUDA driver
about devices (it is replaced by one that gives every trained parameter a zero gradient
on the parameter's device, as a real backward would).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map_only

from batchcap.config import BeamConfig, DecoderConfig, RuntimeConfig, TrainConfig
from batchcap.data.captions.records import CaptionRecord
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.modelfile import load_model
from batchcap.model.text import SPECIAL_TOKENS, Vocabulary
from batchcap.pipeline.captioner import Captioner
from batchcap.training.checkpoints import load_checkpoint, save_checkpoint
from batchcap.training.driver import validate
from batchcap.training.feature_sources import CachedFeatures, encode_captions
from batchcap.training.steps import Split, StepTotals, TrainStep

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # autocast("cuda") is off

CUDA = RuntimeConfig(device="cuda", precision="bf16", batch_size=8, workers=0)
WORDS = ("a", "dog", "cat", "runs", "on", "grass")


class FakeCuda(FakeTensorMode):
    """Fake CUDA tensors, real CPU tensors; counts (and answers) every host read of a CUDA value."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.host_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        fake = [x for x in leaves if isinstance(x, FakeTensor)]
        if not fake and not any(isinstance(x, torch.device) and x.type != "cpu" for x in leaves):
            with torch._subclasses.fake_tensor.unset_fake_temporarily():
                return func(*args, **kwargs)  # CPU work on real tensors: run it
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(), int(), float()
            self.host_reads += 1
            return _placeholder(args[0].dtype)
        if (
            func.overloadpacket in _MOVES
            and fake
            and fake[0].device.type == "cuda"
            and any(isinstance(x, torch.device) and x.type == "cpu" for x in leaves)
        ):  # .cpu(), .to("cpu")
            self.host_reads += 1  # a device-to-host copy waits for the GPU
            dtype = kwargs.get("dtype") or next((x for x in leaves if isinstance(x, torch.dtype)), fake[0].dtype)
            with torch._subclasses.fake_tensor.unset_fake_temporarily():
                return torch.full(fake[0].shape, _placeholder(dtype), dtype=dtype)
        args, kwargs = tree_map_only(
            torch.Tensor, lambda t: t if isinstance(t, FakeTensor) else self.from_tensor(t), (args, kwargs)
        )
        return super().__torch_dispatch__(func, types, args, kwargs)


_MOVES = {torch.ops.aten._to_copy, torch.ops.aten.to, torch.ops.prims.device_put}


def _placeholder(dtype: torch.dtype) -> bool | int | float:
    if dtype == torch.bool:
        return True
    return 0.5 if dtype.is_floating_point else 1


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCuda]:
    """The mode, with ``Module.to`` and ``Tensor.backward`` isolated (see the module docstring)."""
    real_to = torch.nn.Module.to

    def to_if_needed(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(module.parameters()) + list(module.buffers())
        if dtype is None and (device is None or all(_same_device(t.device, device) for t in tensors)):
            return module  # already there (a memory-format change alone does not move anything)
        return real_to(module, *args, **kwargs)

    def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        assert loss.device.type == "cuda", f"the loss is on {loss.device}"
        for param in fake_cuda.trained_parameters:
            param.grad = torch.zeros_like(param)

    monkeypatch.setattr(torch.nn.Module, "to", to_if_needed)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    fake_cuda = FakeCuda()
    fake_cuda.trained_parameters = []  # type: ignore[attr-defined]
    with fake_cuda:
        yield fake_cuda


def tiny_split(images: int = 6) -> tuple[Split, Vocabulary]:
    """A real CPU split: random fp16 features (4 regions of 8) and two captions per image."""
    vocab = Vocabulary(SPECIAL_TOKENS + WORDS)
    records = [CaptionRecord(f"im{i}", ("a dog runs on grass", "a cat runs")) for i in range(images)]
    keep = {r.image_id: n for n, r in enumerate(records)}
    captions, owners = encode_captions(records, keep, vocab, max_len=6)
    features = torch.randn(images, 4, 8, generator=torch.Generator().manual_seed(0)).half()
    return Split(
        list(keep), features, records, captions, owners, {r.image_id: list(r.captions) for r in records}
    ), vocab


def decoder_config(vocab: Vocabulary) -> DecoderConfig:
    return DecoderConfig(vocab_size=len(vocab), feature_dim=8, embed_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0)


def trainer(
    vocab: Vocabulary, split: Split, decoder: CaptionDecoder, fake: FakeCuda
) -> tuple[TrainStep, torch.optim.Optimizer, torch.nn.ModuleDict]:
    trained = torch.nn.ModuleDict({"decoder": decoder})
    optimizer = torch.optim.AdamW([{"params": list(decoder.parameters()), "lr": 1e-3, "base_lr": 1e-3}])
    fake.trained_parameters = list(trained.parameters())  # type: ignore[attr-defined]
    cfg = TrainConfig(data="-", out="-", batch_size=3, warmup_steps=2, extra={"captions_per_image": 2})
    return TrainStep(decoder, trained, optimizer, cfg, CUDA, vocab, split, total_steps=10), optimizer, trained


def test_the_harness_catches_a_cpu_tensor_meeting_a_cuda_model_and_counts_host_reads(fake_cuda: FakeCuda) -> None:
    split, vocab = tiny_split()
    with torch.device("cuda"):
        decoder = CaptionDecoder(decoder_config(vocab))
    with pytest.raises(FakeTensorDeviceMismatchError):
        decoder.init_state(split.features.float())  # what validation did before features moved
    on_gpu = torch.ones(3, device="cuda")
    assert int((split.captions != 0).sum(1).max()) == 7 and fake_cuda.host_reads == 0  # CPU maths is real
    int(on_gpu.sum()), on_gpu.cpu()  # what the training step used to do to cut captions, and a copy back
    assert fake_cuda.host_reads == 2


@pytest.mark.parametrize("on_device", [True, False], ids=["cache-on-gpu", "cache-on-cpu"])
def test_training_steps_run_on_the_device_and_read_nothing_back(fake_cuda: FakeCuda, on_device: bool) -> None:
    split, vocab = tiny_split()
    with torch.device("cuda"):
        decoder = CaptionDecoder(decoder_config(vocab))
    step, optimizer, _ = trainer(vocab, split, decoder, fake_cuda)
    source = CachedFeatures([split.features], "cuda", on_device=on_device)
    assert source.views[0].device.type == ("cuda" if on_device else "cpu")
    totals = StepTotals.zeros("cuda")
    generator = torch.Generator().manual_seed(0)
    for n, (images, feats) in enumerate(source.epoch([[0, 1, 2], [3, 4, 5]], generator)):
        assert feats.device.type == "cuda" and feats.dtype == torch.float32
        totals.add(step(n, images, feats, generator), len(images))
    assert fake_cuda.host_reads == 0, "a training step waited for the GPU"
    moments = optimizer.state[decoder.out.weight]
    assert moments["exp_avg"].device.type == "cuda" and totals.loss.device.type == "cuda"
    assert totals.images == 6


def test_validation_captions_cpu_cached_features_with_a_cuda_decoder(fake_cuda: FakeCuda) -> None:
    split, vocab = tiny_split()
    with torch.device("cuda"):
        decoder = CaptionDecoder(decoder_config(vocab))
    scores = validate(decoder, split, split.features, vocab, BeamConfig(beam_size=3, max_len=5))
    assert set(scores) >= {"BLEU-4", "CIDEr"} and len(scores["examples"]) == 3


def test_resume_puts_the_adamw_moments_on_the_device(tmp_path: Path, fake_cuda: FakeCuda) -> None:
    split, vocab = tiny_split()
    path = tmp_path / "m.ckpt"
    with torch._subclasses.fake_tensor.unset_fake_temporarily():  # a real CPU run wrote the checkpoint
        cpu = CaptionDecoder(decoder_config(vocab))
        cpu_optimizer = torch.optim.AdamW(cpu.parameters())
        for p in cpu.parameters():
            p.grad = torch.ones_like(p)
        cpu_optimizer.step()
        save_checkpoint(path, torch.nn.ModuleDict({"decoder": cpu}), cpu_optimizer, {"epoch": 1})

    with torch.device("cuda"):
        decoder = CaptionDecoder(decoder_config(vocab))
    step, optimizer, trained = trainer(vocab, split, decoder, fake_cuda)
    assert load_checkpoint(path, trained, optimizer) == {"epoch": 1}
    moments = optimizer.state[decoder.out.weight]
    assert moments["exp_avg"].device.type == "cuda" and moments["exp_avg_sq"].device.type == "cuda"
    assert moments["step"].device.type == "cpu"  # where (non-fused) AdamW keeps it
    images, feats = next(CachedFeatures([split.features], "cuda").epoch([[0, 1]], torch.Generator()))
    step(5, images, feats, torch.Generator())  # the first step after a resume
    save_checkpoint(tmp_path / "again.ckpt", trained, optimizer, {"epoch": 2})  # and the next checkpoint
    assert (tmp_path / "again.ckpt").stat().st_size > path.stat().st_size // 2


def test_beam_search_through_the_captioner_on_the_device(tiny_model_path: Path, fake_cuda: FakeCuda) -> None:
    model = load_model(tiny_model_path)
    with torch.device("cuda"):
        captioner = Captioner(model, CUDA, BeamConfig(beam_size=3, max_len=6, n_best=2))
    shapes: list[int] = []
    real_forward_features = captioner.encoder.backbone.forward_features
    captioner.encoder.backbone.forward_features = lambda x: (shapes.append(x.shape[0]), real_forward_features(x))[1]
    images = torch.zeros(5, 3, 64, 64, dtype=torch.uint8)  # a real CPU batch, as the loader gives it
    captions = captioner(images)
    assert len(captions) == 5 and all(c.error is None and math.isfinite(c.score) for c in captions)
    assert shapes == [8], "a short batch is padded to --batch-size on CUDA"
