"""Losses (selfreplay.replay.losses): divergences against a float64 reference, next-token loss, top-k targets, and
the chunked sums from hidden states (equal to the unchunked losses in value and gradient, bounded memory)."""

import numpy as np
import pytest
import torch

from selfreplay.data.batch import Batch
from reference import divergence_loss, next_token_loss
from selfreplay.replay.losses import (TopKTargets, divergence_sum, from_paper_convention, ntp_sum, to_paper_convention,
                                      token_divergence, token_nll)


def _log_softmax64(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(student, teacher, kind, beta=0.5):
    """Independent float64 numpy computation of the per-position divergences."""
    s, t = _log_softmax64(student), _log_softmax64(teacher)
    ps, pt = np.exp(s), np.exp(t)
    if kind == "forward_kl":
        return (pt * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (ps * (s - t)).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (t - np.log(m))).sum(-1) + (1 - beta) * (ps * (s - np.log(m))).sum(-1)


def topk(teacher_logits: torch.Tensor, k: int) -> TopKTargets:
    """The k largest teacher log-probs per position (what the sampler / a replay corpus keeps)."""
    values, indices = torch.log_softmax(teacher_logits.float(), -1).topk(k, dim=-1)
    return TopKTargets(values, indices)


def _tokens(B, T, V=7):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(99))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_matches_float64_reference(kind):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g) * 3
    teacher = torch.randn(2, 5, 11, generator=g) * 3  # teacher targets are logits, normalised at use
    got = token_divergence(student, teacher, kind, beta=0.3)
    want = _reference(student.numpy(), teacher.numpy(), kind, beta=0.3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # log-probs are logits too: the same divergence
    np.testing.assert_allclose(token_divergence(student, torch.log_softmax(teacher, -1), kind, beta=0.3).numpy(),
                               want, rtol=1e-5, atol=1e-6)
    # the loss averages positions 0..T-2 (the last position has no target)
    loss = divergence_loss(student, teacher, _tokens(2, 5), kind=kind, beta=0.3)
    assert loss.item() == pytest.approx(want[:, :-1].mean(), rel=1e-5)


def test_teacher_logits_are_normalised_at_use_in_any_dtype():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 6, 13, generator=g) * 2
    teacher = torch.randn(2, 6, 13, generator=g) * 2
    want = token_divergence(student, teacher)
    shifted = teacher + torch.randn(2, 6, 1, generator=g) * 50  # a per-position constant: same distribution
    torch.testing.assert_close(token_divergence(student, shifted), want, rtol=1e-4, atol=1e-5)
    half = teacher.to(torch.bfloat16)  # stored as computed under autocast; used in float32
    got = token_divergence(student, half)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, token_divergence(student, half.float()))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_zero_with_zero_gradient_when_student_equals_teacher(kind):
    logits = torch.randn(3, 6, 13, dtype=torch.float64)
    student = logits.clone().requires_grad_(True)
    loss = divergence_loss(student, logits, _tokens(3, 6), kind=kind)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert student.grad.abs().max().item() < 1e-6


def test_divergence_sends_no_gradient_to_teacher():
    student = torch.randn(2, 4, 7, requires_grad=True)
    teacher = torch.randn(2, 4, 7, requires_grad=True)
    divergence_loss(student, teacher.detach(), _tokens(2, 4)).backward()
    assert teacher.grad is None and student.grad is not None


def test_divergence_loss_mask_selects_target_tokens():
    g = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(1, 5, 7, generator=g), torch.randn(1, 5, 7, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 2 and 3 are targets -> positions 1 and 2
    per_position = token_divergence(student, teacher)
    got = divergence_loss(student, teacher, _tokens(1, 5), mask)
    assert got.item() == pytest.approx(per_position[0, 1:3].mean().item(), rel=1e-6)


def test_unknown_divergence_and_topk_with_another_divergence_are_errors():
    student, teacher = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="divergence"):
        token_divergence(student, teacher, "hellinger")
    with pytest.raises(ValueError, match="forward_kl"):
        token_divergence(student, topk(teacher, 2), "jsd")
    hidden, head = torch.randn(1, 3, 4), torch.nn.Linear(4, 5, bias=False)
    with pytest.raises(ValueError, match="divergence"):
        divergence_sum(hidden, head, _tokens(1, 3, 5), Batch(_tokens(1, 3, 5)).mask(), teacher=teacher, kind="x")
    with pytest.raises(ValueError, match="forward_kl"):
        divergence_sum(hidden, head, _tokens(1, 3, 5), Batch(_tokens(1, 3, 5)).mask(), teacher=topk(teacher, 2),
                       kind="reverse_kl")


def test_next_token_loss_shifts_labels_by_one():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g)
    tokens = torch.randint(0, 9, (2, 6), generator=g)
    logp = _log_softmax64(logits.numpy())
    want = -np.mean([logp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(5)])
    assert next_token_loss(logits, tokens).item() == pytest.approx(want, rel=1e-6)


