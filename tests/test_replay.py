"""Replay sources: the self-generated buffer (refills, domain split, resume, KL targets) and stored replay."""

import json

import numpy as np
import pytest
import torch

from selfreplay.config import ModelConfig
from selfreplay.data import Corpus
from selfreplay.errors import SelfReplayError
from selfreplay.losses import TopKLogprobs
from selfreplay.model import GPT
from selfreplay.replay import ReplayBatch, SelfGeneratedReplay, StoredReplay, domain_prompts, eos_loss_mask

V, T = 48, 16


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(d_model=32, n_layers=1, head_dim=16, context=T, vocab_size=V)).eval()


def replay(teacher=None, **kw) -> SelfGeneratedReplay:
    args = dict(domains=[0], batch_size=4, buffer=3, seed=0)
    args.update(kw)
    return SelfGeneratedReplay(teacher or tiny_gpt(), **args)


def same_batch(a: ReplayBatch, b: ReplayBatch) -> bool:
    same = torch.equal(a.tokens, b.tokens) and (a.loss_mask is None) == (b.loss_mask is None)
    if a.loss_mask is not None:
        same = same and torch.equal(a.loss_mask, b.loss_mask)
    if isinstance(a.teacher_logprobs, TopKLogprobs):
        return same and torch.equal(a.teacher_logprobs.values, b.teacher_logprobs.values) and \
            torch.equal(a.teacher_logprobs.indices, b.teacher_logprobs.indices)
    if a.teacher_logprobs is not None:
        return same and torch.equal(a.teacher_logprobs, b.teacher_logprobs)
    return same and b.teacher_logprobs is None


def test_buffer_refills_every_buffer_batches():
    r = replay(buffer=3)
    seen = []
    for _ in range(7):
        batch = r.next_batch()
        assert batch.tokens.shape == (4, T)
        seen.append(r.refills)
    assert seen == [1, 1, 1, 2, 2, 2, 3]
    assert r.sample_seconds > 0
    assert same_batch(replay().next_batch(), replay().next_batch())  # deterministic by seed
    assert not torch.equal(replay().next_batch().tokens, replay(seed=1).next_batch().tokens)


def test_batches_of_one_refill_are_distinct_rows():
    r = replay(buffer=3)
    rows = torch.cat([r.next_batch().tokens for _ in range(3)])
    assert len({tuple(x) for x in rows.tolist()}) == 12


def test_domains_split_evenly_across_rows():
    r = replay(domains=[0, 1, 2], batch_size=6, buffer=2)
    for _ in range(4):
        counts = torch.bincount(r.next_batch().tokens[:, 0], minlength=3)
        assert counts.tolist() == [2, 2, 2]
    r = replay(domains=[3, 5], batch_size=3, buffer=2)
    firsts = torch.cat([r.next_batch().tokens[:, 0] for _ in range(4)])
    assert torch.bincount(firsts).tolist()[3::2] == [6, 6]  # split within one row per batch, even overall
    assert torch.equal(domain_prompts([3, 5], 1, 3)[:, 0], torch.tensor([5, 3, 5]))


@pytest.mark.parametrize("taken", [2, 3, 4])  # mid-buffer, at a refill boundary, just after one
def test_resume_from_state_dict_gives_identical_batches(taken):
    a = replay(buffer=3, logprobs_top_k=4)
    for _ in range(taken):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able, as the trainer may store it
    expected = [a.next_batch() for _ in range(4)]
    b = replay(buffer=3, logprobs_top_k=4)
    b.load_state_dict(state)
    assert b.sample_seconds == pytest.approx(state["sample_seconds"])
    for want in expected:
        assert same_batch(b.next_batch(), want)


def test_resume_with_other_settings_is_an_error():
    state = replay(seed=0).state_dict()
    with pytest.raises(SelfReplayError, match="seed"):
        replay(seed=1).load_state_dict(state)


def test_batches_carry_the_teachers_logprobs():
    teacher = tiny_gpt()
    r = replay(teacher=teacher)
    batch = r.next_batch()
    assert r.keeps_logprobs
    with torch.no_grad():
        ref = torch.log_softmax(teacher(batch.tokens).float(), -1)
    torch.testing.assert_close(batch.teacher_logprobs[:, :-1], ref[:, :-1], atol=1e-5, rtol=1e-5)
    top = replay(teacher=teacher, logprobs_top_k=3).next_batch().teacher_logprobs
    assert isinstance(top, TopKLogprobs) and top.values.shape == (4, T, 3)


