"""Tiny offline Hugging Face objects for tests: a byte-level BPE tokenizer with a ChatML template, tiny models.

Everything is built locally (no hub downloads) and deterministically, so tests can compare numbers exactly.
"""

from __future__ import annotations

from functools import lru_cache

import torch

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# A ChatML-like template without {% generation %} markers (like most real templates), with a generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to speak a little.
Question: What is the capital of France? A. Paris B. Rome C. Madrid D. Berlin Answer: A
Question: Which animal barks? A. cat B. dog C. fish D. bird Answer: B
Question: What colour is the sky? A. green B. red C. blue D. yellow Answer: C
Question: How many legs does a spider have? A. six B. four C. ten D. eight Answer: D
Question: Which one is a fruit? A. apple B. stone C. chair D. sand E. none Answer: E
Question: Pick the last one. A. one B. two C. three D. four E. five Answer: E
user assistant system hello hi how are you I am fine thank you very much
Once upon a time there was a tiny language model that wanted to remember everything it had ever read.
Finetuning without forgetting: replay the old distribution while learning the new one.
"""


@lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; later calls rebuild a fresh tokenizer from its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXT.splitlines() * 3, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True):
    """A PreTrainedTokenizerFast: byte-level BPE (~400 tokens), <s>/</s>/<pad> as bos/eos/pad, ChatML template.

    " A" ... " E" are single tokens (multiple-choice scoring needs that), " F" is not.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_config_kwargs(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)


def tiny_llama(vocab_size: int, seed: int = 0):
    """A random LlamaForCausalLM (hidden 32, 2 layers, 4 heads / 2 kv heads), in eval mode, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_tiny_config_kwargs(vocab_size))).eval()


def tiny_qwen2(vocab_size: int, seed: int = 0):
    """A random Qwen2ForCausalLM of the same tiny size, in eval mode, float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_tiny_config_kwargs(vocab_size))).eval()
