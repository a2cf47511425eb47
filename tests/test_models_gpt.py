import math

import pytest
import torch

from selfreplay.models.gpt import GPTConfig as ModelConfig
from selfreplay.errors import SelfReplayError
from selfreplay.models.gpt import GPT, _QKNormRope, apply_rope, norm_rope_qkv, rms_norm, rope_tables

TINY = ModelConfig(d_model=64, n_layers=2, head_dim=16, context=24, vocab_size=50)


def test_param_counts_match_paper_default_model():
    counts = GPT(ModelConfig()).num_params()
    assert counts["paper"] == 12 * 6 * 256**2 + 256 * 4096 == 5_767_168  # the paper's "6M" (5.77M)
    assert counts["actual"] == 12 * 6 * 256**2 + 2 * 256 * 4096 == 6_815_744  # two untied embeddings


def test_init_scales():
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=256, n_layers=2, head_dim=64, context=16, vocab_size=512))
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.03)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(1 / math.sqrt(4 * 256), rel=0.03)
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())


def test_rms_norm_gives_torchs_values_and_the_float64_gradient():
    """The CPU training path's own backward: values bit-equal to F.rms_norm's, gradients those of a float64 norm
    written out by hand (x / sqrt(mean x² + eps)), to float32 rounding, for a whole model too."""
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 64) * torch.rand(4, 7, 1) * 10).requires_grad_()
    upstream = torch.randn(4, 7, 64)
    y = rms_norm(x)
    assert torch.equal(y, torch.nn.functional.rms_norm(x.detach(), (64,), eps=1e-6))
    (grad,) = torch.autograd.grad(y, x, upstream)
    x64 = x.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6), x64, upstream.double())
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-5)
    assert grad.abs().max() > 0.1  # not a vanishing gradient compared at tolerance

    model = GPT(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (3, TINY.context))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model64 = GPT(TINY).double()
    model64.load_state_dict(model.state_dict())
    model64.rope_cos, model64.rope_sin = model.rope_cos.double(), model.rope_sin.double()
    loss64 = torch.nn.functional.cross_entropy(model64(tokens).flatten(0, 1), tokens.flatten())
    for g, g64 in zip(grads, torch.autograd.grad(loss64, list(model64.parameters()))):
        torch.testing.assert_close(g.double(), g64, atol=1e-6, rtol=1e-4)


def test_queries_and_keys_normed_and_rotated_in_one_node_equal_the_pieces_bit_for_bit():
    """The CPU training path's fused norm + RoPE: values and the projection's gradient bit-equal to autograd through
    rms_norm then apply_rope (the unfused path), and the gradient right in float64 (gradcheck)."""
    torch.manual_seed(0)
    B, T, H, hd = 5, 7, 4, 8
    cos, sin = rope_tables(T, hd)
    x = torch.randn(B * T, 16, requires_grad=True)
    weight = torch.randn(3 * H * hd, 16) * 0.3
    upstream = [torch.randn(B, H, T, hd) for _ in range(3)]

    def run(fused: bool):
        qkv = (x @ weight.T).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        if fused:
            q, k, v = norm_rope_qkv(qkv, cos, sin)
        else:
            (q, k), v = apply_rope(rms_norm(qkv[:2]), cos, sin), qkv[2]
        (grad,) = torch.autograd.grad([q, k, v], x, upstream)
        return q, k, v, grad

    for fused, pieces in zip(run(True), run(False)):
        assert torch.equal(fused, pieces)
    qkv64 = torch.randn(B, T, 3, H, hd, dtype=torch.float64).permute(2, 0, 3, 1, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _QKNormRope.apply(t, cos.double(), sin.double()), (qkv64,))


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_kv_cache_decode_equals_full_forward(chunk):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (3, TINY.context))
    full = model(tokens)
    cache = model.new_kv_cache(3)
    parts = [model(tokens[:, i:i + chunk], cache=cache) for i in range(0, TINY.context, chunk)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == TINY.context


def test_eager_decode_reads_only_the_written_cache_slots():
    """An int-position cache is read up to its position only (not the whole context behind a mask): unwritten
    slots full of NaN leave every chunk's logits equal to the full forward."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.context))
    cache = model.new_kv_cache(2)
    for buf in cache.keys + cache.values:
        buf.fill_(float("nan"))
    with torch.no_grad():
        parts = [model(tokens[:, i:i + 5], cache=cache) for i in range(0, TINY.context, 5)]
        torch.testing.assert_close(torch.cat(parts, 1), model(tokens), atol=1e-5, rtol=1e-5)


def test_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    a = torch.randint(0, TINY.vocab_size, (1, 10))
    b = a.clone()
    b[0, 7] = (b[0, 7] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(a)[:, :7], model(b)[:, :7])
    assert not torch.allclose(model(a)[:, 7:], model(b)[:, 7:])


def test_too_long_and_bad_config():
    model = GPT(TINY)
    with pytest.raises(SelfReplayError, match="context"):
        model(torch.zeros(1, TINY.context + 1, dtype=torch.long))
    with pytest.raises(SelfReplayError, match="multiple"):
        GPT(ModelConfig(d_model=60, head_dim=16))