def test_logprobs_over_the_memory_limit_or_unwanted_are_left_to_the_trainer():
    big = replay(max_logprobs_bytes=1000)  # 3*4*16*48*4 bytes would not fit
    assert not big.keeps_logprobs and big.next_batch().teacher_logprobs is None
    assert replay(max_logprobs_bytes=1000, logprobs_top_k=1).keeps_logprobs is False
    assert replay(max_logprobs_bytes=10_000, logprobs_top_k=1).keeps_logprobs is True
    assert replay(return_logprobs=False).next_batch().teacher_logprobs is None
    a, b = replay(max_logprobs_bytes=1000).next_batch(), replay().next_batch()
    assert torch.equal(a.tokens, b.tokens)  # the samples do not depend on it


def test_stop_at_eos_masks_batches():
    teacher = tiny_gpt()
    free = replay(teacher=teacher, buffer=1, batch_size=16).next_batch().tokens
    eos = int(torch.mode(free[:, 1:T // 2].reshape(-1)).values)
    batch = replay(teacher=teacher, buffer=1, batch_size=16, eos_id=eos).next_batch()
    assert batch.loss_mask is not None and float(batch.loss_mask.mean()) < 1.0
    assert torch.equal(batch.loss_mask, eos_loss_mask(batch.tokens, eos))
    ignored = replay(teacher=teacher, buffer=1, batch_size=16, eos_id=eos, stop_at_eos=False).next_batch()
    assert ignored.loss_mask is None and torch.equal(ignored.tokens, free)


@pytest.mark.parametrize("kwargs, match", [
    ({"domains": []}, "domain"), ({"domains": [V]}, "vocabulary"), ({"batch_size": 0}, "batch_size"),
    ({"buffer": 0}, "buffer"), ({"context": T + 1}, "context"), ({"stop_at_eos": True}, "eos_id"),
    ({"temperature": -1.0}, "temperature"), ({"seed": -1}, "seed"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(SelfReplayError, match=match):
        replay(**kwargs)


def test_eos_loss_mask():
    tokens = torch.tensor([[10, 4, 10, 5, 0], [1, 4, 5, 6, 7], [1, 10, 0, 0, 0]])
    assert eos_loss_mask(tokens, 10).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_stored_replay_over_a_flat_corpus_is_real_replay(corpora):
    corpus = Corpus.open(corpora["en"])
    r = StoredReplay(corpus, batch_size=4, context=T, seed=1)
    batch = r.next_batch()
    assert batch.tokens.shape == (4, T) and torch.all(batch.tokens[:, 0] == corpus.meta.domain_token)
    assert batch.teacher_logprobs is None and batch.loss_mask is None
    state = r.state_dict()
    want = r.next_batch()
    again = StoredReplay(corpora["en"], batch_size=4, context=T, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch().tokens, want.tokens)
    with pytest.raises(SelfReplayError, match="context"):
        StoredReplay(corpus, batch_size=4)


def test_stored_replay_walks_precut_rows(tmp_path):
    from selfreplay.data import CorpusMeta, write_corpus

    rows = np.arange(7 * 6).reshape(7, 6) % V
    rows[:, 0] = 1
    write_corpus(rows, tmp_path / "rows", CorpusMeta(0, "uint16", V, "fp", 1, None))
    ordered = StoredReplay(tmp_path / "rows", batch_size=3, shuffle=False)
    got = torch.cat([ordered.next_batch().tokens for _ in range(3)])  # 9 rows: wraps into the second epoch
    assert torch.equal(got, torch.from_numpy(np.concatenate([rows, rows[:2]])))
    shuffled = StoredReplay(tmp_path / "rows", batch_size=7, seed=3, context=4)
    epoch = shuffled.next_batch().tokens
    assert epoch.shape == (7, 4)
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, rows[:, :4].tolist()))
    with pytest.raises(SelfReplayError, match="rows"):
        StoredReplay(tmp_path / "rows", batch_size=8)
    with pytest.raises(SelfReplayError, match="context"):
        StoredReplay(tmp_path / "rows", batch_size=2, context=7)
