"""The sampler: determinism, prompts and lengths, greedy limits, EOS stopping, reused teacher log-probs."""

import pytest
import torch

from selfreplay.config import ModelConfig
from selfreplay.errors import SelfReplayError
from selfreplay.losses import TopKLogprobs, divergence_loss, token_divergence, topk_logprobs
from selfreplay.model import GPT
from selfreplay.replay import eos_loss_mask
from selfreplay.sampling import Sampler, StaticDecoder, make_generator, sample

V, T = 48, 20


def tiny_gpt(seed: int = 0, layers: int = 2) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(d_model=32, n_layers=layers, head_dim=16, context=T, vocab_size=V)).eval()


def prompts(rows: int = 6, domain: int = 0) -> torch.Tensor:
    return torch.full((rows, 1), domain, dtype=torch.long)


def gen(seed: int) -> torch.Generator:
    return make_generator(seed, 0, "cpu")


def test_same_seed_same_samples_different_seed_different():
    m = tiny_gpt()
    a = sample(m, prompts(), T, generator=gen(1)).tokens
    b = sample(m, prompts(), T, generator=gen(1)).tokens
    c = sample(m, prompts(), T, generator=gen(2)).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_start_with_prompt_and_have_requested_length():
    m = tiny_gpt()
    p = torch.tensor([[3], [5], [3], [7]])
    s = sample(m, p, 12, generator=gen(0))
    assert s.tokens.shape == (4, 12) and s.tokens.dtype == torch.long
    assert torch.equal(s.tokens[:, 0], p[:, 0])
    assert s.loss_mask is None  # EOS ignored: every token counts
    two = torch.tensor([[1, 9], [2, 8]])
    s2 = sample(m, two, T, generator=gen(0))
    assert s2.tokens.shape == (2, T) and torch.equal(s2.tokens[:, :2], two)
    assert int(s2.tokens.max()) < V


def test_near_zero_temperature_and_top_k_1_equal_greedy():
    m = tiny_gpt()
    greedy = sample(m, prompts(), T, temperature=0).tokens
    assert torch.equal(sample(m, prompts(), T, temperature=1e-6, generator=gen(3)).tokens, greedy)
    assert torch.equal(sample(m, prompts(), T, top_k=1, generator=gen(4)).tokens, greedy)
    assert torch.equal(sample(m, prompts(), T, top_p=1e-9, generator=gen(5)).tokens, greedy)


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
        assert torch.all(mask[:end + 1] == 1) and torch.all(mask[end + 1:] == 0)
        stopped += end < T - 1
    assert stopped >= 4
    assert torch.equal(eos_loss_mask(s.tokens, eos), s.loss_mask)


def test_eos_as_prompt_token_does_not_end_the_row():
    m = tiny_gpt()
    s = sample(m, prompts(4, domain=2), T, eos_id=2, generator=gen(1))
    assert torch.all(s.loss_mask[:, :2] == 1)