def test_loss_mask_selects_target_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 5, 7, generator=g)
    tokens = torch.randint(0, 7, (1, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0]])  # only tokens 2 and 3 are targets -> positions 1 and 2
    nll = token_nll(logits, tokens)
    assert nll.shape == (1, 4)
    assert next_token_loss(logits, tokens, mask).item() == pytest.approx(nll[0, 1:3].mean().item(), rel=1e-6)


def test_paper_convention_round_trip():
    assert to_paper_convention(2.0, 64) == pytest.approx(2.0 * 63 / 64)
    assert from_paper_convention(to_paper_convention(3.7, 256), 256) == pytest.approx(3.7)


def test_topk_kl_is_a_lower_bound_that_tightens():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 8, 64, generator=g) * 4
    student = torch.randn(2, 8, 64, generator=g) * 4
    full = token_divergence(student, teacher)
    previous = None
    for k in (1, 4, 16, 63):
        approx = token_divergence(student, topk(teacher, k))
        error = full - approx
        assert (error >= -1e-5).all()
        if previous is not None:
            assert error.mean() <= previous + 1e-6
        previous = error.mean()
    assert previous < 1e-3


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
        approx = token_divergence(student_logits, topk(teacher, k))
        err = full - approx
        assert torch.all(err >= -1e-5), k  # float32 rounding of the tail mass
        errors.append(float(err.mean()))
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5  # k = V is exact
    assert errors[3] < 0.25 * float(full.mean())  # k=8 already captures most of the KL of a peaked teacher
    assert errors[5] < 0.05 * float(full.mean())


def test_topk_targets_move_and_slice_together():
    t = topk(torch.randn(3, 4, 9), 2)
    part = t[1:]
    assert part.values.shape == (2, 4, 2) and torch.equal(part.indices, t.indices[1:])
    moved = t.to("cpu")
    assert torch.equal(moved.values, t.values) and moved.indices.dtype == torch.long


# --- chunked (bounded-memory) sums from hidden states -----------------------------------------------------------

