"""The sampler (selfreplay.replay.sampling): determinism, prompts and lengths, greedy limits, EOS stopping, kept
teacher targets (logits, normalised at use), static decoding, either model kind."""

import pytest
import torch

from selfreplay.errors import SelfReplayError
from selfreplay.models.builtin import StaticDecoder, wrap_gpt
from selfreplay.models.gpt import GPT, GPTConfig
from reference import divergence_loss
from selfreplay.replay.losses import TopKTargets
from selfreplay.replay.prompts import eos_loss_mask
from selfreplay.replay.sampling import (Sampler, Samples, choose_tokens, derive_seed, filter_logits, make_generator,
                                        sample_rows)

V, T = 48, 20


def tiny_gpt(seed: int = 0, layers: int = 2) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(d_model=32, n_layers=layers, head_dim=16, context=T, vocab_size=V)).eval()


def prompts(rows: int = 6, domain: int = 0) -> torch.Tensor:
    return torch.full((rows, 1), domain, dtype=torch.long)


def gen(seed: int) -> torch.Generator:
    return make_generator(seed, 0, "cpu")


def sample(net: GPT, p: torch.Tensor, length: int, decode: str = "eager", **kw) -> Samples:
    return Sampler(wrap_gpt(net), decode).sample(p, length, **kw)


def test_same_seed_same_samples_different_seed_different():
    m = tiny_gpt()
    a = sample(m, prompts(), T, generator=gen(1)).tokens
    b = sample(m, prompts(), T, generator=gen(1)).tokens
    c = sample(m, prompts(), T, generator=gen(2)).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # stream seeds: nearby (seed, index) pairs are far apart, and the same pair is always the same seed
    assert derive_seed(1, 0) == derive_seed(1, 0) != derive_seed(1, 1) != derive_seed(2, 0)
    assert 0 <= derive_seed(2 ** 40, 7) < 2 ** 63


def test_samples_start_with_prompt_and_have_requested_length():
    m = tiny_gpt()
    p = torch.tensor([[3], [5], [3], [7]])
    s = sample(m, p, 12, generator=gen(0))
    assert s.tokens.shape == (4, 12) and s.tokens.dtype == torch.long and len(s) == 4
    assert torch.equal(s.tokens[:, 0], p[:, 0])
    assert s.loss_mask is None  # EOS ignored, one-token prompt: every token counts
    assert s.teacher_targets is None  # not asked for
    two = torch.tensor([[1, 9], [2, 8]])
    s2 = sample(m, two, T, generator=gen(0))
    assert s2.tokens.shape == (2, T) and torch.equal(s2.tokens[:, :2], two)
    assert int(s2.tokens.max()) < V
    # a multi-token prompt is not a target
    assert s2.loss_mask is not None and torch.all(s2.loss_mask[:, :2] == 0) and torch.all(s2.loss_mask[:, 2:] == 1)


def test_near_zero_temperature_and_top_k_1_equal_greedy():
    m = tiny_gpt()
    greedy = sample(m, prompts(), T, temperature=0).tokens
    with torch.no_grad():  # greedy: every sampled token is the argmax of a forward pass over the row
        assert torch.equal(greedy[:, 1:], m(greedy)[:, :-1].argmax(-1))
    assert torch.equal(sample(m, prompts(), T, temperature=1e-6, generator=gen(3)).tokens, greedy)
    assert torch.equal(sample(m, prompts(), T, top_k=1, generator=gen(4)).tokens, greedy)
    assert torch.equal(sample(m, prompts(), T, top_p=1e-9, generator=gen(5)).tokens, greedy)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, True, False, True]]
    assert torch.equal(filter_logits(logits, top_k=4, top_p=1.0), logits)


def test_sample_rows_inverts_the_cumulative_weights_and_never_picks_a_zero_weight():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]] * 6)  # cumulative 0, 1, 1, 4, 4 (any scale)
    below_one = 1.0 - 2.0 ** -53  # the largest float64 uniform
    uniforms = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.9, below_one], dtype=torch.float64)
    assert sample_rows(weights, uniforms).tolist() == [1, 1, 3, 3, 3, 3]
    assert sample_rows(weights.half(), uniforms).tolist() == [1, 1, 3, 3, 3, 3]