def test_reused_logprobs_equal_a_teacher_forward_and_give_the_same_kl_and_gradient():
    teacher, student = tiny_gpt(0), tiny_gpt(1).train()
    s = sample(teacher, prompts(5), T, generator=gen(0), return_logprobs=True)
    with torch.no_grad():
        recomputed = torch.log_softmax(teacher(s.tokens).float(), dim=-1)
    assert s.teacher_logprobs.shape == (5, T, V)
    torch.testing.assert_close(s.teacher_logprobs[:, :-1], recomputed[:, :-1], atol=1e-5, rtol=1e-5)
    assert torch.all(s.teacher_logprobs[:, -1] == 0)  # last position has no target

    def loss_and_grads(targets):
        student.zero_grad()
        loss = divergence_loss(student(s.tokens), targets, s.tokens.shape)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    loss_a, grads_a = loss_and_grads(s.teacher_logprobs)
    loss_b, grads_b = loss_and_grads(recomputed)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_reused_logprobs_with_eos_mask_give_the_same_masked_kl():
    teacher, student = tiny_gpt(0), tiny_gpt(1)
    free = sample(teacher, prompts(8), T, generator=gen(2)).tokens
    eos = int(torch.mode(free[:, 1:T // 2].reshape(-1)).values)
    s = sample(teacher, prompts(8), T, eos_id=eos, generator=gen(2), return_logprobs=True)
    with torch.no_grad():
        recomputed = torch.log_softmax(teacher(s.tokens).float(), dim=-1)
        logits = student(s.tokens)
    a = divergence_loss(logits, s.teacher_logprobs, s.tokens.shape, s.loss_mask)
    b = divergence_loss(logits, recomputed, s.tokens.shape, s.loss_mask)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_topk_logprobs_are_the_top_of_the_full_ones():
    m = tiny_gpt()
    full = sample(m, prompts(3), T, generator=gen(0), return_logprobs=True).teacher_logprobs
    top = sample(m, prompts(3), T, generator=gen(0), return_logprobs=True, logprobs_top_k=5).teacher_logprobs
    assert isinstance(top, TopKLogprobs) and top.values.shape == (3, T, 5) and top.indices.dtype == torch.long
    ref = topk_logprobs(full[:, :-1], 5)
    torch.testing.assert_close(top.values[:, :-1], ref.values)
    assert torch.equal(top.indices[:, :-1], ref.indices)
    half = sample(m, prompts(3), T, generator=gen(0), return_logprobs=True, logprobs_dtype=torch.float16)
    assert half.teacher_logprobs.dtype == torch.float16


def test_topk_kl_is_a_lower_bound_whose_error_shrinks_with_k():
    """Merging the teacher's tail into one bucket under-estimates KL(teacher||student), less as k grows."""
    g = torch.Generator().manual_seed(0)
    vocab = 64
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(4 * 8)]).view(4, 8, vocab) + 1.0
    teacher = torch.log_softmax(-2.0 * ranks.log(), dim=-1)  # Zipf(2): a peaked teacher
    student_logits = teacher + 0.5 * torch.randn(teacher.shape, generator=g)
    full = token_divergence(student_logits, teacher)
    errors = []
    for k in (1, 2, 4, 8, 16, 32, vocab):
        approx = token_divergence(student_logits, topk_logprobs(teacher, k))
        err = full - approx
        assert torch.all(err >= -1e-5), k  # float32 rounding of the tail mass
        errors.append(float(err.mean()))
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5  # k = V is exact
    assert errors[3] < 0.25 * float(full.mean())  # k=8 already captures most of the KL of a peaked teacher
    assert errors[5] < 0.05 * float(full.mean())


def test_static_decoder_matches_eager_sampling():
    m = tiny_gpt()
    sampler = Sampler(m, "static")
    eager = sample(m, prompts(4), T, generator=gen(9), return_logprobs=True)
    for _ in range(2):  # the second call reuses the decoder (stale cache slots are masked)
        static = sampler.sample(prompts(4), T, generator=gen(9), return_logprobs=True)
        assert torch.equal(static.tokens, eager.tokens)
        torch.testing.assert_close(static.teacher_logprobs, eager.teacher_logprobs, atol=1e-5, rtol=1e-5)
    two = torch.tensor([[1, 9], [2, 8]])
    torch.testing.assert_close(Sampler(m, "static").sample(two, 8, temperature=0).tokens,
                               sample(m, two, 8, temperature=0).tokens)


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


def test_compiled_decoding_needs_cuda_and_auto_is_eager_on_cpu():
    m = tiny_gpt()
    with pytest.raises(SelfReplayError, match="CUDA"):
        Sampler(m, "compiled").sample(prompts(2), 4)
    assert Sampler(m).mode("cpu") == "eager"
    with pytest.raises(SelfReplayError, match="decode"):
        Sampler(m, "fast")


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"logprobs_top_k": 0, "return_logprobs": True}, "logprobs_top_k"),
])
def test_bad_sampling_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(SelfReplayError, match=match):
        sample(tiny_gpt(), prompts(2), 6, **kwargs)


def test_bad_lengths_are_errors():
    m = tiny_gpt()
    with pytest.raises(SelfReplayError, match="prompt length"):
        sample(m, torch.zeros(2, 5, dtype=torch.long), 4)
    with pytest.raises(SelfReplayError, match="context"):
        sample(m, prompts(2), T + 1)
