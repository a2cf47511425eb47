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