def _hidden_setup(seed=0, B=3, T=9, D=8, V=13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(B, T, D, generator=g)
    head = torch.nn.Linear(D, V, bias=False)
    teacher_head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
        teacher_head.weight.copy_(torch.randn(V, D, generator=g))
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    return hidden, head, teacher_hidden, teacher_head, tokens, mask


def _count(tokens, mask):
    """Number of target tokens: the sums divided by it are the mean losses."""
    return Batch(tokens, mask).num_targets().item() if mask is not None else tokens.shape[0] * (tokens.shape[1] - 1)


def _full(tokens, mask):
    return Batch(tokens, mask).mask()


def _value_and_grads(loss, hidden, head):
    hidden.grad, head.weight.grad = None, None
    loss.backward()
    return loss.item(), hidden.grad.clone(), head.weight.grad.clone()


def _assert_same(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_divergence_equals_unchunked_value_and_gradient(kind, chunk_size, masked):
    hidden, head, teacher_hidden, teacher_head, tokens, mask = _hidden_setup()
    mask = mask if masked else None
    teacher_logits = teacher_head(teacher_hidden).detach()
    want = _value_and_grads(divergence_loss(head(hidden), teacher_logits, tokens, mask, kind, beta=0.3),
                            hidden, head)
    n = _count(tokens, mask)
    got = _value_and_grads(divergence_sum(hidden, head, tokens, _full(tokens, mask), teacher_hidden=teacher_hidden,
                                          teacher_head=teacher_head, kind=kind, beta=0.3, chunk_size=chunk_size) / n,
                           hidden, head)
    _assert_same(got, want)
    assert teacher_head.weight.grad is None  # the teacher is frozen


@pytest.mark.parametrize("chunk_size", [None, 4, 1000])
def test_chunked_divergence_from_precomputed_teacher_targets(chunk_size):
    hidden, head, teacher_hidden, teacher_head, tokens, mask = _hidden_setup(seed=1)
    logits = teacher_head(teacher_hidden).detach()
    n = _count(tokens, mask)
    for teacher in (logits, logits.to(torch.bfloat16), topk(logits, 4)):
        want = _value_and_grads(divergence_loss(head(hidden), teacher, tokens, mask), hidden, head)
        got = _value_and_grads(divergence_sum(hidden, head, tokens, mask, teacher=teacher,
                                              chunk_size=chunk_size) / n, hidden, head)
        _assert_same(got, want)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_chunked_next_token_loss_equals_unchunked_with_softcapped_head(chunk_size):
    hidden, head, _, _, tokens, mask = _hidden_setup(seed=2)

    def softcapped(h):  # a head that is a function, not a module (e.g. Gemma's logit softcapping)
        return 5.0 * torch.tanh(head(h) / 5.0)

    for m in (None, mask):
        want = _value_and_grads(next_token_loss(softcapped(hidden), tokens, m), hidden, head)
        got = _value_and_grads(ntp_sum(hidden, softcapped, tokens, _full(tokens, m), chunk_size=chunk_size)
                               / _count(tokens, m), hidden, head)
        _assert_same(got, want)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_dft_weights_each_tokens_nll_by_its_detached_probability(chunk_size):
    hidden, head, _, _, tokens, mask = _hidden_setup(seed=6)
    nll = token_nll(head(hidden), tokens)
    want = (nll * torch.exp(-nll.detach()) * mask[:, 1:]).sum()
    got = ntp_sum(hidden, head, tokens, mask, chunk_size=chunk_size, dft=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (g_want,) = torch.autograd.grad(want, head.weight)
    (g_got,) = torch.autograd.grad(got, head.weight)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_chunked_losses_never_hold_full_vocabulary_logits_for_the_batch():
    B, T, D, V, chunk = 4, 33, 8, 257, 16
    hidden, head, teacher_hidden, teacher_head, tokens, _ = _hidden_setup(seed=3, B=B, T=T, D=D, V=V)
    mask = Batch(tokens).mask()
    rows_seen = []

    def recording_head(h):
        rows_seen.append(h.shape[0])
        return head(h)

    saved_sizes = []

    def pack(t):
        saved_sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = divergence_sum(hidden, recording_head, tokens, mask, teacher_hidden=teacher_hidden,
                              teacher_head=teacher_head, chunk_size=chunk)
        loss = loss + ntp_sum(hidden, recording_head, tokens, mask, chunk_size=chunk)
    loss.backward()  # backward recomputes the logits one chunk at a time
    assert max(rows_seen) == chunk and len(rows_seen) == 4 * -(-B * (T - 1) // chunk)
    assert max(saved_sizes) < chunk * V < B * T * V  # only hidden-sized inputs are kept for backward


def test_chunked_losses_skip_positions_that_do_not_count():
    hidden, head, teacher_hidden, teacher_head, tokens, mask = _hidden_setup(seed=7, B=2, T=9)
    rows_seen = []

    def recording_head(h):
        rows_seen.append(h.shape[0])
        return head(h)

    ntp_sum(hidden, recording_head, tokens, mask, chunk_size=4)
    assert sum(rows_seen) == int(mask[:, 1:].sum())


def test_chunked_losses_with_no_counted_position_are_zero_and_differentiable():
    hidden, head, teacher_hidden, teacher_head, tokens, _ = _hidden_setup(seed=4)
    mask = torch.zeros(tokens.shape)
    for chunk_size in (None, 4):
        hidden.grad = None
        loss = ntp_sum(hidden, head, tokens, mask, chunk_size=chunk_size) + divergence_sum(
            hidden, head, tokens, mask, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
            chunk_size=chunk_size)
        loss.backward()
        assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_chunked_divergence_needs_exactly_one_teacher():
    hidden, head, teacher_hidden, teacher_head, tokens, _ = _hidden_setup(seed=5)
    mask = Batch(tokens).mask()
    with pytest.raises(ValueError, match="either"):
        divergence_sum(hidden, head, tokens, mask)
    with pytest.raises(ValueError, match="either"):
        divergence_sum(hidden, head, tokens, mask, teacher=torch.zeros(3, 9, 13), teacher_hidden=teacher_hidden,
                       teacher_head=teacher_head)
    with pytest.raises(ValueError, match="either"):
        divergence_sum(hidden, head, tokens, mask, teacher_hidden=teacher_hidden)  # no head


def test_chunked_losses_on_a_hugging_face_model_match_its_logits():
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_llama

    from selfreplay.models.core import CausalLM, Teacher
    from selfreplay.models.hf import HF_ADAPTER

    student = CausalLM(tiny_llama(50, seed=0), HF_ADAPTER)
    teacher = Teacher(CausalLM(tiny_llama(50, seed=1), HF_ADAPTER).requires_grad_(False))
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = Batch(tokens).mask()
    teacher_logits = teacher(tokens)
    torch.testing.assert_close(teacher_logits, teacher.module.net(input_ids=tokens).logits)
    logits = student(tokens)
    torch.testing.assert_close(logits, student.net(input_ids=tokens).logits)
    want = next_token_loss(logits, tokens) + divergence_loss(logits, teacher_logits, tokens)
    t_hidden, t_head = teacher.hidden_and_head(tokens)
    n = _count(tokens, None)

    def sums(hidden, head):  # computed inside the model's forward (where FSDP gathers the head)
        return (ntp_sum(hidden, head, tokens, mask, chunk_size=5)
                + divergence_sum(hidden, head, tokens, mask, teacher_hidden=t_hidden, teacher_head=t_head,
                                 chunk_size=5)) / n

    got = student(tokens, head_fn=sums)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    head_weight = student.net.lm_head.weight
    (grad_want,) = torch.autograd.grad(want, head_weight)
    (grad_got,) = torch.autograd.grad(got, head_weight)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-6)
