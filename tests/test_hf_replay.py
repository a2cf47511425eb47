"""Self-generated replay from Hugging Face teachers: BOS / chat prompts, fixed length, seeds, kept log-probs."""

import pytest
import torch

from conftest import one_line_error
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: E402
from selfreplay.hf_model import Teacher, add_lora  # noqa: E402
from selfreplay.hf_replay import HFSelfReplay, chat_prefix, prompt_ids_for, sample_hf, start_token_id  # noqa: E402

SYSTEM_TEMPLATE_PREFIX = "{{ bos_token }}<|im_start|>system\nBe brief.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    return Teacher.for_model(tiny_llama(len(tok), seed=1))


def test_bos_rows_start_with_bos_have_the_length_and_follow_the_seed(tok, teacher):
    def stream(seed):
        replay = HFSelfReplay(teacher, tok, batch_size=3, length=10, buffer=2, seed=seed)
        return [replay.next_batch() for _ in range(3)]  # crosses a refill

    first, again, other = stream(5), stream(5), stream(6)
    for batch in first:
        assert batch.tokens.shape == (3, 10)
        assert (batch.tokens[:, 0] == tok.bos_token_id).all()
        assert batch.loss_mask is None  # BOS is never a target anyway
    for a, b in zip(first, again):
        assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(first[0].tokens, other[0].tokens)
    assert not torch.equal(first[0].tokens, first[1].tokens)


def test_kept_logprobs_equal_a_teacher_forward(tok, teacher):
    replay = HFSelfReplay(teacher, tok, batch_size=4, length=9, buffer=1, seed=0)
    batch = replay.next_batch()
    assert batch.teacher_logprobs.shape == (4, 9, len(tok))
    torch.testing.assert_close(batch.teacher_logprobs, teacher.logprobs(batch.tokens), rtol=1e-5, atol=1e-5)
    small = HFSelfReplay(teacher, tok, batch_size=4, length=9, buffer=1, seed=0, max_logprobs_bytes=1000)
    kept_none = small.next_batch()
    assert kept_none.teacher_logprobs is None and torch.equal(kept_none.tokens, batch.tokens)


def test_lora_teacher_samples_with_adapters_disabled(tok):
    base = tiny_qwen2(len(tok), seed=2)
    plain = HFSelfReplay(Teacher.for_model(base), tok, batch_size=2, length=8, buffer=1, seed=3).next_batch()
    model = add_lora(base, r=4, alpha=64)
    with torch.no_grad():  # make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    lora = HFSelfReplay(Teacher.for_model(model), tok, batch_size=2, length=8, buffer=1, seed=3).next_batch()
    assert torch.equal(plain.tokens, lora.tokens)
    torch.testing.assert_close(plain.teacher_logprobs, lora.teacher_logprobs)


def test_chat_prompt_is_the_template_prefix_before_a_user_turn_and_is_masked():
    tok = tiny_tokenizer()
    tok.chat_template = SYSTEM_TEMPLATE_PREFIX + tok.chat_template
    assert chat_prefix(tok) == "<s><|im_start|>system\nBe brief.<|im_end|>\n"
    prompt = prompt_ids_for(tok, "chat")
    teacher = Teacher.for_model(tiny_llama(len(tok)))
    batch = HFSelfReplay(teacher, tok, batch_size=2, length=len(prompt) + 6, buffer=1, prompt="chat").next_batch()
    assert batch.tokens.shape == (2, len(prompt) + 6)
    assert (batch.tokens[:, :len(prompt)] == torch.tensor(prompt)).all()
    assert (batch.loss_mask[:, :len(prompt)] == 0).all() and (batch.loss_mask[:, len(prompt):] == 1).all()


def test_plain_chatml_prefix_falls_back_to_bos(tok):
    assert chat_prefix(tok) == ""
    assert prompt_ids_for(tok, "chat") == [tok.bos_token_id]


def test_start_token_is_eos_without_bos():
    tok = tiny_tokenizer()
    tok.bos_token = None
    assert start_token_id(tok) == tok.eos_token_id


def test_resume_continues_the_stream(tok, teacher):
    replay = HFSelfReplay(teacher, tok, batch_size=2, length=6, buffer=2, seed=1)
    replay.next_batch()
    state = replay.state_dict()
    expected = replay.next_batch().tokens
    resumed = HFSelfReplay(teacher, tok, batch_size=2, length=6, buffer=2, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch().tokens, expected)
    other = HFSelfReplay(teacher, tok, batch_size=2, length=6, buffer=2, seed=2)
    with pytest.raises(SelfReplayError) as e:
        other.load_state_dict(state)
    one_line_error(e, "seed")


def test_sample_hf_temperature_zero_is_greedy(tok, teacher):
    prompts = torch.full((2, 1), tok.bos_token_id)
    tokens, _ = sample_hf(teacher.module, prompts, 6, temperature=0)
    logits = teacher.module(input_ids=tokens).logits
    assert torch.equal(tokens[:, 1:], logits[:, :-1].argmax(-1))


def test_bad_settings_are_one_line_errors(tok, teacher):
    for kwargs, word in (({"prompt": "system"}, "replay.prompt"), ({"length": 1}, "replay.length"),
                         ({"temperature": 0.0}, "temperature"), ({"buffer": 0}, "buffer")):
        args = {"batch_size": 2, "length": 6, **kwargs}
        with pytest.raises(SelfReplayError) as e:
            HFSelfReplay(teacher, tok, **args)
        one_line_error(e, word)
