"""Replay sources (selfreplay.replay.sources): the self-generated buffer (refills, domain split, resume, kept KL
targets) for the built-in GPT and Hugging Face teachers, stored replay corpora, and real-data replay."""

import json

import numpy as np
import pytest
import torch

from conftest import one_line_error
from selfreplay.data.batch import Batch
from selfreplay.data.corpus import Corpus, CorpusMeta, write_corpus
from selfreplay.data.loader import CorpusLoader
from selfreplay.errors import SelfReplayError
from selfreplay.models.builtin import wrap_gpt
from selfreplay.models.core import Teacher
from selfreplay.models.gpt import GPT, GPTConfig
from selfreplay.replay.losses import TopKTargets
from selfreplay.replay.prompts import Prompts, eos_loss_mask
from selfreplay.replay.sources import DataReplay, ReplayBatch, SelfGeneratedReplay, StoredReplay

V, T = 48, 16


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(d_model=32, n_layers=1, head_dim=16, context=T, vocab_size=V)).eval()


def replay(teacher: GPT = None, domains=(0,), **kw) -> SelfGeneratedReplay:
    args = dict(batch_size=4, length=T, buffer=3, seed=0)
    args.update(kw)
    return SelfGeneratedReplay(Teacher.frozen_copy(wrap_gpt(teacher or tiny_gpt())), Prompts.domains(domains, V),
                               **args)


def same_batch(a: ReplayBatch, b: ReplayBatch) -> bool:
    same = torch.equal(a.tokens, b.tokens) and (a.loss_mask is None) == (b.loss_mask is None)
    if a.loss_mask is not None:
        same = same and torch.equal(a.loss_mask, b.loss_mask)
    if isinstance(a.teacher_targets, TopKTargets):
        return same and torch.equal(a.teacher_targets.values, b.teacher_targets.values) and \
            torch.equal(a.teacher_targets.indices, b.teacher_targets.indices)
    if a.teacher_targets is not None:
        return same and torch.equal(a.teacher_targets, b.teacher_targets)
    return same and b.teacher_targets is None


def test_buffer_refills_every_buffer_batches():
    r = replay(buffer=3)
    seen = []
    for _ in range(7):
        batch = r.next_batch()
        assert isinstance(batch, ReplayBatch) and batch.tokens.shape == (4, T)
        seen.append(r.refills)
    assert seen == [1, 1, 1, 2, 2, 2, 3]
    assert r.rows_per_refill == 12
    assert r.sample_seconds > 0
    assert same_batch(replay().next_batch(), replay().next_batch())  # deterministic by seed
    assert not torch.equal(replay().next_batch().tokens, replay(seed=1).next_batch().tokens)


def test_batches_of_one_refill_are_distinct_rows():
    r = replay(buffer=3)
    rows = torch.cat([r.next_batch().tokens for _ in range(3)])
    assert len({tuple(x) for x in rows.tolist()}) == 12


def test_refill_is_a_slice_of_one_stream():
    """Refill r holds rows r·buffer·batch_size.. of one stream: a buffer of 2 batches equals two refills of 1."""
    r = replay(buffer=1, batch_size=4, domains=(0, 1, 2))
    s = r.sample_refill(1)
    assert torch.equal(s.tokens[:, 0], torch.tensor([1, 2, 0, 1]))  # rows 4..7 of the stream: prompts g mod 3


def test_domains_split_evenly_across_rows():
    r = replay(domains=[0, 1, 2], batch_size=6, buffer=2)
    for _ in range(4):
        counts = torch.bincount(r.next_batch().tokens[:, 0], minlength=3)
        assert counts.tolist() == [2, 2, 2]
    r = replay(domains=[3, 5], batch_size=3, buffer=2)
    firsts = torch.cat([r.next_batch().tokens[:, 0] for _ in range(4)])
    assert torch.bincount(firsts).tolist()[3::2] == [6, 6]  # split within one row per batch, even overall


@pytest.mark.parametrize("taken", [2, 3, 4])  # mid-buffer, at a refill boundary, just after one
def test_resume_from_state_dict_gives_identical_batches(taken):
    a = replay(buffer=3, targets_top_k=4)
    for _ in range(taken):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able, as the trainer may store it
    expected = [a.next_batch() for _ in range(4)]
    b = replay(buffer=3, targets_top_k=4)
    b.load_state_dict(state)
    assert b.sample_seconds == pytest.approx(state["sample_seconds"])
    for want in expected:
        assert same_batch(b.next_batch(), want)


