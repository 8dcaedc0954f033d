"""batchcap.model.decoder: state and output shapes, and the step path agreeing with teacher forcing."""

from __future__ import annotations

import pytest
import torch

from batchcap.config import DecoderConfig
from batchcap.model.decoder import CaptionDecoder
from batchcap.model.ensemble import EnsembleDecoder, EnsembleError

V, F, E, H, D = 11, 12, 8, 10, 6

CONFIGS = {
    "attention": dict(attention=True),
    "no-attention": dict(attention=False),
    "deep-output": dict(attention=True, deep_output=True),
    "three-layers": dict(attention=True, num_layers=3),
    "deep-no-attention-2-layers": dict(attention=False, deep_output=True, num_layers=2),
}


def make(seed: int = 0, dtype: torch.dtype | None = None, **kw: object) -> CaptionDecoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=V, feature_dim=F, embed_dim=E, hidden_dim=H, attention_dim=D, dropout=0.3, **kw)
    return CaptionDecoder(cfg, dtype=dtype).eval()  # eval: dropout off, so both paths are deterministic


def captions(n: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(4, V, (n, t), generator=g)
    words[:, 0] = 1  # <start>
    return words


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "pooled"])
def test_init_state_shapes(name: str, spatial: bool) -> None:
    dec = make(**CONFIGS[name])
    layers = dec.cfg.num_layers
    features = torch.randn(3, 5, F) if spatial else torch.randn(3, F)
    regions = 5 if spatial else 1
    h, c, memory, keys = dec.init_state(features, captions_per_image=2)
    assert h.shape == c.shape == (6, layers, H)
    assert memory.shape == (3, regions, D)  # per image, not per hypothesis
    assert keys.shape == ((3, regions, D) if dec.cfg.attention else (3, 0, D))
    assert torch.equal(h[0], h[1]) and torch.equal(h[2], h[3]) and not torch.equal(h[1], h[2])  # image-major


@pytest.mark.parametrize("name", CONFIGS)
def test_step_returns_log_probabilities_and_a_state_of_the_same_shapes(name: str) -> None:
    dec = make(**CONFIGS[name])
    state = dec.init_state(torch.randn(2, 4, F), captions_per_image=3)
    logp, new = dec.step(torch.full((6,), 1), state)
    assert logp.shape == (6, V) and logp.dtype == torch.float32
    assert torch.allclose(logp.exp().sum(-1), torch.ones(6), atol=1e-5)
    assert [t.shape for t in new] == [t.shape for t in state]
    assert not torch.equal(new[0], state[0])  # h moved on
    assert new[2] is state[2]  # the per-image memory is carried, not copied


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_shapes_and_attention_weights(name: str) -> None:
    dec = make(**CONFIGS[name])
    logits, alpha = dec(torch.randn(2, 5, F), captions(4, 7), captions_per_image=2)
    assert logits.shape == (4, 6, V)
    if dec.cfg.attention:
        assert alpha is not None and alpha.shape == (4, 6, 5)
        assert torch.allclose(alpha.sum(-1), torch.ones(4, 6), atol=1e-5)
        assert (alpha >= 0).all()
    else:
        assert alpha is None


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("per_image", [1, 3])
def test_step_by_step_equals_teacher_forced_forward(name: str, per_image: int) -> None:
    """Training (forward) and captioning (step) are one network: same words in, same distribution out."""
    dec = make(**CONFIGS[name])
    features = torch.randn(2, 5, F)
    words = captions(2 * per_image, 6)
    with torch.no_grad():
        logits, _ = dec(features, words, captions_per_image=per_image)
        state = dec.init_state(features, captions_per_image=per_image)
        for t in range(words.shape[1] - 1):
            logp, state = dec.step(words[:, t], state)
            assert torch.allclose(logp, torch.log_softmax(logits[:, t], -1), atol=1e-5), t


def test_captions_per_image_equals_repeating_the_image() -> None:
    """Sharing one memory among C hypotheses must give what C copies of the image give."""
    dec = make(**CONFIGS["three-layers"])
    features = torch.randn(2, 5, F)
    words = captions(6, 5)
    with torch.no_grad():
        shared, alpha_shared = dec(features, words, captions_per_image=3)
        repeated, alpha_repeated = dec(features.repeat_interleave(3, 0), words, captions_per_image=1)
    assert torch.allclose(shared, repeated, atol=1e-5)
    assert torch.allclose(alpha_shared, alpha_repeated, atol=1e-6)


def test_the_output_depends_on_the_picture_and_on_the_words() -> None:
    dec = make(**CONFIGS["attention"])
    words, picture = captions(1, 5), torch.randn(1, 5, F)
    with torch.no_grad():
        a, _ = dec(picture, words)
        b, _ = dec(torch.randn(1, 5, F), words)
        c, _ = dec(picture, captions(1, 5, seed=7))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a[:, 1:], c[:, 1:])


