"""What self-generated replay is prompted with (selfreplay.replay.prompts): domain tokens split over rows, the
target masks of replay rows (EOS, multi-token prompts), and BOS / chat-template prompts of Hugging Face tokenizers."""

import pytest
import torch

from conftest import one_line_error
from selfreplay.errors import SelfReplayError
from selfreplay.replay.prompts import Prompts, eos_loss_mask, prompt_mask

SYSTEM_TEMPLATE_PREFIX = "{{ bos_token }}<|im_start|>system\nBe brief.<|im_end|>\n"


def test_domain_prompts_cycle_over_stream_rows():
    p = Prompts.domains([3, 5])
    assert p.rows == [[3], [5]] and p.length == 1
    assert torch.equal(p.for_rows(1, 3)[:, 0], torch.tensor([5, 3, 5]))
    assert p.for_rows(0, 4).shape == (4, 1) and p.for_rows(0, 4).dtype == torch.long
    three = Prompts.domains([0, 1, 2])
    assert three.for_rows(4, 5)[:, 0].tolist() == [1, 2, 0, 1, 2]  # row g gets domain g mod 3, across batches


def test_multi_token_prompts_repeat_whole():
    p = Prompts([[1, 9, 4], [2, 8, 4]])
    assert p.length == 3
    assert p.for_rows(1, 3).tolist() == [[2, 8, 4], [1, 9, 4], [2, 8, 4]]


@pytest.mark.parametrize("domains, vocab, word", [([], None, "at least one"), ([48], 48, "vocabulary"),
                                                  ([-1], None, "vocabulary")])
def test_bad_domains_are_one_line_errors(domains, vocab, word):
    with pytest.raises(SelfReplayError) as e:
        Prompts.domains(domains, vocab)
    one_line_error(e, "replay.domains", word)


def test_prompts_of_different_lengths_are_an_error():
    with pytest.raises(SelfReplayError, match="different lengths"):
        Prompts([[1], [2, 3]]).length


def test_eos_loss_mask():
    tokens = torch.tensor([[10, 4, 10, 5, 0], [1, 4, 5, 6, 7], [1, 10, 0, 0, 0]])
    # the prompt (position 0) is never a target; a row ends with its first *sampled* EOS (an EOS prompt does not)
    assert eos_loss_mask(tokens, 10).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0]]
    two = torch.tensor([[1, 10, 4, 10, 5], [1, 2, 10, 3, 4]])
    assert eos_loss_mask(two, 10, prompt_length=2).tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]


def test_prompt_mask():
    assert prompt_mask(3, 6, 1) is None  # a one-token prompt is never a target anyway
    m = prompt_mask(2, 5, 3)
    assert m.dtype == torch.float32 and m.tolist() == [[0, 0, 0, 1, 1]] * 2


# --- Hugging Face tokenizers --------------------------------------------------------------------------------------

@pytest.fixture()
def tok():
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_tokenizer

    return tiny_tokenizer()


def test_bos_prompt_is_the_bos_token(tok):
    from selfreplay.replay.prompts import start_token_id, tokenizer_prompt

    assert start_token_id(tok) == tok.bos_token_id
    assert tokenizer_prompt(tok, "bos") == [tok.bos_token_id]


def test_start_token_is_eos_without_bos(tok):
    from selfreplay.replay.prompts import start_token_id, tokenizer_prompt

    tok.bos_token = None
    assert tok.bos_token_id is None
    assert start_token_id(tok) == tok.eos_token_id
    assert tokenizer_prompt(tok, "bos") == [tok.eos_token_id]
    tok.eos_token = None
    with pytest.raises(SelfReplayError) as e:
        start_token_id(tok)
    one_line_error(e, "BOS", "EOS")


def test_chat_prompt_is_the_template_prefix_before_a_user_turn(tok):
    from selfreplay.replay.prompts import chat_prefix, tokenizer_prompt

    tok.chat_template = SYSTEM_TEMPLATE_PREFIX + tok.chat_template
    assert chat_prefix(tok) == "<s><|im_start|>system\nBe brief.<|im_end|>\n"
    prompt = tokenizer_prompt(tok, "chat")
    assert prompt == tok("<s><|im_start|>system\nBe brief.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id and len(prompt) > 1


def test_plain_chatml_prefix_falls_back_to_bos(tok):
    from selfreplay.replay.prompts import chat_prefix, tokenizer_prompt

    assert chat_prefix(tok) == ""
    assert tokenizer_prompt(tok, "chat") == [tok.bos_token_id]


def test_chat_prompt_without_a_template_and_unknown_modes_are_one_line_errors(tok):
    from selfreplay.replay.prompts import tokenizer_prompt

    tok.chat_template = None
    with pytest.raises(SelfReplayError) as e:
        tokenizer_prompt(tok, "chat")
    one_line_error(e, "chat template", "replay.prompt=bos")
    with pytest.raises(SelfReplayError) as e:
        tokenizer_prompt(tok, "system")
    one_line_error(e, "replay.prompt", "bos", "chat")
