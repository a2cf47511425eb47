"""What self-generated replay is prompted with: domain tokens, BOS, or a chat template's prefix.

The paper prompts with nothing but the old distribution's start token: the dataset-id (domain) token of the
built-in GPT's corpus (§3.2), BOS for an instruct model — no chat template (§5.9), a task's BOS token in the toy
experiment. A ``chat`` mode starts from the chat template's text before a user turn instead, and lets the model
write the whole exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from selfreplay.errors import SelfReplayError

PROMPT_MODES = ("bos", "chat")
_SENTINELS = ("\u2063USER\u2063", "\u2063REPLY\u2063", "\u2063NEXT\u2063")  # text no real conversation contains


def check_domains(domains: Sequence[int], vocab_size: Optional[int] = None, option: str = "replay.domains") -> None:
    """Domain tokens are the built-in GPT's reserved ids 0..9 (and inside its vocabulary)."""
    from selfreplay.data.tokenizer import N_RESERVED

    bad = [d for d in domains if d < 0 or (vocab_size is not None and d >= vocab_size)]
    if bad:
        raise SelfReplayError(f"{option}: token id {bad[0]} is outside the vocabulary"
                              + ("" if vocab_size is None else f" 0..{vocab_size - 1}"))
    bad = [d for d in domains if not 0 <= d < N_RESERVED]
    if bad:
        raise SelfReplayError(f"{option}={list(domains)}: the built-in GPT's domain tokens are ids 0..{N_RESERVED - 1}")


@dataclass
class Prompts:
    """Row g of a replay stream starts with ``rows[g % len(rows)]``: one-token domain prompts split the rows of
    every batch evenly (within one row), and the split carries on across batches, refills and chunks alike."""

    rows: list[list[int]]

    @classmethod
    def domains(cls, domains: Sequence[int], vocab_size: Optional[int] = None,
                option: str = "replay.domains") -> "Prompts":
        """One-token prompts of the built-in GPT's domain tokens (``option`` names the setting in errors)."""
        domains = [int(d) for d in domains]
        if not domains:
            raise SelfReplayError(f"{option}: give at least one domain token id to prompt with")
        check_domains(domains, vocab_size, option)
        return cls([[d] for d in domains])

    @property
    def length(self) -> int:
        lengths = {len(r) for r in self.rows}
        if len(lengths) != 1:
            raise SelfReplayError("replay prompts of different lengths")
        return lengths.pop()

    def for_rows(self, start_row: int, num_rows: int, device=None) -> torch.Tensor:
        """Prompts [num_rows, P] of stream rows start_row .. start_row + num_rows - 1."""
        table = torch.tensor(self.rows, dtype=torch.long, device=device)
        rows = torch.arange(start_row, start_row + num_rows, device=device)
        return table[rows % len(self.rows)]


def eos_loss_mask(tokens: torch.Tensor, eos_id: int, prompt_length: int = 1) -> torch.Tensor:
    """The sampler's stop-at-EOS mask rebuilt from tokens: 1 after the prompt, up to and including the first
    sampled EOS."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    sampled_eos = (tokens == eos_id) & (positions >= prompt_length)
    before = torch.cumsum(sampled_eos.int(), dim=1) - sampled_eos.int()  # EOS strictly before each position
    return ((before == 0) & (positions >= prompt_length)).float()


def prompt_mask(rows: int, length: int, prompt_length: int) -> Optional[torch.Tensor]:
    """Target mask of replay rows: 0 on the prompt (None for a one-token prompt: never a target anyway)."""
    if prompt_length <= 1:
        return None
    mask = torch.ones(rows, length, dtype=torch.float32)
    mask[:, :prompt_length] = 0.0
    return mask


def start_token_id(tokenizer) -> int:
    """The BOS token id, or EOS when the tokenizer has no BOS (e.g. Qwen), which then starts documents too."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise SelfReplayError("replay.prompt=bos: the tokenizer has neither a BOS nor an EOS token to start from")


def chat_prefix(tokenizer) -> str:
    """The chat template's text before the first user turn begins (system preamble, BOS, ...).

    Renders [user: S1] and cuts before the user turn's header, which is found as the part between an assistant
    turn's end and the next user message in [user: S1, assistant: S2, user: S3]. If that cannot be worked out,
    the whole text before S1 (user header included) is the prefix.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SelfReplayError("replay.prompt=chat: the tokenizer has no chat template; use replay.prompt=bos")
    s1, s2, s3 = _SENTINELS

    def render(turns: list[tuple[str, str]]) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False)

    one = render([("user", s1)])
    if s1 not in one:
        raise SelfReplayError("replay.prompt=chat: the chat template does not render the user message")
    before_user = one[: one.index(s1)]
    two = render([("user", s1), ("assistant", s2)])
    three = render([("user", s1), ("assistant", s2), ("user", s3)])
    try:
        assistant_end = two[two.index(s2) + len(s2):]
        between = three[three.index(s2) + len(s2): three.index(s3)]
    except ValueError:
        return before_user
    if not between.startswith(assistant_end.rstrip("\n")) and assistant_end:
        return before_user
    user_header = between[len(assistant_end):] if between.startswith(assistant_end) else \
        between[len(assistant_end.rstrip("\n")):]
    if user_header and before_user.endswith(user_header):
        return before_user[: len(before_user) - len(user_header)]
    return before_user


def tokenizer_prompt(tokenizer, mode: str) -> list[int]:
    """Token ids every replay row of a Hugging Face model starts with: [BOS] or the chat template's prefix."""
    if mode == "bos":
        return [start_token_id(tokenizer)]
    if mode == "chat":
        ids = tokenizer(chat_prefix(tokenizer), add_special_tokens=False)["input_ids"]
        return list(ids) if ids else [start_token_id(tokenizer)]
    raise SelfReplayError(f"replay.prompt={mode!r}: expected one of {', '.join(PROMPT_MODES)}")