@pytest.mark.parametrize("kwargs, word", [({"seed": 1}, "seed"), ({"temperature": 0.5}, "temperature"),
                                          ({"buffer": 2}, "buffer"), ({"domains": (1,)}, "prompts")])
def test_resume_with_other_settings_is_an_error(kwargs, word):
    state = replay().state_dict()
    with pytest.raises(SelfReplayError) as e:
        replay(**kwargs).load_state_dict(state)
    one_line_error(e, word)


def test_batches_carry_the_teachers_logits():
    teacher = tiny_gpt()
    r = replay(teacher=teacher)
    batch = r.next_batch()
    assert r.keeps_targets
    assert batch.teacher_targets.shape == (4, T, V)
    with torch.no_grad():
        ref = torch.log_softmax(teacher(batch.tokens).float(), -1)
    torch.testing.assert_close(torch.log_softmax(batch.teacher_targets[:, :-1].float(), -1), ref[:, :-1],
                               atol=1e-5, rtol=1e-5)
    top = replay(teacher=teacher, targets_top_k=3).next_batch().teacher_targets
    assert isinstance(top, TopKTargets) and top.values.shape == (4, T, 3)


def test_targets_over_the_memory_limit_or_unwanted_are_left_to_the_trainer():
    big = replay(max_targets_bytes=1000)  # 3*4*16*48*4 bytes would not fit
    assert not big.keeps_targets and big.next_batch().teacher_targets is None
    assert replay(max_targets_bytes=1000, targets_top_k=1).keeps_targets is False
    assert replay(max_targets_bytes=10_000, targets_top_k=1).keeps_targets is True
    assert replay(max_targets_bytes=None).keeps_targets is True
    assert replay(keep_targets=False).next_batch().teacher_targets is None
    a, b = replay(max_targets_bytes=1000).next_batch(), replay().next_batch()
    assert torch.equal(a.tokens, b.tokens)  # the samples do not depend on it


def test_targets_under_autocast_are_kept_in_its_dtype_at_half_the_bytes():
    teacher = tiny_gpt()
    fits_half_only = 3 * 4 * T * V * 2  # one buffer of bfloat16 logits
    r = replay(teacher=teacher, autocast_dtype=torch.bfloat16, max_targets_bytes=fits_half_only)
    assert r.keeps_targets and not replay(max_targets_bytes=fits_half_only).keeps_targets
    batch = r.next_batch()
    assert batch.teacher_targets.dtype == torch.bfloat16 and batch.tokens.shape == (4, T)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.log_softmax(teacher(batch.tokens).float(), -1)
    torch.testing.assert_close(torch.log_softmax(batch.teacher_targets[:, :-1].float(), -1), ref[:, :-1],
                               atol=0.1, rtol=0.05)