def test_attention_sees_each_region_not_only_the_mean() -> None:
    """Attention is a weighted sum over regions: their order does not matter, what each holds does."""
    features = torch.randn(1, 4, F)
    same_mean = features.clone()
    same_mean[0, 0] += 3.0
    same_mean[0, 1] -= 3.0
    words = captions(1, 4)
    with torch.no_grad():
        att, no_att = make(**CONFIGS["attention"]), make(**CONFIGS["no-attention"])
        assert torch.allclose(att(features, words)[0], att(features[:, [3, 2, 1, 0]], words)[0], atol=1e-5)
        assert not torch.allclose(att(features, words)[0], att(same_mean, words)[0], atol=1e-4)
        assert no_att(features, words)[1] is None
        assert torch.allclose(no_att(features, words)[0], no_att(features[:, [3, 2, 1, 0]], words)[0], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_sets_the_weights_and_step_still_returns_fp32(dtype: torch.dtype) -> None:
    dec = make(dtype=dtype, **CONFIGS["deep-output"])
    assert {p.dtype for p in dec.parameters()} == {dtype}
    state = dec.init_state(torch.randn(2, 3, F))  # fp32 features are cast to the weights' dtype
    assert state[0].dtype == dtype and state[2].dtype == dtype
    logp, _ = dec.step(torch.tensor([1, 1]), state)
    assert logp.dtype == torch.float32 and logp.shape == (2, V)
    assert torch.isfinite(logp).all()


def test_bf16_weights_give_nearly_the_fp32_distribution() -> None:
    fp32, bf16 = make(**CONFIGS["attention"]), make(dtype=torch.bfloat16, **CONFIGS["attention"])
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    features = torch.randn(2, 4, F)
    with torch.no_grad():
        a, _ = fp32.step(torch.tensor([1, 1]), fp32.init_state(features))
        b, _ = bf16.step(torch.tensor([1, 1]), bf16.init_state(features))
    assert torch.allclose(a.exp(), b.exp(), atol=0.02)


def test_dropout_is_active_in_training_mode_only() -> None:
    dec = make(**CONFIGS["three-layers"])
    features, words = torch.randn(2, 4, F), captions(2, 5)
    with torch.no_grad():
        assert torch.equal(dec(features, words)[0], dec(features, words)[0])
        dec.train()
        torch.manual_seed(0)
        a = dec(features, words)[0]
        torch.manual_seed(1)
        b = dec(features, words)[0]
    assert not torch.equal(a, b)


def test_styles_start_at_zero_and_each_image_gets_its_own() -> None:
    plain = make(seed=3)
    styled = make(seed=3, styles=("flickr8k", "everyday"))
    missing, unexpected = styled.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["style_memory.weight"] and not unexpected
    features, caps = torch.randn(3, 5, F), captions(3, 6)
    which = torch.tensor([0, 1, 1])
    # zero offsets: the same state and logits as the decoder without styles
    for a, b in zip(plain.init_state(features), styled.init_state(features, styles=which)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain(features, caps)[0], styled(features, caps, styles=which)[0])
    with torch.no_grad():
        styled.style_memory.weight.copy_(torch.randn_like(styled.style_memory.weight))
    h = styled.init_state(features, styles=which)[0]
    same_picture = features[[0, 0, 0]]
    h_each = styled.init_state(same_picture, styles=torch.tensor([0, 1, 0]))[0]
    assert torch.equal(h_each[0], h_each[2]) and not torch.allclose(h_each[0], h_each[1])
    # teacher forcing and the step path agree with styles too
    logits, _ = styled(features, caps, styles=which)
    state = styled.init_state(features, styles=which)
    for t in range(caps.shape[1] - 1):
        step_lp, state = styled.step(caps[:, t], state)
        torch.testing.assert_close(step_lp, torch.log_softmax(logits[:, t].float(), -1))
    assert h.shape == (3, 1, H)
    # a decoder without styles ignores them
    torch.testing.assert_close(plain.init_state(features, styles=which)[0], plain.init_state(features)[0])


def test_an_ensemble_of_decoders_with_other_styles_is_refused() -> None:
    with pytest.raises(EnsembleError, match="different caption styles"):
        EnsembleDecoder([make(styles=("flickr8k", "everyday")), make(styles=("everyday", "flickr8k"))])
    both = EnsembleDecoder([make(seed=1, styles=("a", "b")), make(seed=2, styles=("a", "b"))])
    features, which = torch.randn(2, 5, F), torch.tensor([0, 1])
    state = both.init_state(features, styles=which)
    for got, member in zip(state[:4], both.members[0].init_state(features, styles=which)):
        torch.testing.assert_close(got, member)
