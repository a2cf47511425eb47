import numpy as np
import pytest
import torch

from selfreplay.losses import (divergence_loss, next_token_loss, token_divergence, token_nll, topk_logprobs)


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


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_matches_float64_reference(kind):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g) * 3
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    got = token_divergence(student, torch.log_softmax(teacher, -1), kind, beta=0.3)
    want = _reference(student.numpy(), teacher.numpy(), kind, beta=0.3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # the loss averages positions 0..T-2 (the last position has no target)
    loss = divergence_loss(student, torch.log_softmax(teacher, -1), (2, 5), kind=kind, beta=0.3)
    assert loss.item() == pytest.approx(want[:, :-1].mean(), rel=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_zero_with_zero_gradient_when_student_equals_teacher(kind):
    logits = torch.randn(3, 6, 13, dtype=torch.float64)
    student = logits.clone().requires_grad_(True)
    loss = divergence_loss(student, torch.log_softmax(logits, -1), (3, 6), kind=kind)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert student.grad.abs().max().item() < 1e-6


def test_divergence_sends_no_gradient_to_teacher():
    student = torch.randn(2, 4, 7, requires_grad=True)
    teacher = torch.randn(2, 4, 7, requires_grad=True)
    divergence_loss(student, torch.log_softmax(teacher, -1).detach(), (2, 4)).backward()
    assert teacher.grad is None and student.grad is not None


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
    assert next_token_loss(logits, tokens, mask).item() == pytest.approx(nll[0, 1:3].mean().item(), rel=1e-6)


def test_topk_kl_is_a_lower_bound_that_tightens():
    g = torch.Generator().manual_seed(3)
    teacher = torch.log_softmax(torch.randn(2, 8, 64, generator=g) * 4, -1)
    student = torch.randn(2, 8, 64, generator=g) * 4
    full = token_divergence(student, teacher)
    previous = None
    for k in (1, 4, 16, 63):
        approx = token_divergence(student, topk_logprobs(teacher, k))
        error = full - approx
        assert (error >= -1e-5).all()
        if previous is not None:
            assert error.mean() <= previous + 1e-6
        previous = error.mean()
    assert previous < 1e-3


# --- chunked (bounded-memory) losses from hidden states ---------------------------------------------------------

from selfreplay.losses import chunked_divergence_loss, chunked_next_token_loss  # noqa: E402


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
    mask = torch.rand(B, T, generator=g) > 0.3
    return hidden, head, teacher_hidden, teacher_head, tokens, mask


def _value_and_grads(loss, hidden, head):
    hidden.grad, head.weight.grad = None, None
    loss.backward()
    return loss.item(), hidden.grad.clone(), head.weight.grad.clone()


def _assert_same(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_divergence_equals_unchunked_value_and_gradient(kind, chunk_size, masked):
    hidden, head, teacher_hidden, teacher_head, tokens, mask = _hidden_setup()
    mask = mask if masked else None
    teacher_logprobs = torch.log_softmax(teacher_head(teacher_hidden).detach(), -1)
    want = _value_and_grads(divergence_loss(head(hidden), teacher_logprobs, tokens.shape, mask, kind, beta=0.3),
                            hidden, head)
    got = _value_and_grads(chunked_divergence_loss(hidden, head, tokens, teacher_hidden=teacher_hidden,
                                                   teacher_head=teacher_head, loss_mask=mask, divergence=kind,
                                                   jsd_beta=0.3, chunk_size=chunk_size), hidden, head)
    _assert_same(got, want)
    assert teacher_head.weight.grad is None  # the teacher is frozen


@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_chunked_divergence_from_precomputed_teacher_logprobs(chunk_size):
    hidden, head, teacher_hidden, teacher_head, tokens, mask = _hidden_setup(seed=1)
    full = torch.log_softmax(teacher_head(teacher_hidden).detach(), -1)
    for teacher in (full, topk_logprobs(full, 4)):
        want = _value_and_grads(divergence_loss(head(hidden), teacher, tokens.shape, mask), hidden, head)
        got = _value_and_grads(chunked_divergence_loss(hidden, head, tokens, teacher_logprobs=teacher,
                                                       loss_mask=mask, chunk_size=chunk_size), hidden, head)
        _assert_same(got, want)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_next_token_loss_equals_unchunked_with_softcapped_head(chunk_size):
    hidden, head, _, _, tokens, mask = _hidden_setup(seed=2)

    def softcapped(h):  # a head that is a function, not a module (e.g. Gemma's logit softcapping)
        return 5.0 * torch.tanh(head(h) / 5.0)

    for m in (None, mask):
        want = _value_and_grads(next_token_loss(softcapped(hidden), tokens, m), hidden, head)
        got = _value_and_grads(chunked_next_token_loss(hidden, softcapped, tokens, m, chunk_size=chunk_size),
                               hidden, head)
        _assert_same(got, want)


def test_chunked_losses_never_hold_full_vocabulary_logits_for_the_batch():
    B, T, D, V, chunk = 4, 33, 8, 257, 16
    hidden, head, teacher_hidden, teacher_head, tokens, _ = _hidden_setup(seed=3, B=B, T=T, D=D, V=V)
    rows_seen = []

    def recording_head(h):
        rows_seen.append(h.shape[0])
        return head(h)

    saved_sizes = []

    def pack(t):
        saved_sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_divergence_loss(hidden, recording_head, tokens, teacher_hidden=teacher_hidden,
                                       teacher_head=teacher_head, chunk_size=chunk)
        loss = loss + chunked_next_token_loss(hidden, recording_head, tokens, chunk_size=chunk)
    loss.backward()  # backward recomputes the logits one chunk at a time
    assert max(rows_seen) == chunk and len(rows_seen) == 4 * -(-B * (T - 1) // chunk)
    assert max(saved_sizes) < chunk * V < B * T * V  # only hidden-sized inputs are kept for backward


def test_chunked_losses_with_no_counted_position_are_zero_and_differentiable():
    hidden, head, teacher_hidden, teacher_head, tokens, _ = _hidden_setup(seed=4)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss = chunked_next_token_loss(hidden, head, tokens, mask) + chunked_divergence_loss(
        hidden, head, tokens, teacher_hidden=teacher_hidden, teacher_head=teacher_head, loss_mask=mask)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_chunked_divergence_needs_exactly_one_teacher():
    hidden, head, teacher_hidden, teacher_head, tokens, _ = _hidden_setup(seed=5)
    with pytest.raises(ValueError, match="either"):
        chunked_divergence_loss(hidden, head, tokens)
    with pytest.raises(ValueError, match="either"):
        chunked_divergence_loss(hidden, head, tokens, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                                teacher_logprobs=torch.zeros(3, 9, 13))


def test_chunked_losses_on_a_hugging_face_model_match_its_logits():
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_llama

    student, teacher = tiny_llama(50, seed=0), tiny_llama(50, seed=1)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = student.model(input_ids=tokens).last_hidden_state  # after the final norm
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=tokens).last_hidden_state
        teacher_logprobs = torch.log_softmax(teacher(input_ids=tokens).logits, -1)
    logits = student(input_ids=tokens).logits
    want = next_token_loss(logits, tokens) + divergence_loss(logits, teacher_logprobs, tokens.shape)
    got = chunked_next_token_loss(hidden, student.lm_head, tokens, chunk_size=5) + chunked_divergence_loss(
        hidden, student.lm_head, tokens, teacher_hidden=teacher_hidden, teacher_head=teacher.lm_head, chunk_size=5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (grad_want,) = torch.autograd.grad(want, student.lm_head.weight)
    (grad_got,) = torch.autograd.grad(got, student.lm_head.weight)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-6)