def test_sampled_tokens_follow_the_tempered_filtered_softmax():
    """200k draws of 8 categories: every frequency within 4.5 standard errors of its probability (seeded)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    n, g = 200_000, make_generator(0, 0, "cpu")
    for temperature, top_k, allowed in ((1.0, None, 8), (0.5, 3, 3)):
        drawn = choose_tokens(logits.expand(n, 8), temperature, top_k, None, g)
        probs = torch.softmax(filter_logits(logits / temperature, top_k), -1).double()
        freq = torch.bincount(drawn, minlength=8).double() / n
        assert int((freq > 0).sum()) == allowed
        assert torch.all((freq - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-12)


def test_eos_stop_pads_and_masks_after_first_eos():
    m = tiny_gpt()
    free = sample(m, prompts(16), T, generator=gen(7)).tokens
    # the token that ends most rows early makes a good "EOS"
    body = free[:, 1:]
    eos = int(torch.mode(body[:, :T // 2].reshape(-1)).values)
    s = sample(m, prompts(16), T, eos_id=eos, pad_id=V - 1, generator=gen(7))
    assert s.loss_mask is not None and s.loss_mask.shape == s.tokens.shape
    stopped = 0
    for row_free, row, mask in zip(free, s.tokens, s.loss_mask):
        hits = (row_free[1:] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else T - 1  # index of the first sampled EOS
        assert torch.equal(row[:end + 1], row_free[:end + 1])  # same draws up to and including EOS
        assert torch.all(row[end + 1:] == V - 1)
        assert mask[0] == 0  # the prompt is never a target
        assert torch.all(mask[1:end + 1] == 1) and torch.all(mask[end + 1:] == 0)
        stopped += end < T - 1
    assert stopped >= 4
    assert torch.equal(eos_loss_mask(s.tokens, eos), s.loss_mask)


def test_eos_stop_ends_early_when_every_row_ended():
    m = tiny_gpt()
    greedy = sample(m, prompts(3), T, temperature=0).tokens
    eos = int(greedy[0, 1])  # every greedy row samples it first
    s = sample(m, prompts(3), T, temperature=0, eos_id=eos, pad_id=V - 1)
    assert torch.all(s.tokens[:, 1] == eos) and torch.all(s.tokens[:, 2:] == V - 1)
    assert s.loss_mask[:, 1].tolist() == [1, 1, 1] and s.loss_mask[:, 2:].sum() == 0


def test_eos_as_prompt_token_does_not_end_the_row():
    m = tiny_gpt()
    s = sample(m, prompts(4, domain=2), T, eos_id=2, generator=gen(1))
    assert torch.all(s.loss_mask[:, 0] == 0) and torch.all(s.loss_mask[:, 1] == 1)
    assert torch.equal(eos_loss_mask(s.tokens, 2), s.loss_mask)


def _teacher_logprobs(m: GPT, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(m(tokens).float(), dim=-1)


def test_kept_targets_equal_a_teacher_forward_and_give_the_same_kl_and_gradient():
    teacher, student = tiny_gpt(0), tiny_gpt(1).train()
    s = sample(teacher, prompts(5), T, generator=gen(0), keep_targets=True)
    recomputed = _teacher_logprobs(teacher, s.tokens)
    assert s.teacher_targets.shape == (5, T, V)  # logits, normalised at use
    torch.testing.assert_close(torch.log_softmax(s.teacher_targets[:, :-1].float(), -1), recomputed[:, :-1],
                               atol=1e-5, rtol=1e-5)
    assert torch.all(s.teacher_targets[:, -1] == 0)  # last position has no target
    # keeping targets does not change the samples
    assert torch.equal(s.tokens, sample(teacher, prompts(5), T, generator=gen(0)).tokens)

    def loss_and_grads(targets):
        student.zero_grad()
        loss = divergence_loss(student(s.tokens), targets, s.tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    loss_a, grads_a = loss_and_grads(s.teacher_targets)
    loss_b, grads_b = loss_and_grads(recomputed)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_kept_targets_of_a_multi_token_prompt_skip_the_prompt():
    teacher = tiny_gpt(0)
    two = torch.tensor([[1, 9], [2, 8], [3, 7]])
    s = sample(teacher, two, T, generator=gen(4), keep_targets=True)
    recomputed = _teacher_logprobs(teacher, s.tokens)
    assert torch.all(s.teacher_targets[:, 0] == 0)  # predicts a prompt token: never a target
    torch.testing.assert_close(torch.log_softmax(s.teacher_targets[:, 1:-1], -1), recomputed[:, 1:-1],
                               atol=1e-5, rtol=1e-5)


def test_kept_targets_with_eos_mask_give_the_same_masked_kl():
    teacher, student = tiny_gpt(0), tiny_gpt(1)
    free = sample(teacher, prompts(8), T, generator=gen(2)).tokens
    eos = int(torch.mode(free[:, 1:T // 2].reshape(-1)).values)
    s = sample(teacher, prompts(8), T, eos_id=eos, generator=gen(2), keep_targets=True)
    recomputed = _teacher_logprobs(teacher, s.tokens)
    with torch.no_grad():
        logits = student(s.tokens)
    a = divergence_loss(logits, s.teacher_targets, s.tokens, s.loss_mask)
    b = divergence_loss(logits, recomputed, s.tokens, s.loss_mask)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_topk_targets_are_the_top_of_the_full_ones():
    m = tiny_gpt()
    full = sample(m, prompts(3), T, generator=gen(0), keep_targets=True).teacher_targets
    top = sample(m, prompts(3), T, generator=gen(0), keep_targets=True, targets_top_k=5).teacher_targets
    assert isinstance(top, TopKTargets) and top.values.shape == (3, T, 5) and top.indices.dtype == torch.long
    assert top.values.dtype == torch.float32
    ref_values, ref_indices = torch.log_softmax(full[:, :-1].float(), -1).topk(5, dim=-1)
    torch.testing.assert_close(top.values[:, :-1], ref_values)
    assert torch.equal(top.indices[:, :-1], ref_indices)
    half = sample(m, prompts(3), T, generator=gen(0), keep_targets=True, targets_dtype=torch.float16)
    assert half.teacher_targets.dtype == torch.float16
    everything = sample(m, prompts(3), T, generator=gen(0), keep_targets=True, targets_top_k=V + 10)
    assert everything.teacher_targets.values.shape == (3, T, V)  # k capped at the vocabulary


def test_samples_rows_slice_tokens_mask_and_targets():
    m = tiny_gpt()
    s = sample(m, torch.tensor([[1, 2]] * 4), 8, generator=gen(0), keep_targets=True, targets_top_k=2)
    part = s.rows(1, 3)
    assert torch.equal(part.tokens, s.tokens[1:3]) and torch.equal(part.loss_mask, s.loss_mask[1:3])
    assert torch.equal(part.teacher_targets.values, s.teacher_targets.values[1:3])


def test_static_decoder_matches_eager_sampling():
    m = tiny_gpt()
    sampler = Sampler(wrap_gpt(m), "static")
    assert sampler.mode("cpu") == "static"
    eager = sample(m, prompts(4), T, generator=gen(9), keep_targets=True)
    for _ in range(2):  # the second call reuses the decoder (stale cache slots are masked)
        static = sampler.sample(prompts(4), T, generator=gen(9), keep_targets=True)
        assert torch.equal(static.tokens, eager.tokens)
        torch.testing.assert_close(static.teacher_targets, eager.teacher_targets, atol=1e-5, rtol=1e-5)
    two = torch.tensor([[1, 9], [2, 8]])
    torch.testing.assert_close(Sampler(wrap_gpt(m), "static").sample(two, 8, temperature=0).tokens,
                               sample(m, two, 8, temperature=0).tokens)


def test_static_decoder_returns_the_models_logits():
    m = tiny_gpt()
    tokens = sample(m, prompts(2), 6, temperature=0).tokens
    decoder = StaticDecoder(m, 2)
    with torch.no_grad():
        full = m(tokens)
        for t in range(6):
            step = decoder(tokens[:, t:t + 1], torch.full((1,), t))
            torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)


def test_static_decoder_traces_as_one_graph_for_every_position():
    """What CUDA graphs need: a full graph, no recompilation as the position advances (checked on CPU)."""
    import torch._dynamo

    m = tiny_gpt(layers=1)
    decoder = StaticDecoder(m, 2)
    step = torch.compile(decoder, backend="eager", fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(4):
            step(torch.zeros(2, 1, dtype=torch.long), torch.full((1,), t))


def test_compiled_decoding_off_cuda_is_one_graph_reading_only_the_written_slots(monkeypatch):
    """decode=compiled on a CPU: one graph (a dynamic length) for every position after the first, reading only the
    cache slots written so far (NaN in the others changes nothing), drawing what eager decoding draws. Traced by
    dynamo with the eager backend: the same graph without inductor's compile time."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    m = tiny_gpt()
    two = torch.tensor([[1, 9], [2, 8], [3, 7]])
    eager = sample(m, two, T, generator=gen(9), keep_targets=True)
    sampler = Sampler(wrap_gpt(m), "compiled")
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        compiled = sampler.sample(two, T, generator=gen(9), keep_targets=True)
        assert torch.equal(compiled.tokens, eager.tokens)
        torch.testing.assert_close(compiled.teacher_targets, eager.teacher_targets, atol=1e-5, rtol=1e-5)
        cache = sampler.model.adapter._decoders[(id(m), "compiled", 3, None)]._orig_mod.cache
        for buf in cache.keys + cache.values:  # the next refill's cache: unwritten slots full of NaN
            buf.fill_(float("nan"))
    assert counters["stats"]["unique_graphs"] == 1