def test_stop_at_eos_masks_batches():
    teacher = tiny_gpt()
    free = replay(teacher=teacher, buffer=1, batch_size=16).next_batch()
    assert free.loss_mask is None  # EOS ignored (no eos_id): every token after the domain token counts
    eos = int(torch.mode(free.tokens[:, 1:T // 2].reshape(-1)).values)
    batch = replay(teacher=teacher, buffer=1, batch_size=16, eos_id=eos).next_batch()
    assert batch.loss_mask is not None and float(batch.loss_mask.mean()) < 1.0
    assert torch.equal(batch.loss_mask, eos_loss_mask(batch.tokens, eos))


def test_lora_teacher_of_the_builtin_gpt_samples_with_adapters_disabled():
    plain = replay(buffer=1).next_batch()
    model = wrap_gpt(tiny_gpt())
    model.adapter.add_lora(model, r=4, alpha=64, dropout=0.0, targets=("qkv", "out", "up", "down"), seed=0)
    with torch.no_grad():  # make the adapters matter
        for name, p in model.named_parameters():
            if "lora_b" in name.lower():
                p.normal_(0, 1.0)
    teacher = Teacher.adapters_off(model)
    assert teacher.shares_weights
    lora = SelfGeneratedReplay(teacher, Prompts.domains([0], V), batch_size=4, length=T, buffer=1).next_batch()
    assert torch.equal(plain.tokens, lora.tokens)
    torch.testing.assert_close(plain.teacher_targets, lora.teacher_targets)
    with torch.no_grad():
        assert not torch.allclose(model(lora.tokens), teacher(lora.tokens))  # the student differs


@pytest.mark.parametrize("kwargs, match", [
    ({"domains": []}, "domain"), ({"domains": [V]}, "vocabulary"), ({"batch_size": 0}, "batch_size"),
    ({"buffer": 0}, "buffer"), ({"length": T + 1}, "context"), ({"length": 1}, "replay.length"),
    ({"temperature": -1.0}, "temperature"), ({"temperature": 0.0}, "temperature"), ({"top_p": 2.0}, "top_p"),
    ({"targets_top_k": 0}, "top_k"), ({"seed": -1}, "seed"), ({"decode": "fast"}, "decode"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(SelfReplayError) as e:
        replay(**kwargs)
    one_line_error(e, match)


# --- real-data replay and stored replay corpora ------------------------------------------------------------------

def test_data_replay_over_a_flat_corpus_is_real_replay(corpora):
    corpus = Corpus.open(corpora["en"])
    r = DataReplay(CorpusLoader(corpus, T, 4, seed=1))
    batch = r.next_batch()
    assert isinstance(batch, Batch)
    assert batch.tokens.shape == (4, T) and torch.all(batch.tokens[:, 0] == corpus.meta.domain_token)
    assert batch.teacher_targets is None and batch.loss_mask is None
    state = json.loads(json.dumps(r.state_dict()))
    want = r.next_batch()
    again = DataReplay(CorpusLoader(Corpus.open(corpora["en"]), T, 4, seed=1))
    again.load_state_dict(state)
    assert torch.equal(again.next_batch().tokens, want.tokens)
    with pytest.raises(SelfReplayError) as e:  # a flat stream is not a replay corpus of rows
        StoredReplay(corpus, batch_size=4)
    one_line_error(e, "flat")


def _rows(tmp_path):
    rows = np.arange(7 * 6).reshape(7, 6) % V
    rows[:, 0] = 1
    write_corpus(rows, tmp_path / "rows", CorpusMeta(0, "uint16", V, "fp", None, None))
    return rows


def test_stored_replay_walks_precut_rows(tmp_path):
    rows = _rows(tmp_path)
    ordered = StoredReplay(tmp_path / "rows", batch_size=3, shuffle=False)
    assert ordered.num_rows == 7 and ordered.length == 6 and not ordered.has_targets
    batches = [ordered.next_batch() for _ in range(3)]  # 9 rows: wraps into the second epoch
    got = torch.cat([b.tokens for b in batches])
    assert torch.equal(got, torch.from_numpy(np.concatenate([rows, rows[:2]])))
    assert all(b.loss_mask is None and b.teacher_targets is None for b in batches)
    shuffled = StoredReplay(tmp_path / "rows", batch_size=7, seed=3, length=4)
    epoch = shuffled.next_batch().tokens
    assert epoch.shape == (7, 4)
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, rows[:, :4].tolist()))
    assert not torch.equal(epoch, torch.from_numpy(rows[:, :4]))  # shuffled
    with pytest.raises(SelfReplayError, match="rows"):
        StoredReplay(tmp_path / "rows", batch_size=8)
    with pytest.raises(SelfReplayError, match="length"):
        StoredReplay(tmp_path / "rows", batch_size=2, length=7)
    with pytest.raises(SelfReplayError, match="batch_size"):
        StoredReplay(tmp_path / "rows", batch_size=0)


def test_stored_replay_resumes_and_refuses_another_corpus_state(tmp_path):
    _rows(tmp_path)
    a = StoredReplay(tmp_path / "rows", batch_size=3, seed=2)
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    want = [a.next_batch().tokens for _ in range(3)]
    b = StoredReplay(tmp_path / "rows", batch_size=3, seed=2)
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch().tokens, w) for w in want)
    with pytest.raises(SelfReplayError) as e:
        StoredReplay(tmp_path / "rows", batch_size=3, seed=5).load_state_dict(state)
    one_line_error(e, "replay state")


def test_stored_replay_rebuilds_prompt_and_eos_masks(tmp_path):
    rows = np.array([[1, 2, 10, 11, 12, 13], [1, 2, 11, 10, 0, 0], [1, 2, 11, 12, 13, 14]])
    write_corpus(rows, tmp_path / "chat", CorpusMeta(0, "uint16", V, "fp", None, None))
    (tmp_path / "chat" / "replay.json").write_text(json.dumps({"prompt_length": 2}))
    masked = StoredReplay(tmp_path / "chat", batch_size=3, shuffle=False).next_batch()
    assert masked.loss_mask.tolist() == [[0, 0, 1, 1, 1, 1]] * 3
    (tmp_path / "chat" / "replay.json").write_text(json.dumps({"prompt_length": 2, "eos_id": 10}))
    eos = StoredReplay(tmp_path / "chat", batch_size=3, shuffle=False).next_batch()
    assert eos.loss_mask.tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    (tmp_path / "chat" / "replay.json").write_text("{torn")
    with pytest.raises(SelfReplayError) as e:
        StoredReplay(tmp_path / "chat", batch_size=3)
    one_line_error(e, "replay.json")


def test_stored_replay_with_missing_or_misshapen_targets_is_an_error(tmp_path):
    _rows(tmp_path)
    (tmp_path / "rows" / "replay.json").write_text(json.dumps({"logprobs_top_k": 2}))
    with pytest.raises(SelfReplayError) as e:
        StoredReplay(tmp_path / "rows", batch_size=2)
    one_line_error(e, "missing")
    assert StoredReplay(tmp_path / "rows", batch_size=2, use_targets=False).next_batch().teacher_targets is None
    np.save(tmp_path / "rows" / "logprobs_values.npy", np.zeros((7, 5, 2), np.float32))
    np.save(tmp_path / "rows" / "logprobs_indices.npy", np.zeros((7, 6, 2), np.int32))
    with pytest.raises(SelfReplayError) as e:
        StoredReplay(tmp_path / "rows", batch_size=2)
    one_line_error(e, "shape")


def test_replay_batch_moves_and_slices_its_targets():
    t = TopKTargets(torch.randn(4, 5, 2), torch.zeros(4, 5, 2, dtype=torch.long))
    b = ReplayBatch(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5), None, t)
    part = b.rows(slice(1, 3))
    assert isinstance(part, ReplayBatch) and part.tokens.shape == (2, 5)
    assert torch.equal(part.teacher_targets.values, t.values[1:3]) and part.loss_mask.shape == (2, 5)
    moved = b.to("cpu")
    assert isinstance(moved, ReplayBatch) and torch.equal(moved.teacher_targets.values, t.values)
    plain = ReplayBatch(torch.zeros(2, 3, dtype=torch.long)).to("cpu").rows(slice(0, 1))
    assert plain.teacher_targets is None and plain.loss_mask is None


# --- self-generated replay from a tiny Hugging Face Llama --------------------------------------------------------

SYSTEM_TEMPLATE_PREFIX = "{{ bos_token }}<|im_start|>system\nBe brief.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_tokenizer

    return tiny_tokenizer()


def hf_lm(tok, build="llama", seed=1):
    import hf_fixtures

    from selfreplay.models.core import CausalLM
    from selfreplay.models.hf import HF_ADAPTER

    return CausalLM(getattr(hf_fixtures, f"tiny_{build}")(len(tok), seed=seed), HF_ADAPTER)


@pytest.fixture(scope="module")
def hf_teacher(tok):
    return Teacher.frozen_copy(hf_lm(tok))


def hf_replay(teacher, tok, prompt="bos", **kw) -> SelfGeneratedReplay:
    from selfreplay.replay.prompts import tokenizer_prompt

    args = dict(batch_size=2, length=6, buffer=1, seed=0)
    args.update(kw)
    return SelfGeneratedReplay(teacher, Prompts([tokenizer_prompt(tok, prompt)]), **args)


def test_hf_bos_rows_start_with_bos_have_the_length_and_follow_the_seed(tok, hf_teacher):
    def stream(seed):
        r = hf_replay(hf_teacher, tok, batch_size=3, length=10, buffer=2, seed=seed)
        return [r.next_batch() for _ in range(3)]  # crosses a refill

    first, again, other = stream(5), stream(5), stream(6)
    for batch in first:
        assert batch.tokens.shape == (3, 10)
        assert (batch.tokens[:, 0] == tok.bos_token_id).all()
        assert batch.loss_mask is None  # BOS is never a target anyway
    for a, b in zip(first, again):
        assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(first[0].tokens, other[0].tokens)
    assert not torch.equal(first[0].tokens, first[1].tokens)


def test_hf_kept_targets_equal_a_teacher_forward(tok, hf_teacher):
    r = hf_replay(hf_teacher, tok, batch_size=4, length=9)
    batch = r.next_batch()
    assert r.keeps_targets and batch.teacher_targets.shape == (4, 9, len(tok))
    want = torch.log_softmax(hf_teacher(batch.tokens).float(), -1)
    torch.testing.assert_close(torch.log_softmax(batch.teacher_targets[:, :-1].float(), -1), want[:, :-1],
                               rtol=1e-5, atol=1e-5)
    small = hf_replay(hf_teacher, tok, batch_size=4, length=9, max_targets_bytes=1000)
    kept_none = small.next_batch()
    assert kept_none.teacher_targets is None and torch.equal(kept_none.tokens, batch.tokens)


def test_hf_lora_teacher_samples_with_adapters_disabled(tok):
    pytest.importorskip("peft")
    from selfreplay.models.hf import add_lora

    plain = hf_replay(Teacher.frozen_copy(hf_lm(tok, "qwen2", 2)), tok, length=8, seed=3).next_batch()
    model = hf_lm(tok, "qwen2", 2)
    add_lora(model, r=4, alpha=64, dropout=0.0, targets="all-linear", seed=0)
    with torch.no_grad():  # make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    teacher = Teacher.adapters_off(model)
    lora = hf_replay(teacher, tok, length=8, seed=3).next_batch()
    assert torch.equal(plain.tokens, lora.tokens)
    torch.testing.assert_close(plain.teacher_targets, lora.teacher_targets)
    with torch.no_grad():
        assert not torch.allclose(model(lora.tokens), teacher(lora.tokens))  # the adapters are on outside it
    model.train()  # the teacher runs in eval mode and leaves the student's mode as it found it
    teacher(lora.tokens)
    assert model.training


def test_hf_chat_prompt_is_the_template_prefix_and_is_masked():
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_tokenizer

    from selfreplay.replay.prompts import tokenizer_prompt

    chat_tok = tiny_tokenizer()
    chat_tok.chat_template = SYSTEM_TEMPLATE_PREFIX + chat_tok.chat_template
    prompt = tokenizer_prompt(chat_tok, "chat")
    assert len(prompt) > 1
    teacher = Teacher.frozen_copy(hf_lm(chat_tok, seed=0))
    batch = hf_replay(teacher, chat_tok, prompt="chat", length=len(prompt) + 6).next_batch()
    assert batch.tokens.shape == (2, len(prompt) + 6)
    assert (batch.tokens[:, :len(prompt)] == torch.tensor(prompt)).all()
    assert (batch.loss_mask[:, :len(prompt)] == 0).all() and (batch.loss_mask[:, len(prompt):] == 1).all()


def test_hf_resume_continues_the_stream(tok, hf_teacher):
    r = hf_replay(hf_teacher, tok, buffer=2, seed=1)
    r.next_batch()
    state = r.state_dict()
    expected = r.next_batch().tokens
    resumed = hf_replay(hf_teacher, tok, buffer=2, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch().tokens, expected)
    with pytest.raises(SelfReplayError) as e:
        hf_replay(hf_teacher, tok, buffer=2, seed=2).load_state_dict(state)
    one_line_error(e, "seed")


def test_hf_bad_settings_are_one_line_errors(tok, hf_teacher):
    for kwargs, word in (({"prompt": "system"}, "replay.prompt"), ({"length": 1}, "replay.length"),
                         ({"temperature": 0.0}, "temperature"), ({"buffer": 0}, "buffer"),
                         ({"decode": "static"}, "eager")):
        with pytest.raises(SelfReplayError) as e:
            hf_replay(hf_teacher, tok, **kwargs)
        one_line_error(e, word)