def test_auto_decoding_is_eager_on_cpu_and_unknown_modes_are_errors():
    m = wrap_gpt(tiny_gpt())
    assert Sampler(m).mode("cpu") == "eager"
    with pytest.raises(SelfReplayError, match="decode"):
        Sampler(m, "fast")


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"targets_top_k": 0, "keep_targets": True}, "top_k=0"),
])
def test_bad_sampling_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(SelfReplayError, match=match) as e:
        sample(tiny_gpt(), prompts(2), 6, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_lengths_are_errors():
    m = tiny_gpt()
    with pytest.raises(SelfReplayError, match="prompt length"):
        sample(m, torch.zeros(2, 5, dtype=torch.long), 4)
    with pytest.raises(SelfReplayError, match="context"):
        sample(m, prompts(2), T + 1)
    with pytest.raises(SelfReplayError, match="prompts"):
        sample(m, torch.zeros(4, dtype=torch.long), 4)


# --- Hugging Face models through the same sampler ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_llama, tiny_tokenizer

    from selfreplay.models.core import CausalLM
    from selfreplay.models.hf import HF_ADAPTER

    return CausalLM(tiny_llama(len(tiny_tokenizer()), seed=1), HF_ADAPTER).requires_grad_(False)


def test_hf_temperature_zero_is_greedy(hf_model):
    bos = torch.zeros(2, 1, dtype=torch.long)  # the tiny tokenizer's <s>
    tokens = Sampler(hf_model).sample(bos, 6, temperature=0).tokens
    with torch.no_grad():
        logits = hf_model(tokens)
    assert tokens.shape == (2, 6)
    assert torch.equal(tokens[:, 1:], logits[:, :-1].argmax(-1))


def test_hf_kept_targets_equal_a_forward_and_seeds_repeat(hf_model):
    bos = torch.zeros(3, 1, dtype=torch.long)
    sampler = Sampler(hf_model)
    s = sampler.sample(bos, 7, generator=gen(3), keep_targets=True)
    assert torch.equal(s.tokens, sampler.sample(bos, 7, generator=gen(3)).tokens)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(s.tokens).float(), -1)
    torch.testing.assert_close(torch.log_softmax(s.teacher_targets[:, :-1], -1), ref[:, :-1], atol=1e-5, rtol=1e-5)
    assert torch.all(s.teacher_targets[:, -1] == 0)


def test_hf_models_decode_eagerly_only(hf_model):
    assert Sampler(hf_model).mode("cpu") == "eager"
    with pytest.raises(SelfReplayError, match="eager"):
        Sampler(hf_model, "static").mode("cpu")
